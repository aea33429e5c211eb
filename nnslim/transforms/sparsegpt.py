"""SparseGPT (Frantar & Alistarh 2023): prune a layer's weights and update the ones kept so
that the layer's output on its calibration inputs stays close.

The same machinery as GPTQ: columns are visited left to right; each pruned weight's error is
spread over the columns not yet visited through the inverse Hessian ``H = X^T X`` of the
layer's inputs (the optimal brain surgeon update, made cheap by sharing one Cholesky factor
across rows). Which weights go is chosen by ``w^2 / [H^-1]_jj^2`` (the OBS saliency), per
block of ``block_size`` columns for unstructured sparsity ("adaptive mask selection") or per
group of ``M`` columns for N:M. Blocked, with lazy updates, as the reference implementation.
"""

from __future__ import annotations

from typing import Any

import torch

from .gptq import inverse_cholesky_, rtn_int4_grid

__all__ = ["sparsegpt"]


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    group_size: int | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Prune ``weight`` ``(out, in)`` given the Hessian of its inputs ``(in, in)``.

    Args:
        weight: the float weight.
        hessian: ``X^T X`` summed over calibration rows (any positive scale).
        sparsity: the fraction of each block's weights zeroed (unstructured).
        nm: ``(n, m)``: keep ``n`` of every ``m`` consecutive weights of a row instead.
        keep: a boolean mask of weights already pruned before (``False``): they stay zero and
            count toward the sparsity.
        block_size: columns per lazy-update block (and per mask-selection block).
        damp: fraction of the mean diagonal added to the Hessian.
        group_size: also quantize the weights kept to int4 in the same pass (GPTQ's rounding
            inside SparseGPT's loop), asymmetric per group of this many columns with integer
            zero points, so the pruned weights are exactly the zero point's code; it must
            divide the width.
        consume: overwrite ``hessian`` (float32) instead of copying it, to save memory.

    Returns:
        ``(weight, keep, int4)``: the updated weight with its pruned entries exactly zero (for
        int4, the de-quantized weight), the boolean keep-mask, and for int4 ``(codes, scale,
        minimum)`` as :class:`~nnslim.modules.quantized.Int4Linear` takes them (else ``None``).
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(f"{nm[0]}:{nm[1]} sparsity needs a width divisible by {nm[1]}, not {cols}")
    if group_size is not None and cols % group_size:
        raise ValueError(f"group_size {group_size} must divide the {cols} input features")
    codes = scales = mins = None
    quant: Any = None
    if group_size is not None:
        # whole groups inside each block (a group's grid is set from its columns in the block)
        block_size = max(group_size, (block_size // group_size) * group_size)
        codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
        scales = torch.zeros(rows, cols // group_size, device=W.device)
        mins = torch.zeros(rows, cols // group_size, device=W.device)
    H = hessian.detach() if consume and hessian.dtype == torch.float32 else hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs never active: independent, unit curvature
    H[dead, dead] = 1
    Hinv = inverse_cholesky_(H, damp)
    prior = None if keep is None else keep.to(torch.bool)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)  # True: pruned
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None and sparsity > 0:
            score = W1**2 / d[None, :] ** 2
            if prior is not None:
                score = score.masked_fill(~prior[:, i1:i2], -1.0)  # already gone: first
            k = int(score.numel() * sparsity)
            if k > 0:
                flat = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
                flat[score.flatten().argsort()[:k]] = True
                mask1 = flat.reshape(score.shape)
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
                if prior is not None:
                    score = score.masked_fill(~prior[:, i1 + i : i1 + i + m], -1.0)
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            if prior is not None:
                mask1[:, i] |= ~prior[:, i1 + i]
            c = i1 + i
            if group_size is not None and c % group_size == 0:
                # the group's grid from its columns as they are now (error-updated), pruned
                # entries included as zeros: 0 is on an integer-zero-point grid
                cols_now = W1[:, i : i + group_size].clone()
                cols_now[mask1[:, i : i + group_size]] = 0
                s_, mn, quant = rtn_int4_grid(cols_now, zero_point="integer")
                scales[:, c // group_size] = s_  # type: ignore[index]
                mins[:, c // group_size] = mn  # type: ignore[index]
            q = w.clone()
            q[mask1[:, i]] = 0
            if quant is not None:
                code, q = quant(q)
                codes[:, c] = code.to(torch.uint8)  # type: ignore[index]
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0.0  # exactly zero (the lazy updates touched later columns only)
    int4 = None if codes is None else (codes, scales, mins)
    return W, ~mask, int4  # type: ignore[return-value]
