"""Refit the layers that read pruned channels, by least squares on calibration data.

After channel pruning a layer reading the pruned channels (an MLP's down projection, an
attention's output projection, the convolution after a pruned one) sees fewer inputs. Its
weight, cut to the kept columns, is no longer the best it can do: the weight that reproduces
its original output from the inputs it has left is a least-squares problem with a closed form,
``W' = W C^T (G + damp I)^-1`` with ``G = X^T X`` its inputs in the pruned model and
``C = X^T X_ref`` against its inputs in the original one, on the same calibration data. With
the original inputs restricted to the kept ones (nothing else changed) this is the structured
OBS update of SlimGPT (Ling et al. 2024) and ZipLM (Kurtic et al. 2023): the removed channels'
contribution is spread over the kept ones they correlate with; a bias, where the layer has one,
is refit with it (FLAP's bias compensation, An et al. 2024, as its special case).

Blocks are refit in order, each on the inputs the refit blocks before it produce, against the
original model's own stream (the errors of earlier blocks are compensated too); inside a block,
layer after layer in the order it runs them (a Llama block's output projection before its
down projection, whose inputs depend on it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.modules import is_hf_conv1d
from ..base.snapshot import preserved_state
from ..core.calibrate import LayerStats, batch_count, run_sequential, token_rows
from ..core.report import Report

#: the ridge toward the cut weight, as a fraction of each input column's energy (``diag(X^T X)``)
DAMP = 0.01
#: the ridge strengths :func:`choose_damp` tries
DAMPS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: folds of the calibration batches for that choice
FOLDS = 2


def refittable(m: nn.Module) -> str | None:
    """Why ``m`` cannot be refit, or ``None`` when it can: a float ``nn.Linear`` (or Hugging
    Face ``Conv1D``) or a 2-D convolution without groups that pads with zeros, without a
    sparsity mask."""
    if isinstance(m, nn.Linear) or is_hf_conv1d(m):
        pass
    elif type(m) is nn.Conv2d:
        if m.groups != 1:
            return "a grouped convolution (each output reads its own channels)"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return "a convolution with padding other than explicit zeros"
    else:
        return f"a {type(m).__name__} (only Linear and Conv2d layers are refit)"
    if not m.weight.dtype.is_floating_point:
        return "its weight is not floating point"
    if "weight_mask" in m._buffers:
        return "it holds a sparsity mask (a refit would fill the zeros)"
    return None


def conv_patches(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 2-D convolution's input ``(N, C, H, W)`` as the rows its flattened weight multiplies:
    ``(N * positions, C * kh * kw)``, the weight's own column order (zero padding)."""
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def patch_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as the rows its weight multiplies: a convolution's unfolded patches
    (``in * kh * kw`` columns, the weight's own order), a Linear's last dimension; a column of
    ones appended for a layer with a bias (refit with it)."""
    if isinstance(m, nn.Conv2d):
        r = conv_patches(m, x)
    else:  # a Linear's tokens (the calibration batch's real ones)
        r = token_rows(x)
    if getattr(m, "bias", None) is not None:
        r = torch.cat([r, r.new_ones(r.shape[0], 1)], dim=1)
    return r


def say_left(report: Report, header: str, left: dict[str, str], hint: str = "") -> None:
    """One note naming the layers ``left`` (path -> why), eight at most, and ``hint``."""
    report.note(
        f"{header} ({len(left)}): "
        + "; ".join(f"{p}: {why}" for p, why in list(left.items())[:8])
        + (" ..." if len(left) > 8 else "")
        + hint
    )


def widths(m: nn.Module) -> tuple[int, int]:
    """``(outputs, inputs)`` of a layer's weight (a Hugging Face ``Conv1D`` stores
    ``(in, out)``; a convolution's inputs are its input channels)."""
    w = m.weight
    return (w.shape[1], w.shape[0]) if is_hf_conv1d(m) else (w.shape[0], w.shape[1])


def _like(old: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    """A new parameter holding ``value`` in ``old``'s dtype, device and ``requires_grad``."""
    t = value.detach().to(device=old.device, dtype=old.dtype).contiguous()
    return nn.Parameter(t, requires_grad=old.requires_grad)


def _flat(m: nn.Module) -> torch.Tensor:
    """The weight (with the bias as a last column) as ``(out, columns)``, in float64."""
    w = m.weight.detach()
    w = (w.t() if is_hf_conv1d(m) else w.reshape(w.shape[0], -1)).double()
    if getattr(m, "bias", None) is not None:
        w = torch.cat([w, m.bias.detach().double()[:, None]], dim=1)
    return w


def _ridge(w_now: torch.Tensor, g: torch.Tensor, yx: torch.Tensor, damp: float) -> torch.Tensor:
    """``argmin ||X W'^T - Y||^2 + ||(W' - W_now) D||^2``, ``D^2 = damp diag(G)``, from
    ``G = X^T X`` and ``yx = Y^T X``."""
    lam = damp * g.diagonal().clamp_min(1e-12 * g.diagonal().mean().clamp_min(1e-30))
    damped = g.clone()
    damped.diagonal().add_(lam)
    return torch.linalg.solve(damped, (yx + w_now * lam).t()).t()


def _sq_error(a: torch.Tensor, g: torch.Tensor, yx: torch.Tensor, energy: float) -> float:
    """``||X a^T - Y||^2`` from the sums (``energy = ||Y||^2``)."""
    e = (a @ g * a).sum() - 2 * (a * yx).sum() + energy
    return float(e.clamp_min(0))


def choose_damp(
    w_now: torch.Tensor, folds: list[dict[str, Any]]
) -> tuple[float | None, float, float]:
    """The ridge strength of :data:`DAMPS` whose fits, each on all folds but one, best
    reproduce the fold left out (cross-validation over the calibration batches), or ``None``
    when the cut weight itself does better there (a refit would only fit the calibration
    data). Each fold: ``gram`` (``X^T X``), ``yx`` (``Y^T X``, ``Y`` the unpruned layer's
    output) and ``energy`` (``||Y||^2``). Returns the strength with the held-out relative
    errors of the cut weight and of that fit."""
    parts = [
        {"gram": f["gram"].double(), "yx": f["yx"].double(), "energy": float(f["energy"])}
        for f in folds
    ]
    total_g = sum(f["gram"] for f in parts)
    total_yx = sum(f["yx"] for f in parts)
    energy = max(sum(f["energy"] for f in parts), 1e-30)
    now = sum(_sq_error(w_now, f["gram"], f["yx"], f["energy"]) for f in parts)
    best, best_err = None, now
    for damp in DAMPS:
        err = 0.0
        for f in parts:
            fit = _ridge(w_now, total_g - f["gram"], total_yx - f["yx"], damp)
            err += _sq_error(fit, f["gram"], f["yx"], f["energy"])
        if err < best_err - 1e-9 * energy:  # better by more than rounding
            best, best_err = damp, err
    return best, (now / energy) ** 0.5, (best_err / energy) ** 0.5


def solve(
    w_now: torch.Tensor,
    gram: torch.Tensor,
    yx: torch.Tensor,
    energy: float,
    damp: float = DAMP,
) -> tuple[torch.Tensor, float, float]:
    """The weight ``W'`` minimising ``||X W'^T - Y||^2 + ||(W' - W_now) D||^2`` from
    ``gram = X^T X``, ``yx = Y^T X`` and ``energy = ||Y||^2`` (``Y``: what the unpruned layer
    computed, ``X``: the inputs the pruned one gets), with ``D^2 = damp * diag(gram)``: a
    ridge toward the cut weight ``w_now``, each input column damped by its own energy (so the
    fit is the same whatever the columns' scales; a few massive activation channels do not
    damp the rest away).

    Returns ``(W', before, after)``: the relative output error on the calibration data of
    ``w_now`` (the pruned weight as it is) and of ``W'``. Where the refit is not better
    (rounding), ``w_now`` is returned.
    """
    g, t = gram.double(), yx.double()
    w = _ridge(w_now, g, t, damp)
    energy = max(float(energy), 1e-30)

    def rel(a: torch.Tensor) -> float:
        return (_sq_error(a, g, t, energy) / energy) ** 0.5

    before, after = rel(w_now), rel(w)
    if not after < before:
        return w_now, before, before
    return w, before, after


def cross_validated(
    w_now: torch.Tensor, whole: dict[str, Any], folds: list[dict[str, Any]]
) -> tuple[torch.Tensor, float, float, float | None]:
    """The refit of :func:`choose_damp`'s strength over ``folds``, solved on ``whole`` (each
    a dict of ``gram``, ``yx``, ``energy``). Returns ``(W', before, after, damp)``: the
    held-out relative errors of ``w_now`` and of the fit at that strength, and the strength;
    ``(w_now, before, before, None)`` where no fit does better (held out, or on the whole)."""
    chosen, before, after = choose_damp(w_now, folds)
    if chosen is None:
        return w_now, before, before, None
    w, _, _ = solve(w_now, whole["gram"], whole["yx"], whole["energy"], chosen)
    if w is w_now:  # not better on all the data after all: nothing changed
        return w_now, before, before, None
    return w, before, after, chosen


def _target_sums(sums: dict[str, torch.Tensor], keep: torch.Tensor | None) -> dict[str, Any]:
    """``gram``, ``yx`` and ``energy`` from the block runner's output sums (``cross_out``:
    ``X^T Y`` over every output of the unpruned layer, ``out_sq``: ``||Y_j||^2`` per output),
    restricted to the outputs ``keep`` (the rows the pruned layer kept, in its order)."""
    cross, sq = sums["cross_out"], sums["out_sq"]
    if keep is not None:
        keep = keep.to(cross.device)
        cross, sq = cross[:, keep], sq[keep]
    return {"gram": sums["gram"], "yx": cross.t(), "energy": float(sq.double().sum())}


def refit_readers(
    model: nn.Module,
    original: nn.Module,
    paths: list[str],
    batches: list[Any],
    report: Report | None = None,
    damp: float | None = None,
    rows: dict[str, torch.Tensor] | None = None,
) -> dict[str, tuple[float, float, float | None]]:
    """Refit the layers at ``paths`` in ``model`` (pruned) so that each reproduces, on
    ``batches``, what the layer at the same path in ``original`` computed there; block by
    block (see the module's docstring). Each path must be :func:`refittable` in both models.
    ``rows``: for a layer that also lost outputs, the original output rows it keeps (in its
    order), which its refit reproduces.

    ``damp``: the ridge strength toward the cut weight; ``None`` (the default) chooses it per
    layer by cross-validation over the batches (:func:`choose_damp`, two folds), keeping the
    cut weight where no refit reproduces the held-out batches better. With a single batch,
    :data:`DAMP`.

    Returns path -> ``(before, after, damp)``: the relative output error with the cut weight
    and with the refit one (on the held-out folds when chosen by cross-validation, else on the
    calibration data) and the ridge strength used (``None``: the cut weight kept); with
    ``report``, a summary is noted there.
    """
    named = dict(model.named_modules())
    out: dict[str, tuple[float, float, float | None]] = {}
    few: dict[str, str] = {}
    # every process the same: the batch count over all of them (statistics are summed)
    folds = FOLDS if damp is None and batch_count(len(batches)) >= FOLDS else 0

    def process(part: list[str], stats: dict[str, LayerStats]) -> None:
        for p in part:
            st = stats[p]
            if st.gram is None or "cross_out" not in st.extra or "out_sq" not in st.extra:
                few[p] = "the calibration data did not reach it"
                continue
            m = named[p]
            if st.extra.get("unpaired"):
                few[p] = "it ran on different tokens in the pruned and the unpruned model"
                continue
            if st.rows < st.gram.shape[0]:  # the fit would memorise the calibration data
                few[p] = f"{st.rows} calibration rows for {st.gram.shape[0]} weight columns"
                continue
            w_now = _flat(m)
            keep = rows.get(p) if rows is not None else None
            whole = _target_sums({"gram": st.gram, **st.extra}, keep)
            parts = st.extra.get("folds") or []
            if folds and len(parts) == folds and all(parts):
                fits = [_target_sums(f, keep) for f in parts]
                w, before, after, chosen = cross_validated(w_now, whole, fits)
                out[p] = (before, after, chosen)
            else:
                d = DAMP if damp is None else damp
                w, before, after = solve(w_now, whole["gram"], whole["yx"], whole["energy"], d)
                out[p] = (before, after, d if w is not w_now else None)
            if w is w_now:
                continue
            # new tensors, never written in place: the tensors Prune left may be the
            # original model's own (a bias whose outputs were kept), which a rollback restores
            has_bias = getattr(m, "bias", None) is not None
            weight = w[:, :-1] if has_bias else w
            weight = weight.t() if is_hf_conv1d(m) else weight.reshape(m.weight.shape)
            m.weight = _like(m.weight, weight)
            if has_bias:
                m.bias = _like(m.bias, w[:, -1])

    with preserved_state(original):
        run_sequential(
            model,
            batches,
            {p: named[p] for p in paths},
            process,
            gram=True,
            true_sequential=True,
            reference=original,
            rows_of=patch_rows,
            folds=folds,
            targets=True,
        )
    if report is not None and few:
        say_left(
            report,
            "not refit",
            few,
            " (more calibration data: at least as many input rows, tokens or pixels, as the "
            "layer has weight columns)",
        )
    if report is not None and out:
        done = [v for v in out.values() if v[2] is not None]
        kept = len(out) - len(done)
        where = "held-out calibration batches" if folds else "calibration data"
        text = f"refit {len(done)} layers reading pruned channels by least squares"
        if done:
            before = sum(v[0] for v in done) / len(done)
            after = sum(v[1] for v in done) / len(done)
            text += (
                f": their output error against the unpruned model on the {where} "
                f"{before:.4f} -> {after:.4f} (mean relative error)"
            )
        if kept:
            text += (
                f"; {kept} kept their cut weights (no refit reproduced the held-out batches better)"
            )
        report.note(text)
    return out
