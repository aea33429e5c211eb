"""Statistics from calibration batches: input activation norms, Gram matrices, gradients.

Data-aware transforms (Wanda and Taylor importance, GPTQ, activation-aware factorization) need
statistics of what flows through each layer. :func:`collect` runs the calibration batches once
and gathers, per selected layer, what was asked for. The model's parameters, gradients and modes
are left as they were.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.blocks import block_of
from ..base.inputs import (
    Inputs,
    first_tensor,
    forward_error,
    is_hidden_state,
    per_token,
    real_tokens,
)
from ..base.modules import is_hf_conv1d
from ..base.snapshot import preserved_state

__all__ = ["LayerStats", "collect", "layer_input_dim", "reduce_across_processes"]

_REDUCE = [False]
#: the real tokens of the calibration batch running now (``Inputs.token_mask``): statistics
#: of per-token inputs leave the padded positions out
_TOKENS: list[torch.Tensor | None] = [None]


@contextlib.contextmanager
def _tokens(mask: torch.Tensor | None) -> Iterator[None]:
    """Statistics gathered inside see only the tokens ``mask`` marks real."""
    prev = _TOKENS[0]
    _TOKENS[0] = mask
    try:
        yield
    finally:
        _TOKENS[0] = prev


@contextlib.contextmanager
def batch_tokens(batch: Inputs, model: nn.Module | None = None) -> Iterator[None]:
    """Statistics and :func:`calibration_loss` computed inside see ``batch``'s real tokens
    only (:meth:`~nnslim.base.inputs.Inputs.token_mask`)."""
    with _tokens(batch.token_mask(model)):
        yield


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """A per-token input as rows ``(tokens, channels)``: its last dim the channels, the
    padded positions of the calibration batch running now left out."""
    return real_tokens(x, _TOKENS[0]).reshape(-1, x.shape[-1])


@contextlib.contextmanager
def reduce_across_processes() -> Iterator[None]:
    """Sum calibration statistics over all ``torch.distributed`` processes while active.

    Each process runs its own share of the calibration batches; the statistics every
    transform sees are the totals, so every process computes the same result.
    """
    _REDUCE[0] = True
    try:
        yield
    finally:
        _REDUCE[0] = False


_PAIRED = ("cross", "ref_gram", "cross_out", "out_sq")


def _agree_on_pairs(st: LayerStats) -> None:
    """Make a layer's paired sums (:func:`_cross_stats`) the same set on every process
    before they are summed: unpaired on one process (its two streams ran on different
    tokens there) is unpaired everywhere, its paired sums dropped; a fold one process saw
    no batch of is zeros there (every process then reduces the same tensors, in order)."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if st.extra.get("unpaired") else 0.0], dtype=torch.float64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        st.extra["unpaired"] = True
        for name in (*_PAIRED, "folds"):
            st.extra.pop(name, None)
        return
    totals = {n: st.extra[n] for n in _PAIRED if isinstance(st.extra.get(n), torch.Tensor)}
    if st.gram is not None:
        totals["gram"] = st.gram
    for fold in st.extra.get("folds") or []:
        for name, total in totals.items():
            if name not in fold:
                fold[name] = torch.zeros_like(total)


def _reduce(stats: dict[str, LayerStats]) -> None:
    if not _REDUCE[0]:
        for st in stats.values():
            st.extra.pop("paired", None)
        return
    import torch.distributed as dist

    for st in stats.values():
        if st.extra.pop("paired", False):
            _agree_on_pairs(st)
        for name in ("sq_sum", "gram", "grad"):
            t = getattr(st, name)
            if t is not None:
                dist.all_reduce(t)
        rows = torch.tensor([st.rows], dtype=torch.float64)
        dist.all_reduce(rows)
        st.rows = int(rows.item())
        if "amax" in st.extra:
            dist.all_reduce(st.extra["amax"], op=dist.ReduceOp.MAX)
        for name in (
            "cross",
            "ref_gram",
            "cross_out",
            "out_sq",
            "out_grad_sq",
            "out_rows",
            "counts",
            "in_fisher",
            "samples",
        ):
            if isinstance(st.extra.get(name), torch.Tensor):
                dist.all_reduce(st.extra[name])
        for fold in st.extra.get("folds") or []:
            for name in sorted(fold):  # the same order on every process
                dist.all_reduce(fold[name])
        if "abs_sum" in st.extra and isinstance(st.extra["abs_sum"], torch.Tensor):
            dist.all_reduce(st.extra["abs_sum"])
        if "rows" in st.extra:  # a row sample: everyone uses rank 0's
            obj = [st.extra["rows"]]
            dist.broadcast_object_list(obj, src=0)
            st.extra["rows"] = obj[0]


def batch_count(n: int) -> int:
    """The number of calibration batches over every process (``n`` on this one) while
    statistics are summed across processes (:func:`reduce_across_processes`), else ``n``."""
    if not _REDUCE[0]:
        return n
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


@dataclass
class LayerStats:
    """Statistics of one layer over the calibration data.

    Attributes:
        sq_sum: per input channel, the sum of squared inputs (``||X_j||^2``).
        gram: ``X^T X`` over all input rows (``in x in``), if requested (Linear-like only).
        grad: gradient of the calibration loss with respect to the weight, summed over batches.
        rows: number of input rows (tokens, or pixels for convolutions) seen.
    """

    sq_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_norm(self) -> torch.Tensor | None:
        """``||X_j||_2`` per input channel."""
        return None if self.sq_sum is None else self.sq_sum.sqrt()


def layer_input_dim(m: nn.Module) -> int | None:
    """The input-channel count of a Linear, convolution or Hugging Face Conv1D."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels
    if is_hf_conv1d(m):
        return m.weight.shape[0]
    return None


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of input channels: ``(rows, in)``."""
    if isinstance(m, nn.modules.conv._ConvNd):
        # (N, C, *spatial) -> (N * spatial, C); channels seen by the conv
        return x.transpose(0, 1).reshape(x.shape[1], -1).t()
    return token_rows(x)


def calibration_loss(
    output: Any, targets: tuple[Any, ...], *, sample: int | None = None
) -> torch.Tensor:
    """The loss Taylor importance and Auto's K-FAC statistics differentiate.

    The model's own loss when its output carries one (a Hugging Face model given ``labels``:
    for a causal LM, the next-token loss); cross-entropy against the labels when the batch
    carried integer labels shaped like the output's leading dims; otherwise cross-entropy
    against the model's own predictions (self-labelling), or the mean square of a non-logit
    output.

    With ``sample`` (a seed; for squared output gradients, not for first-order importance), an
    output that is a hidden state or an embedding (an encoder's ``last_hidden_state``: see
    :func:`~nnslim.base.inputs.is_hidden_state`) is instead matched to a Gaussian target drawn
    around itself: the loss is the squared error's, and its squared output gradient is, in
    expectation, the Gauss-Newton diagonal (how much the output moves, each direction alike),
    where a cross-entropy over hidden units would weigh them by a softmax they never go
    through.
    """
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor) and own.dim() == 0:
        return own.float()
    out = first_tensor(output)
    if out is None:
        raise ValueError("the model output holds no tensor to compute a calibration loss from")
    if sample is not None and is_hidden_state(output):
        # 1/2 mean (out - (out + eps))^2 has the gradient -eps / numel (over real tokens)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(sample))
        noise = noise.to(out.device)
        mask = _TOKENS[0]
        if per_token(out, mask):
            keep = mask.to(out.device).reshape(*mask.shape, *([1] * (out.dim() - 2)))
            noise = noise * keep
            return (out.float() * noise).sum() / (int(mask.sum()) * out[0, 0].numel())
        return (out.float() * noise).sum() / out.numel()
    out = out.float()
    y = targets[0] if targets and isinstance(targets[0], torch.Tensor) else None
    mask = _TOKENS[0]
    if per_token(out, mask):
        # padded positions are no one's prediction: out of the loss (and their labels)
        if y is not None and tuple(y.shape[:2]) == tuple(mask.shape):
            y = real_tokens(y.unsqueeze(-1) if y.dim() == 2 else y, mask)
        out = real_tokens(out, mask)
    if out.dim() >= 2 and out.shape[-1] > 1:
        logits = out.reshape(-1, out.shape[-1])
        if y is not None and not y.is_floating_point() and y.numel() == logits.shape[0]:
            labels = y.reshape(-1).to(logits.device)
        else:
            labels = logits.detach().argmax(-1)
        return F.cross_entropy(logits, labels)
    return out.pow(2).mean()


def collect(
    model: nn.Module,
    batches: Iterable[Inputs],
    layers: dict[str, nn.Module],
    *,
    norms: bool = False,
    gram: bool = False,
    grads: bool = False,
    out_grads: bool = False,
    in_fisher: bool = False,
) -> dict[str, LayerStats]:
    """Run the calibration batches and gather statistics for ``layers`` (path -> module).

    Args:
        model: the model (left unchanged: its ``.grad`` fields and modes are restored).
        batches: calibration inputs.
        layers: the layers to watch.
        norms: per-input-channel sums of squares (Wanda).
        gram: ``X^T X`` (GPTQ, activation-aware factorization); for a convolution over its
            input channels, summed over every position; for an ``nn.Embedding`` (one-hot
            inputs, a diagonal Gram) each token's count, in ``stats.extra["counts"]``.
        grads: weight gradients of :func:`calibration_loss` (Taylor).
        out_grads: per output channel, the sum over rows of the squared gradient of
            :func:`calibration_loss` with respect to the layer's output, in
            ``stats.extra["out_grad_sq"]`` (the output factor of a K-FAC Fisher).
        in_fisher: per sample (a row of a Linear's input, an image of a convolution's),
            ``z_c = sum over positions of x_c * dL/dx_c``, the gradient taken through this
            layer alone, and ``sum over samples of z z^T`` (``in x in``) in
            ``stats.extra["in_fisher"]``, the samples in ``stats.extra["samples"]``: the
            empirical Fisher of removing input channels (Fisher pruning, Theis et al. 2018),
            where zeroing channels ``S`` changes the loss by about
            ``1/2 * samples / B^2 * 1_S^T F 1_S`` over ``B`` batches.
    """
    stats = {p: LayerStats() for p in layers}
    aliases: list[tuple[str, torch.Tensor]] = []  # this batch's inputs, as each layer reads them
    handles = (
        [_stat_hook(m, stats[path], norms, gram, 0) for path, m in layers.items()]
        if norms or gram
        else []
    )
    if out_grads:
        handles += [_out_grad_hook(m, stats[path]) for path, m in layers.items()]
    if in_fisher:
        handles += [_alias_hook(m, path, aliases) for path, m in layers.items()]
    saved_grads = {id(p): p.grad for p in model.parameters()}
    try:
        with preserved_state(model):
            for i, batch in enumerate(batches):
                with batch_tokens(batch, model):  # its real tokens, in the backward too
                    if grads or out_grads or in_fisher:
                        aliases.clear()
                        with torch.enable_grad():
                            for p in model.parameters():
                                p.grad = None
                            loss = calibration_loss(
                                call_batch(model, batch, i),
                                batch.targets,
                                sample=i if out_grads and not grads else None,
                            )
                            # the weights' gradients (the outputs' hooks fire on the way to them)
                            watched = [
                                (p, m.weight) for p, m in layers.items() if m.weight.requires_grad
                            ]
                            if not watched:
                                raise ValueError(
                                    "calibration: the gradients it needs flow to no layer (every "
                                    "watched layer's weight has requires_grad=False); unfreeze "
                                    "them for the measurement."
                                )
                            gs = torch.autograd.grad(
                                loss,
                                [w for _, w in watched] + [a for _, a in aliases],
                                allow_unused=True,
                            )
                        for (path, a), g in zip(aliases, gs[len(watched) :], strict=True):
                            if g is not None:
                                _add_in_fisher(stats[path], layers[path], a.detach(), g.detach())
                        gs = gs[: len(watched)]
                        if not grads:
                            continue
                        for (path, _), g in zip(watched, gs):
                            if g is not None:
                                st = stats[path]
                                st.grad = g.detach() if st.grad is None else st.grad + g.detach()
                    else:
                        with torch.no_grad():
                            call_batch(model, batch, i)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = saved_grads.get(id(p))
    _reduce(stats)
    return stats


def collect_backward(
    block: nn.Module,
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
    layers: dict[str, nn.Module],
    out_grads: list[torch.Tensor],
    in_fisher: bool = False,
    masks: list[torch.Tensor | None] | None = None,
) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """:func:`collect` (``gram=True, out_grads=True``, and ``in_fisher`` if asked) for the
    layers of one block of a model, given the loss's gradient at the block's output: the
    block runs on each batch's inputs (``args[0]`` its hidden state), the given gradient
    flows back through it, and the layers' statistics are what :func:`collect` would gather
    in the whole model for the same loss. Returns them, and the gradient at the block's input
    (the previous block's output gradient): a model streamed block by block, backwards.
    ``masks``: each batch's real tokens (:meth:`~nnslim.base.inputs.Inputs.token_mask`).
    """
    stats = {p: LayerStats() for p in layers}
    handles = [_stat_hook(m, stats[p], False, True, 0) for p, m in layers.items()]
    handles += [_out_grad_hook(m, stats[p]) for p, m in layers.items()]
    aliases: list[tuple[str, torch.Tensor]] = []
    if in_fisher:
        handles += [_alias_hook(m, p, aliases) for p, m in layers.items()]
    back: list[torch.Tensor] = []
    try:
        with preserved_state(block), torch.enable_grad():
            for i, ((args, kwargs), g) in enumerate(zip(inputs, out_grads, strict=True)):
                aliases.clear()
                with _tokens(masks[i] if masks else None):
                    x = args[0].detach().requires_grad_(True)
                    out = block(x, *args[1:], **kwargs)
                    y = out[0] if isinstance(out, (tuple, list)) else out
                    gx, *ga = torch.autograd.grad(
                        y,
                        [x, *(a for _, a in aliases)],
                        grad_outputs=g.to(y.dtype),
                        allow_unused=True,
                    )
                    for (path, a), ag in zip(aliases, ga, strict=True):
                        if ag is not None:
                            _add_in_fisher(stats[path], layers[path], a.detach(), ag.detach())
                back.append(gx.detach())
    finally:
        for h in handles:
            h.remove()
    _reduce(stats)
    return stats, back


def _alias_hook(m: nn.Module, path: str, into: list[tuple[str, torch.Tensor]]) -> Any:
    """Hand ``m`` a view of its input whose gradient is the one through ``m`` alone."""

    def hook(_mod: nn.Module, args: Any) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return None
        x = args[0].view_as(args[0])
        into.append((path, x))
        return (x, *args[1:])

    return m.register_forward_pre_hook(hook)


def _add_in_fisher(st: LayerStats, m: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    """Add one batch's ``sum over samples of z z^T`` (see :func:`collect`'s ``in_fisher``)."""
    z = x.float() * g.float()
    if isinstance(m, nn.modules.conv._ConvNd):  # per image: summed over its positions
        z = z.flatten(2).sum(2)
    else:  # per row (real tokens): a Linear's channels are the last dim
        z = token_rows(z)
    f = z.t() @ z
    prev = st.extra.get("in_fisher")
    st.extra["in_fisher"] = f if prev is None else prev + f
    n = torch.tensor(float(z.shape[0]), dtype=torch.float64, device=f.device)
    st.extra["samples"] = n + st.extra.get("samples", 0.0)


def _out_grad_hook(m: nn.Module, st: LayerStats) -> Any:
    """Accumulate ``sum over rows of (dL/dy)^2`` per output channel of ``m`` in
    ``st.extra["out_grad_sq"]`` (rows: tokens, or positions of a convolution), and the rows
    counted in ``st.extra["out_rows"]``."""
    conv = isinstance(m, nn.modules.conv._ConvNd)

    def hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        y = first_tensor(out)
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return

        mask = _TOKENS[0]  # the batch's, at forward time (the backward runs later)

        def grad_hook(g: torch.Tensor) -> None:
            g = g.detach().float()
            # a convolution's channels are dim 1; a Linear's the last, whatever the rank (a
            # Linear over an NHWC image, as ConvNeXt's and Swin's MLPs are, is 4-D too)
            rows = (
                g.transpose(0, 1).reshape(g.shape[1], -1).t()
                if conv
                else real_tokens(g, mask).reshape(-1, g.shape[-1])
            )
            sq = rows.pow(2).sum(0)
            prev = st.extra.get("out_grad_sq")
            st.extra["out_grad_sq"] = sq if prev is None else prev + sq
            n = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=sq.device)
            st.extra["out_rows"] = n + st.extra.get("out_rows", 0.0)

        y.register_hook(grad_hook)

    return m.register_forward_hook(hook)


# -- block-sequential calibration -------------------------------------------------------------
class _Stop(Exception):
    pass


def call_batch(model: nn.Module, batch: Inputs, index: int) -> Any:
    """``model`` on calibration batch ``index``; a forward that fails (a batch of the wrong
    shape) raises a ``ValueError`` naming the batch. nnslim's own errors pass unchanged."""
    try:
        with batch_tokens(batch, model):
            return batch.call_stateless(model)
    except (_Stop, ValueError, TypeError):
        raise
    except Exception as e:
        raise forward_error(model, batch, e, f"calibration batch {index}") from e


def _replace_first(args: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
    return (value, *args[1:]) if args else args


def run_sequential(
    model: nn.Module,
    batches: list[Inputs],
    layers: dict[str, nn.Module],
    process: Any,
    *,
    norms: bool = False,
    gram: bool = False,
    rows: int = 0,
    true_sequential: bool = False,
    reference: bool | nn.Module = False,
    rows_of: Any = None,
    folds: int = 0,
    targets: bool = False,
) -> None:
    """Calibrate ``layers`` block by block, calling ``process(paths, stats)`` after each block.

    Layers are grouped by their repeated block (a transformer layer, a ResNet stage...). The
    statistics of a block's layers are gathered with every earlier block already processed
    (quantized), as GPTQ prescribes, and only one block's statistics are held at a time.
    Consecutive blocks of one container are fed the previous block's outputs directly; the
    rest runs the model up to the block.

    With ``true_sequential`` the layers inside a block are processed in the order the block
    runs them, those that read the same input together (a Llama block: q/k/v, then o, then
    gate/up, then down), each group's statistics gathered with the groups before it already
    processed: the block runs once per group.

    Args:
        model: the model.
        batches: calibration inputs.
        layers: path -> layer to calibrate.
        process: ``process(paths, stats)``: may replace the layers (the block object stays).
        norms, gram: statistics to gather (see :func:`collect`).
        rows: keep up to this many input rows per layer in ``stats.extra["rows"]``.
        true_sequential: inside a block, layer group after layer group.
        reference: also run an unprocessed copy of each block on the unprocessed model's
            inputs (a second stream beside the processed one; a batch's ``original``, where
            set, is that stream's input to ``model``) and give each layer
            ``stats.extra["cross"] = X^T X_ref``, its inputs against the inputs it had in the
            original model, for the same tokens (a refit toward the original outputs), and
            ``stats.extra["ref_gram"] = X_ref^T X_ref``. Where
            the unprocessed inputs are not at hand (a block the previous one does not feed),
            ``X_ref`` is the processed stream's own. A module instead of ``True``: the
            unprocessed model itself (a copy taken before the layers changed shape, with the
            same module paths), run beside ``model``: its blocks are the reference, also for
            layers outside blocks, and the two streams may differ in width.
        rows_of: ``rows_of(layer, x)``: the layer's input as rows for the statistics
            (default: :func:`_rows`, input channels; a refit of a convolution's weight needs
            its unfolded patches).
        folds: with a reference, also each fold's sums (see :func:`_cross_stats`).
        targets: with a reference, instead of ``cross`` and ``ref_gram``, the sums against
            the unprocessed layer's *outputs* ``Y`` for the same tokens:
            ``stats.extra["cross_out"] = X^T Y`` (``in x out``) and ``stats.extra["out_sq"]``,
            ``||Y_j||^2`` per output (what a refit toward the original output needs, and no
            more: smaller than ``X_ref``'s sums when a layer has fewer outputs than the
            reference's inputs, and no unfolding of the reference's patches).
    """
    rows_of = rows_of or _rows
    ref_model = reference if isinstance(reference, nn.Module) else None
    masks = [b.token_mask(model) for b in batches]  # each batch's real tokens, in order
    # the unprocessed stream's inputs, where the batches carry them (streamed compression)
    originals = (
        [b.original if b.original is not None else b for b in batches]
        if any(b.original is not None for b in batches)
        else batches
    )
    named = dict(model.named_modules())
    order = {p: i for i, p in enumerate(named)}
    groups: dict[str | None, list[str]] = {}
    for p in sorted(layers, key=lambda p: order[p]):
        b = block_of(p, named)
        groups.setdefault(b if b is not None else p, []).append(p)
    keys = list(groups)
    cached: list[tuple[tuple[Any, ...], dict[str, Any]]] | None = None
    ref_cached: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    with preserved_state(model):
        for gi, key in enumerate(keys):
            paths = groups[key]
            block = named.get(key) if key is not None and key not in layers else None
            # a layer outside any block is its own "block" when the reference is a model
            here = block if block is not None else named[key] if ref_model is not None else None
            with_ref = reference is not False and here is not None
            in_order = true_sequential and block is not None and len(paths) > 1
            if (in_order or with_ref) and here is not None:
                if cached is None:
                    cached = inputs_of(model, batches=batches, module=here)
                    # the streams part from here on (each from its own inputs, where the
                    # batches carry the unprocessed stream's: a block compressed alone)
                    if with_ref and ref_model is not None:
                        ref_cached = inputs_of(
                            ref_model, batches=originals, module=ref_model.get_submodule(key)
                        )
                    elif with_ref and originals is not batches:
                        ref_cached = inputs_of(model, batches=originals, module=here)
                    else:
                        ref_cached = cached
                dense = None
                if with_ref:
                    dense = (
                        copy.deepcopy(here) if ref_model is None else ref_model.get_submodule(key)
                    )
                parts = _by_shared_input(here, paths, named, cached[0]) if in_order else [paths]
                for part in parts:
                    stats = {p: LayerStats() for p in part}
                    if dense is not None:
                        _cross_stats(
                            here,
                            dense,
                            part,
                            named,
                            stats,
                            cached,
                            ref_cached,
                            norms,
                            gram,
                            rows,
                            rows_of,
                            folds,
                            masks,
                            targets,
                        )
                    else:
                        handles = [
                            _stat_hook(named[p], stats[p], norms, gram, rows, rows_of) for p in part
                        ]
                        try:
                            with torch.no_grad():
                                for i, (a, k) in enumerate(cached):
                                    with _tokens(masks[i]):
                                        here(*a, **k)
                        finally:
                            for h in handles:
                                h.remove()
                    _reduce(stats)
                    process(part, stats)
                if dense is not None and block is not None:
                    ref_cached = block_outputs(dense, ref_cached)
                del dense
            else:
                stats = {p: LayerStats() for p in paths}
                handles = [
                    _stat_hook(named[p], stats[p], norms, gram, rows, rows_of) for p in paths
                ]
                try:
                    if block is not None and cached is not None:
                        with torch.no_grad():
                            for i, (a, k) in enumerate(cached):
                                with _tokens(masks[i]):
                                    block(*a, **k)
                    else:
                        cached = inputs_of(
                            model,
                            batches=batches,
                            module=block if block is not None else named[key],
                            run=True,
                        )
                finally:
                    for h in handles:
                        h.remove()
                _reduce(stats)
                process(paths, stats)
            nxt = keys[gi + 1] if gi + 1 < len(keys) else None
            if (
                block is not None
                and cached is not None
                and nxt is not None
                and _consecutive(key, nxt, named)
            ):
                cached = block_outputs(block, cached)
            else:
                cached = None


def block_outputs(
    block: nn.Module, cached: list[tuple[tuple[Any, ...], dict[str, Any]]]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The next block's cached inputs: for each batch, ``block``'s output in place of its
    first argument (the other arguments, a block's masks and positions, kept)."""
    after = []
    with torch.no_grad():
        for a, k in cached:
            out = block(*a, **k)
            out = out[0] if isinstance(out, (tuple, list)) else out
            after.append((_replace_first(a, out), k))
    return after


def _cross_stats(
    block: nn.Module,
    dense: nn.Module,
    paths: list[str],
    named: dict[str, nn.Module],
    stats: dict[str, LayerStats],
    cached: list[tuple[tuple[Any, ...], dict[str, Any]]],
    ref_cached: list[tuple[tuple[Any, ...], dict[str, Any]]],
    norms: bool,
    gram: bool,
    rows: int,
    rows_of: Any = None,
    folds: int = 0,
    masks: list[torch.Tensor | None] | None = None,
    targets: bool = False,
) -> None:
    """The block's statistics on the processed stream, plus ``extra["cross"]`` per layer:
    its processed-stream inputs against its unprocessed copy's inputs, batch by batch.
    ``block`` may be a layer of ``paths`` itself (``dense`` its unprocessed twin). With
    ``folds``, ``extra["folds"]``: the ``gram``/``cross``/``ref_gram`` of each fold of batches
    (batch ``i`` in fold ``i % folds``), for a fit checked on data it did not see. A layer
    that ran a different number of times or on a different number of rows in the two streams
    gets ``extra["unpaired"] = True`` (its cross sums would pair different tokens). With
    ``targets``, the unprocessed copy's outputs are paired instead (``cross_out``,
    ``out_sq``: see :func:`run_sequential`)."""
    rows_of = rows_of or _rows
    where = next(p for p, m in named.items() if m is block)

    def twin(p: str) -> nn.Module:
        return dense if p == where else dense.get_submodule(p[len(where) + 1 :])

    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    ref: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    for p in paths:  # sums every process must agree on before they are reduced
        stats[p].extra["paired"] = True

    def tap(store: list[torch.Tensor], m: nn.Module) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                # a copy: the rows may be a view of a tensor the block changes in place
                # later (an in-place activation or residual add) before the sums are taken
                store.append(rows_of(m, args[0].detach()).float().clone())

        return m.register_forward_hook(hook)

    def out_tap(store: list[torch.Tensor], m: nn.Module) -> Any:
        def hook(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            y = first_tensor(out)
            if y is None:
                return
            # per position, its outputs as columns (as :func:`_rows` reads a convolution's
            # input); a copy: the block may change its output in place
            store.append(_rows(m, y.detach().float()).clone())

        return m.register_forward_hook(hook)

    handles = [_stat_hook(named[p], stats[p], norms, gram, rows, rows_of) for p in paths]
    handles += [tap(seen[p], named[p]) for p in paths]
    handles += [(out_tap if targets else tap)(ref[p], twin(p)) for p in paths]
    try:
        with torch.no_grad():
            for i, ((a, k), (ra, rk)) in enumerate(zip(cached, ref_cached, strict=True)):
                with _tokens(masks[i] if masks else None):  # the batch's real tokens
                    block(*a, **k)
                    dense(*ra, **rk)
                for p in paths:
                    x, xr = seen[p], ref[p]
                    if len(x) != len(xr) or any(
                        a.shape[0] != b.shape[0] for a, b in zip(x, xr, strict=False)
                    ):
                        # not the same tokens in both streams (routing that differs): no
                        # pairs to sum; say so (a refit needs every batch's pairs)
                        stats[p].extra["unpaired"] = True
                    elif x:
                        xs, xrs = torch.cat(x), torch.cat(xr)
                        sums = (
                            [("cross_out", xs.t() @ xrs), ("out_sq", xrs.pow(2).sum(0))]
                            if targets
                            else [("cross", xs.t() @ xrs), ("ref_gram", xrs.t() @ xrs)]
                        )
                        for name, t in sums:
                            prev = stats[p].extra.get(name)
                            stats[p].extra[name] = t if prev is None else prev + t
                        if folds:  # the same sums per fold of batches (and the Gram's)
                            part = stats[p].extra.setdefault("folds", [{} for _ in range(folds)])
                            for name, t in [*sums, ("gram", xs.t() @ xs)]:
                                prev = part[i % folds].get(name)
                                part[i % folds][name] = t if prev is None else prev + t
                    x.clear()
                    xr.clear()
    finally:
        for h in handles:
            h.remove()


def _by_shared_input(
    block: nn.Module,
    paths: list[str],
    named: dict[str, nn.Module],
    first: tuple[tuple[Any, ...], dict[str, Any]],
) -> list[list[str]]:
    """``paths`` in groups that read the same input tensor, in the order the block runs them
    (one forward of ``block`` on the ``first`` cached input). A layer the block does not run
    (on this input) comes last, on its own."""
    seen: list[tuple[int, str]] = []  # (input identity, path), in call order
    held: list[Any] = []  # the inputs stay alive, so their ids are not reused meanwhile

    def watch(path: str) -> Any:
        def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            held.append(x)
            if all(p != path for _, p in seen):
                seen.append((id(x), path))

        return named[path].register_forward_pre_hook(pre)

    handles = [watch(p) for p in paths]
    try:
        with torch.no_grad():
            block(*first[0], **first[1])
    finally:
        for h in handles:
            h.remove()
    parts: dict[int, list[str]] = {}
    for ident, path in seen:
        parts.setdefault(ident, []).append(path)
    out = list(parts.values())
    ran = {p for _, p in seen}
    out += [[p] for p in paths if p not in ran]
    held.clear()
    return out


def _consecutive(a: str | None, b: str | None, named: dict[str, nn.Module]) -> bool:
    if a is None or b is None:
        return False
    pa, _, ia = a.rpartition(".")
    pb, _, ib = b.rpartition(".")
    return pa == pb and ia.isdigit() and ib.isdigit() and int(ib) == int(ia) + 1 and b in named


def inputs_of(
    model: nn.Module, module: nn.Module, batches: list[Inputs], *, run: bool = False
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Each batch's inputs to ``module`` (args, kwargs), the model's forward stopped there:
    before ``module`` runs, or with ``run`` just after (hooks on its layers see it run: the
    statistics of a block). A batch whose forward fails raises naming the batch."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        if not run:
            raise _Stop

    def post(*_: Any) -> None:
        raise _Stop

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if run:
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    call_batch(model, batch, i)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return captured


def _stat_hook(
    m: nn.Module, st: LayerStats, norms: bool, gram: bool, keep_rows: int, rows_of: Any = None
) -> Any:
    rows_of = rows_of or _rows

    def hook(_mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        if isinstance(m, nn.Embedding):  # one-hot inputs: the Gram is diagonal, the counts
            ids = x.detach()
            mask = _TOKENS[0]
            ids = (ids[mask] if mask is not None and ids.shape == mask.shape else ids).reshape(-1)
            st.rows += ids.numel()
            n = torch.bincount(ids, minlength=m.num_embeddings).to(torch.float64)
            st.extra["counts"] = n + st.extra.get("counts", 0.0)
            return
        r = rows_of(m, x.detach()).float()
        st.rows += r.shape[0]
        if norms:
            sq = r.pow(2).sum(0)
            st.sq_sum = sq if st.sq_sum is None else st.sq_sum + sq
            amax = r.abs().amax(0)
            prev = st.extra.get("amax")
            st.extra["amax"] = amax if prev is None else torch.maximum(prev, amax)
            st.extra["abs_sum"] = r.abs().sum(0) + st.extra.get("abs_sum", 0)
        if gram:  # a convolution's: over its input channels, at every position
            if st.gram is None:
                st.gram = r.t() @ r
            else:  # in place: no second (in, in) matrix
                st.gram.addmm_(r.t(), r)
        if keep_rows:
            have = st.extra.setdefault("rows", [])
            n = sum(t.shape[0] for t in have)
            if n < keep_rows:
                have.append(r[: keep_rows - n].clone())

    return m.register_forward_hook(hook)
