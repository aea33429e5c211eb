"""GPTQ (Frantar et al. 2023): second-order weight quantization, one layer at a time.

Columns are quantized left to right; the error of each is spread over the columns not yet
quantized, weighted by the inverse Hessian ``H = 2 X^T X / n`` of the layer's inputs, so that
the layer's output (not its weight) stays close. Blocked, with lazy updates, as in the
reference implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..modules.quantized import int4_grid

__all__ = ["gptq", "inverse_cholesky_", "rtn_int4_grid", "rtn_int8_grid"]

#: ``grid(w_cols) -> (quantize, params)``: ``quantize(col) -> (codes, dequantized)``
Grid = Callable[
    [torch.Tensor], tuple[Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], object]
]


def rtn_int8_grid(
    w: torch.Tensor,
) -> tuple[torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Symmetric per-row int8 grid fixed from the whole weight: ``(scale, quantize)``."""
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))

    def quantize(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round(col / scale).clamp(-127, 127)
        return q, q * scale

    return scale, quantize


def rtn_int4_grid(
    cols: torch.Tensor,
    importance: torch.Tensor | None = None,
    *,
    shrink: float = 0.0,
    steps: int = 20,
    zero_point: str = "float",
) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Asymmetric 4-bit grid for one group of columns: ``(scale, minimum, quantize)``, as
    :class:`~nnslim.modules.quantized.Int4Linear` stores it (:func:`int4_grid`: a bf16 scale;
    a bf16 minimum or, with ``zero_point="integer"``, an integer zero point).

    Args:
        cols: ``(rows, group)`` weights.
        importance: per-column weights of the squared rounding error in the clipping search
            (the Hessian diagonal, for GPTQ); ``None``: plain squared error.
        shrink: with ``shrink > 0``, each row's range is narrowed about its centre by up to
            this fraction (``steps`` candidates) to the one with the least rounding error; an
            outlier then no longer stretches the grid for the whole group. ``0``: min/max.
        zero_point: ``"float"`` or ``"integer"``.
    """
    mn = cols.amin(dim=1)
    mx = cols.amax(dim=1)
    if shrink > 0:
        centre, half = (mx + mn) / 2, (mx - mn) / 2
        imp = importance if importance is not None else torch.ones(cols.shape[1])
        best = torch.full_like(mn, float("inf"))
        lo_best, hi_best = mn.clone(), mx.clone()
        for k in range(steps + 1):
            f = 1 - shrink * k / steps
            lo, hi = centre - f * half, centre + f * half
            s, m = int4_grid(lo, hi, zero_point)
            q = torch.round((cols - m[:, None]) / s[:, None]).clamp(0, 15)
            err = ((q * s[:, None] + m[:, None] - cols) ** 2 * imp[None, :]).sum(1)
            # clearly better only: near-ties keep the wider range, so that Hessians summed in
            # another order (across processes) choose the same grid
            better = err < best * (1 - 1e-4)
            best = torch.where(better, err, best)
            lo_best = torch.where(better, lo, lo_best)
            hi_best = torch.where(better, hi, hi_best)
        mn, mx = lo_best, hi_best
    scale, mn = int4_grid(mn, mx, zero_point)

    def quantize(col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.round((col - mn) / scale).clamp(0, 15)
        return q, q * scale + mn

    return scale, mn, quantize


def inverse_cholesky_(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, written into ``H``
    (at most two ``(in, in)`` matrices alive); GPTQ's and SparseGPT's row-update operator.

    A Hessian that is not positive definite after damping (too few calibration rows for its
    width, or collinear inputs) gets ten times the damping once more before giving up.
    """
    mean = torch.mean(torch.diag(H))
    H.diagonal().add_(damp * mean)
    try:
        tmp = torch.linalg.cholesky(H)
    except RuntimeError:
        H.diagonal().add_(0.1 * mean)
        try:
            tmp = torch.linalg.cholesky(H)
        except RuntimeError:
            raise ValueError(
                f"the layer's input Hessian ({H.shape[0]} x {H.shape[0]}) is not positive "
                f"definite even with {damp + 0.1:g} of its mean diagonal added: its calibration "
                f"inputs are too few or degenerate; give more calibration batches."
            ) from None
    H.copy_(tmp)
    del tmp
    tmp = torch.cholesky_inverse(H)
    H.copy_(tmp)
    del tmp
    tmp = torch.linalg.cholesky(H, upper=True)
    H.copy_(tmp)
    del tmp
    return H


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    clip: float = 0.0,
    zero_point: str = "float",
    keep: torch.Tensor | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize ``weight`` ``(out, in)`` given the input Hessian ``(in, in)``.

    Args:
        weight: the float weight.
        hessian: ``X^T X`` summed over calibration rows (any positive scale).
        bits: 8 (symmetric per row) or 4 (asymmetric per group of ``group_size`` inputs).
        group_size: columns per group for 4 bits.
        block_size: columns per lazy-update block.
        damp: fraction of the mean diagonal added to the Hessian (numerical stability).
        act_order: quantize columns in order of decreasing Hessian diagonal (inputs with the
            most energy first). Group grids are then fixed up front from the original weight
            ("static groups"), so groups stay contiguous in storage.
        clip: 4-bit groups search a range narrowed by up to this fraction for the least
            rounding error weighted by the Hessian diagonal (see :func:`rtn_int4_grid`);
            ``0``: each group's min/max.
        zero_point: 4-bit groups' offsets, ``"float"`` (a minimum) or ``"integer"`` (a zero
            point; see :func:`~nnslim.modules.quantized.int4_grid`).
        keep: a sparsity keep-mask ``(out, in)``: the weights it drops stay exactly zero (the
            code of 0: 0 for 8 bits, the group's zero point for 4 bits, which needs
            ``zero_point="integer"``), and the error of the rest is spread over kept weights
            only, as SparseGPT leaves them.
        consume: overwrite ``hessian`` (float32) instead of copying it, to save memory.

    Returns:
        ``(codes, scale, minimum)``: integer codes ``(out, in)``; for 8 bits ``scale`` per row
        and ``minimum`` ``None``; for 4 bits ``scale`` and ``minimum`` per ``(out, group)``.
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    drop = None
    if keep is not None:
        if bits != 8 and zero_point != "integer":
            raise ValueError(
                "gptq(keep=...): a float minimum per group has no exact 0; keeping sparse "
                "zeros at 4 bits needs zero_point='integer'"
            )
        drop = ~keep.to(torch.bool)
        W[drop] = 0
    if consume and hessian.dtype == torch.float32:
        H = hessian.detach()
    else:
        H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    hdiag = torch.diag(H).clone()
    static: list[Any] | None = None
    if bits != 8 and act_order:
        if group_size is None or cols % group_size:
            raise ValueError(f"group_size {group_size} must divide {cols} input features")
        static = [
            rtn_int4_grid(
                W[:, g : g + group_size],
                hdiag[g : g + group_size],
                shrink=clip,
                zero_point=zero_point,
            )
            for g in range(0, cols, group_size)
        ]
    perm = torch.argsort(hdiag, descending=True) if act_order else torch.arange(cols)
    inv = torch.argsort(perm)
    # (in, in) matrices dominate the memory: every step below writes its result back into H,
    # so at most two are alive at once
    if act_order:
        W = W[:, perm]
        if drop is not None:
            drop = drop[:, perm]
        H.copy_(H[perm])
        H.copy_(H[:, perm])
    Hinv = inverse_cholesky_(H, damp)

    codes = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    if bits == 8:
        scale8, quant8 = rtn_int8_grid(W)
        scales: torch.Tensor = scale8
        mins = None
    else:
        if group_size is None or cols % group_size:
            raise ValueError(f"group_size {group_size} must divide {cols} input features")
        scales = torch.zeros(rows, cols // group_size, device=W.device)
        mins = torch.zeros(rows, cols // group_size, device=W.device)
        block_size = max(group_size, (block_size // group_size) * group_size)
    quant = quant8 if bits == 8 else None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if static is not None:
                _, _, quant = static[int(perm[c]) // group_size]  # type: ignore[operator]
            elif bits != 8 and c % group_size == 0:  # type: ignore[operator]
                s, mn, quant = rtn_int4_grid(
                    W1[:, i : i + group_size],
                    hdiag[c : c + group_size],
                    shrink=clip,
                    zero_point=zero_point,
                )
                scales[:, c // group_size] = s  # type: ignore[operator]
                mins[:, c // group_size] = mn  # type: ignore[index,operator]
            w = W1[:, i]
            q, dq = quant(w)  # type: ignore[misc]
            if drop is not None:
                gone = drop[:, c]
                if bool(gone.any()):
                    zero, _ = quant(torch.zeros_like(w))  # type: ignore[misc]
                    q = torch.where(gone, zero, q)
                    dq = torch.where(gone, torch.zeros_like(dq), dq)
            codes[:, c] = q.to(torch.int8)
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = codes[:, inv]
    if static is not None:
        for gi, (s, mn, _) in enumerate(static):
            scales[:, gi] = s  # type: ignore[index]
            mins[:, gi] = mn  # type: ignore[index]
    return codes, scales, mins
