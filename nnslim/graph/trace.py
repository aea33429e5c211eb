"""``nnslim.trace``: the dependency graph of a model, built on torch-pruning's DependencyGraph.

torch-pruning traces the autograd graph of one forward pass and finds the groups of coupled
layers (a convolution's output channels, the BatchNorm after it, the next convolution's input
channels, residual partners...). :class:`Graph` wraps it with what nnslim needs on top: module
paths, the layers whose outputs reach the model output (never pruned by default), attention
modules with their heads, fixes for torch-pruning on torch 2.x, and bounds so that tracing
never hangs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from ..base.inputs import (
    Inputs,
    as_inputs,
    call_for_analysis,
    forward_error,
    is_meta,
    output_tensors,
    task_tensors,
)
from ..base.modules import shared_parameters
from ..base.snapshot import preserved_state
from .attention import (
    AttentionSpec,
    find_attention,
    probe_config_heads,
    probe_fused_layouts,
    unknown_attention_layers,
)
from .fused_mlp import ExpertBankSpec, FusedMLPSpec, find_expert_banks, find_fused_mlps
from .tp_compat import (
    DependencyGraph,
    GroupTooLarge,
    TraceError,
    conv1d_type,
    customized_pruners,
    sized_split,
    watch_in_place,
)

__all__ = ["Graph", "GroupInfo", "TraceError", "root_types", "trace"]

#: Default bounds: a group larger than this many coupled items, or building groups for longer
#: than this many seconds, ends in a TraceError naming the module.
MAX_GROUP = 20_000
TIME_LIMIT_S = 600.0


def root_types() -> tuple[type, ...]:
    """Layer types whose output channels are the roots of pruning groups."""
    c = conv1d_type()
    base: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)
    return (*base, c) if c is not None else base


@dataclass
class GroupInfo:
    """One group of coupled channels.

    Attributes:
        root: the layer whose output channels define the group.
        channels: how many channels the root has.
        members: ``(path, "out" | "in" | op)`` for every coupled layer.
        group: torch-pruning's group (an escape hatch like :attr:`Graph.dg`: each item's
            ``idxs`` and ``root_idxs`` map the root's channels to the member's indices).
    """

    root: str
    channels: int
    members: list[tuple[str, str]] = field(default_factory=list)
    group: Any = field(default=None, repr=False)


@dataclass
class Graph:
    """The dependency graph of a model.

    Attributes:
        model: the traced model.
        inputs: the example inputs used.
        dg: torch-pruning's ``DependencyGraph`` (an escape hatch; its API is torch-pruning's).
        output_grad_fns: autograd nodes of the traced outputs.
        attention: attention modules found, with their heads.
        fused_mlps: fused gate/up MLPs and mixture-of-experts banks found, with their units.
        fused_mlp_skips: fused gate/up layers whose units nnslim cannot prune, with reasons.
        seconds: time spent tracing.
    """

    model: nn.Module
    inputs: Inputs
    dg: Any
    output_grad_fns: list[Any]
    attention: list[AttentionSpec] = field(default_factory=list)
    fused_mlps: list[FusedMLPSpec | ExpertBankSpec] = field(default_factory=list)
    fused_mlp_skips: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    time_limit: float | None = TIME_LIMIT_S
    shuffles: list[Any] = field(default_factory=list)  # autograd nodes of channel shuffles

    @property
    def paths(self) -> dict[int, str]:
        return {id(m): p for p, m in self.model.named_modules()}

    def layers(self) -> list[str]:
        """Paths of the traced layers (modules that appear in the graph), in model order."""
        traced = {id(m) for m in self.dg.module2node if isinstance(m, nn.Module)}
        return [p for p, m in self.model.named_modules() if id(m) in traced and p]

    def output_layers(self) -> list[str]:
        """Paths of layers whose output channels reach a model output.

        Pruning those would change the output's shape (the classifier, the LM head, the last
        block of a backbone whose features are the output).
        """
        paths = self.paths
        roots = root_types()
        by_fn = {n.grad_fn: n for n in self.dg.module2node.values() if n.grad_fn is not None}
        stack = [by_fn[f] for f in self.output_grad_fns if f in by_fn]
        found: list[str] = []
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            m = node.module
            if isinstance(m, (*roots, nn.Embedding)):
                if id(m) in paths:
                    found.append(paths[id(m)])
                continue
            stack.extend(node.inputs)
        order = {p: i for i, p in enumerate(paths.values())}
        return sorted(set(found), key=lambda p: order.get(p, 0))

    def dynamic_split_roots(
        self, candidates: list[str], fixed_splits: bool = False
    ) -> dict[str, str]:
        """Roots to leave alone, with the reason: groups that pass through a split sized at run
        time (``chunk``, ``split(n)``: it cuts at fixed positions of whatever it receives, so
        unevenly pruned inputs would shift the cut), with ``fixed_splits`` also those through a
        split by a list of sizes (``split(x, [4, 12])``: sizes written in the forward), and
        groups torch-pruning cannot build (an error from inside its index mapping, or a group
        that grows without bound). Each group is built once, from its first root."""
        splits = {
            id(n)
            for n in self.dg.module2node.values()
            # split([a, b]) is not one: its sizes may come from attributes nnslim updates
            # (timm LeViT's key_dim/val_dim); a constant list fails the forward check instead
            if (n.type == tp.ops.OPTYPE.SPLIT and (fixed_splits or sized_split(n.grad_fn)))
            # F.glu halves its input at the middle: torch-pruning maps it channel by channel
            or type(n.grad_fn).__name__.startswith("GluBackward")
        }
        shuffles = {id(f) for f in self.shuffles}
        shuffled = {id(n) for n in self.dg.module2node.values() if id(n.grad_fn) in shuffles}
        named = dict(self.model.named_modules())
        paths = self.paths
        out: dict[str, str] = {}
        done: dict[int, str | None] = {}  # module id -> the reason of the group it is in
        with self.dg.limit(self.time_limit, "checking groups"):
            for p in candidates:
                m = named[p]
                if m not in self.dg.module2node:
                    continue
                if id(m) in done:
                    if done[id(m)] is not None:
                        out[p] = done[id(m)]  # type: ignore[assignment]
                    continue
                pruner = self.dg.get_pruner_of_module(m)
                n = pruner.get_out_channels(m) if pruner is not None else None
                if not n:
                    continue
                try:
                    group = self.dg.get_pruning_group(m, pruner.prune_out_channels, list(range(n)))
                except GroupTooLarge as e:
                    why = (
                        f"its channel group grows without bound in torch-pruning (past "
                        f"{MAX_GROUP} coupled layers: a cycle its index mapping cannot close)"
                    )
                    out[p] = why
                    for mid in e.members:
                        done.setdefault(mid, why)
                    continue
                except (IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                    if not _raised_in_torch_pruning(e):
                        raise
                    out[p] = (
                        f"torch-pruning cannot build its channel group ({type(e).__name__} "
                        f"in its index mapping: {str(e)[:80]})"
                    )
                    continue
                why = None
                if any(id(item.dep.target) in splits for item in group):
                    why = (
                        "feeds torch.chunk/split by size or F.glu, which cannot follow uneven "
                        "pruning"
                        if not fixed_splits
                        else "feeds torch.chunk/split or F.glu (the forward failed with it "
                        "pruned: a split by sizes written in the forward cannot follow)"
                    )
                    out[p] = why
                elif any(id(item.dep.target) in shuffled for item in group):
                    why = (
                        "its channels pass through a channel shuffle (a reshape of the channels "
                        "into groups), which torch-pruning would map channel by channel: the "
                        "wrong channels would be pruned"
                    )
                    out[p] = why
                for item in group:
                    if self.dg.is_out_channel_pruning_fn(item.dep.handler):
                        mod = item.dep.target.module
                        if id(mod) in paths:
                            done.setdefault(id(mod), why)
        return out

    def unknown_attention(self) -> dict[str, str]:
        """Projections inside attention modules whose heads nnslim cannot prune, with reasons."""
        return unknown_attention_layers(self.model, self.attention)

    def groups(self, ignored: list[str] | None = None) -> list[GroupInfo]:
        """Every group of coupled channels rooted at a Conv/Linear output, in model order.

        Raises:
            TraceError: if a group grows without bound or enumeration exceeds the time limit.
        """
        named = dict(self.model.named_modules())
        ign = [named[p] for p in (ignored or []) if p in named]
        paths = self.paths
        out: list[GroupInfo] = []
        with self.dg.limit(self.time_limit, "building pruning groups"):
            for g in _iter_groups(self.dg, ign, paths):
                root = g[0].dep.target.module
                info = GroupInfo(paths.get(id(root), "?"), len(g[0].idxs), group=g)
                for item in g:
                    dep = item.dep
                    mod = dep.target.module
                    if not isinstance(mod, nn.Module) or id(mod) not in paths:
                        continue
                    kind = (
                        "out"
                        if self.dg.is_out_channel_pruning_fn(dep.handler)
                        else "in"
                        if self.dg.is_in_channel_pruning_fn(dep.handler)
                        else "other"
                    )
                    info.members.append((paths[id(mod)], kind))
                out.append(info)
        return out


def _raised_in_torch_pruning(e: BaseException) -> bool:
    """Whether the innermost frame of ``e`` is torch-pruning's code."""
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and "torch_pruning" in last


def _iter_groups(dg: Any, ignored: list[nn.Module], paths: dict[int, str]) -> Iterator[Any]:
    """``dg.get_all_groups``, in model order."""
    visited: set[int] = set()
    ignored_ids = {id(m) for m in ignored} | {id(m) for m in dg.IGNORED_LAYERS_IN_TRACING}
    roots = root_types()
    order = {mid: i for i, mid in enumerate(paths)}
    modules = sorted(
        (m for m in dg.module2node if isinstance(m, nn.Module)),
        key=lambda m: order.get(id(m), 1 << 30),
    )
    for m in modules:
        if id(m) in ignored_ids or id(m) in visited or not isinstance(m, roots):
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        group = dg.get_pruning_group(
            m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m)))
        )
        prunable = True
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                if id(dep.target.module) in ignored_ids:
                    prunable = False
        if prunable:
            yield group


def build_dependency(
    model: nn.Module,
    inputs: Inputs,
    *,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
    not_tensor: list[nn.Module] | None = None,
    in_place: list[nn.Module] | None = None,
    shuffles: list[Any] | None = None,
) -> tuple[Any, list[Any]]:
    """Build torch-pruning's DependencyGraph with nnslim's fixes, pruners and bounds.

    ``not_tensor``: layers whose forward returns no tensor (:func:`_watch_not_tensor`), kept
    out of the graph. ``in_place``: layers whose output view the model changes in place
    (:func:`~.tp_compat.watch_in_place`); they hand on a copy while the graph is traced. ``shuffles``
    receives the autograd nodes of channel shuffles (:class:`_ShuffleWatch`)."""
    dg = DependencyGraph(MAX_GROUP)
    outputs: list[torch.Tensor] = []
    results: list[torch.Tensor] = []  # the outputs whose channels are the model's result
    layer_outputs: list[torch.Tensor] = []

    def copy(_m: nn.Module, _a: Any, out: Any) -> Any:
        return out.clone() if isinstance(out, torch.Tensor) else None

    def forward_fn(m: nn.Module, _: Any) -> Any:
        # before torch-pruning's own hook, which records the output's autograd node
        handles = [x.register_forward_hook(copy, prepend=True) for x in in_place or ()]
        handles += _watch_layer_outputs(m, layer_outputs)
        try:
            with _ShuffleWatch(shuffles if shuffles is not None else []):
                return call_for_analysis(m, inputs)
        finally:
            for h in handles:
                h.remove()

    def output_transform(out: Any) -> list[torch.Tensor]:
        outputs[:] = [t for t in output_tensors(out) if t.grad_fn is not None]
        results[:] = [t for t in task_tensors(out) if t.grad_fn is not None]
        # torch-pruning walks back from the outputs only: a layer whose result the model
        # computes and drops (CLIP's post_layernorm under a classifier that pools the tokens
        # itself) would be missing from the graph and keep its width while its input shrinks.
        # Each layer's own output is a root too; one reached from the outputs adds nothing.
        return outputs + layer_outputs

    with (
        preserved_state(model),
        torch.enable_grad(),
        _all_require_grad(model),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        dg.build_dependency(
            model,
            example_inputs=inputs.as_tuple(),
            forward_fn=forward_fn,
            output_transform=output_transform,
            customized_pruners=customized_pruners(model),
            unwrapped_parameters=unwrapped_parameters,
            ignored_layers=list(not_tensor or []),
            verbose=False,
        )
    _link_ties(dg, model)
    return dg, [t.grad_fn for t in results]


@contextlib.contextmanager
def _all_require_grad(model: nn.Module) -> Iterator[None]:
    """Every floating parameter requires grad while the graph is traced (torch-pruning follows
    autograd: a frozen layer, such as Marian's fixed sinusoidal position table or a backbone
    frozen for fine-tuning, would be missing from the graph and keep its width while its
    neighbours shrink); each is frozen again after."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _weight_dims(dg: Any, m: nn.Module) -> dict[int, Any]:
    """``{dim of m.weight: the pruning function that cuts it}`` for the layers a weight can be
    tied between (the vocabulary side is never cut: it is the output's)."""
    pruner = dg.get_pruner_of_module(m)
    if pruner is None:
        return {}
    if isinstance(m, nn.Embedding):
        return {1: pruner.prune_out_channels}
    if isinstance(m, nn.Linear):
        return {0: pruner.prune_out_channels, 1: pruner.prune_in_channels}
    c = conv1d_type()
    if c is not None and isinstance(m, c):  # weight (in, out)
        return {0: pruner.prune_in_channels, 1: pruner.prune_out_channels}
    return {}


def _link_ties(dg: Any, model: nn.Module) -> None:
    """Layers sharing one weight cut the same channels of it. torch-pruning sees separate
    layers: a BERT-style masked-LM head, whose decoder shares the word embeddings across a
    dense layer of its own, or an encoder and a decoder sharing one embedding, made two
    channel groups over one tensor (pruning either split the tie, so the hidden width was
    kept). An edge each way between the sharers, over each dimension both can cut, makes them
    one group."""
    for group in shared_parameters(model):
        owners = [
            (m, dg.module2node[m], _weight_dims(dg, m))
            for m, name, _ in group
            if name == "weight" and m in dg.module2node
        ]
        for m, node, dims in owners:
            for other, other_node, other_dims in owners:
                if other is m:
                    continue
                for dim, fn in dims.items():
                    if dim in other_dims:
                        dep = tp.dependency.Dependency(fn, other_dims[dim], node, other_node)
                        node.dependencies.append(dep)


def _watch_layer_outputs(model: nn.Module, into: list[torch.Tensor]) -> list[Any]:
    """Hooks that collect the tensor output of every module holding parameters of its own,
    during the next forward (:func:`build_dependency` traces from them as well)."""

    def hook(m: nn.Module, _: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            into.append(out)

    return [
        m.register_forward_hook(hook)
        for m in model.modules()
        if any(p is not None for p in m._parameters.values())
    ]


class _ShuffleWatch(TorchFunctionMode):
    """Collects the autograd nodes of channel shuffles: a reshape that splits the channel dim
    of a 4-D feature map into groups, ``[b, c, h, w] -> [b, g, c/g, h, w]``, whose result is
    then transposed across the two new dims (ShuffleNet's channel shuffle, flattened back
    afterwards). torch-pruning maps such a reshape channel by channel, so a channel pruned
    before the shuffle would be matched to another one after it. A split into heads that is
    not transposed so (HaloNet's attention) keeps the channel order and is not one."""

    _RESHAPES = frozenset({"view", "reshape", "unflatten"})
    _SWAPS = frozenset({"transpose", "swapaxes", "swapdims", "permute"})

    def __init__(self, into: list[Any]) -> None:
        super().__init__()
        self.into = into
        self.splits: dict[int, tuple[torch.Tensor, Any]] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if not args or not isinstance(args[0], torch.Tensor):
            return out
        x = args[0]
        if name in self._RESHAPES:
            if (
                isinstance(out, torch.Tensor)
                and out.grad_fn is not None
                and x.dim() == 4
                and out.dim() == 5
                and out.shape[0] == x.shape[0]
                and out.shape[1] > 1
                and out.shape[1] * out.shape[2] == x.shape[1]
                and out.shape[3:] == x.shape[2:]
            ):
                self.splits[id(out)] = (out, out.grad_fn)  # held: ids stay unique meanwhile
        elif name in self._SWAPS and id(x) in self.splits:
            dims = [a for a in args[1:] if isinstance(a, int)] or list(
                args[1] if len(args) > 1 and isinstance(args[1], (tuple, list)) else []
            )
            swapped = (
                sorted(d % 5 for d in dims[:2]) == [1, 2]
                if name != "permute"
                else len(dims) == 5 and [d % 5 for d in dims[1:3]] == [2, 1]
            )
            if swapped:
                self.into.append(self.splits[id(x)][1])
        return out


def _watch_not_tensor(model: nn.Module) -> tuple[list[nn.Module], list[Any]]:
    """Hooks that collect, during the next forward, the subclasses of ``nn.Linear``/
    ``nn.Conv*`` whose own forward returns something other than a tensor (a mixture-of-experts
    router returning ``(logits, weights, experts)``: PhiMoE, Llama 4). torch-pruning reads
    ``.shape`` off a layer's output while tracing; these stay out of its graph (their weights
    are not pruned). Returns ``(found, hook handles)``; the caller removes the handles."""
    bases = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    found: list[nn.Module] = []

    def hook(m: nn.Module, _: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor) and m not in found:
            found.append(m)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, bases) and type(m).forward not in {b.forward for b in bases}
    ]
    return found, handles


def trace(
    model: nn.Module, example_inputs: Any, *, time_limit: float | None = TIME_LIMIT_S
) -> Graph:
    """Trace ``model`` on ``example_inputs`` and build its dependency graph.

    Every tensor in the output (a tensor, a tuple, a dict, a Hugging Face ``ModelOutput``) is
    traced, so heads such as BERT's pooler are part of the graph. Hugging Face ``Conv1D`` layers
    are pruning roots like Linear layers. The model runs in eval mode and its state is left as
    it was (train/eval flags, buffers such as BatchNorm statistics).

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors.
        time_limit: seconds before building the pruning groups (while checking them here and
            later while pruning) gives up with a :class:`TraceError` naming the module it was
            at; ``None`` for no limit. Tracing itself is one forward and a walk of its
            autograd graph.

    Returns:
        The :class:`Graph`.

    Raises:
        ValueError: if the forward fails on the inputs.
        TraceError: if tracing exceeds its bounds.

    Example:
        >>> import torch, nnslim
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> g = nnslim.trace(model, torch.randn(1, 4))
        >>> g.output_layers()
        ['2']
        >>> [(i.root, i.members) for i in g.groups(ignored=g.output_layers())]
        [('0', [('0', 'out'), ('2', 'in')])]
    """
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TypeError("trace: example_inputs is required.")

    def run() -> list[torch.Tensor]:
        with preserved_state(model), torch.no_grad():
            return output_tensors(call_for_analysis(model, inputs))

    not_tensor, handles = _watch_not_tensor(model)
    in_place, more = watch_in_place(model, root_types())
    try:
        reference = run()
    except Exception as e:
        raise forward_error(model, inputs, e, "example_inputs") from e
    finally:
        for h in handles + more:
            h.remove()
    if not is_meta(model):
        probe_fused_layouts(model, run, reference)
        probe_config_heads(model, run, reference)
    t0 = time.perf_counter()
    shuffles: list[Any] = []
    dg, grad_fns = build_dependency(
        model,
        inputs,
        not_tensor=not_tensor,
        in_place=in_place(),
        shuffles=shuffles,
    )
    mlps, mlp_skips = find_fused_mlps(model)
    banks, bank_skips = find_expert_banks(model)
    return Graph(
        model,
        inputs,
        dg,
        grad_fns,
        attention=find_attention(model),
        fused_mlps=[*mlps, *banks],
        fused_mlp_skips={**mlp_skips, **bank_skips},
        seconds=time.perf_counter() - t0,
        time_limit=time_limit,
        shuffles=shuffles,
    )
