"""torch-pruning through its extension points: nnslim's :class:`DependencyGraph` and
:class:`Pruner` subclasses, its pruners for more layer types, and the fixes it needs upstream.
Nothing of torch-pruning is patched: other users of it in the process see it unchanged.

torch-pruning 1.6 reads shape metadata that autograd stores on its nodes, and torch 2.x changed
it, which silently disables three of its guards (measured on torch 2.14):

* ``CatBackward0._saved_dim`` stores a negative dim as an unsigned 64-bit number, so a concat
  on the last dim (Llama's ``rotate_half``, the KV cache) is taken for a channel concat; the
  index offset it adds grows on every lap of a cycle and group building never ends (Llama with
  GQA, Llama with ``use_cache=True``).
* ``ViewBackward0._saved_self_sizes`` became ``_saved_self_sym_sizes``, so the "1-D/4-D reshapes
  only" guard is skipped and every reshape gets a flatten mapping (swin_t: indices multiply by 32
  per lap until memory runs out; shufflenet_v2: ZeroDivisionError).
* ``SplitBackward0`` lost ``_saved_self_sizes`` too, so ``chunk`` offsets are inferred wrongly.
* ``update_concat_index_mapping`` sums the channels of a cat's inputs before checking that it
  could infer them (``TypeError``; ``IndexError`` from a split it did not size), raised from
  inside on CvT; such a cat gets no index mapping.

* A concat on a negative dim that does join features (RoCBert's ``cat((word, shape), -1)``
  into a Linear) lost its offsets with the first fix: it gets them where the sizes prove it.
* ``Group.has_pruning_op`` scans the whole group for every dependency it adds (quadratic).

:class:`DependencyGraph` calls the fixed functions below where upstream's ``build_dependency``
and ``get_pruning_group`` call its module functions (the two methods are copied from
torch-pruning 1.6.0, with those calls changed; ``tests/graph/test_tp_compat.py`` fails when
upstream's source changes, and holds a test per fix that fails without it). It bounds group
growth (``max_group``) and the time spent building groups (:meth:`DependencyGraph.limit`), so
group building never hangs: it ends in a :class:`TraceError` that names the module. Tracing
itself is one forward and a walk of its autograd graph, bounded by the model's size.
:class:`Pruner` is torch-pruning's ``BasePruner`` on such a graph, built once and reused.

:class:`Conv1DPruner` teaches torch-pruning Hugging Face's ``Conv1D`` (GPT-2), whose weight is
stored transposed and which torch-pruning otherwise treats as element-wise (zero groups).
"""

from __future__ import annotations

import contextlib
import time
import typing
from collections.abc import Callable, Iterator
from numbers import Number
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping as _im
from torch_pruning.dependency import shape_infer as _si
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

__all__ = [
    "Conv1DPruner",
    "DependencyGraph",
    "GroupTooLarge",
    "Pruner",
    "TraceError",
    "conv1d_type",
    "customized_pruners",
    "sized_split",
    "watch_in_place",
]

#: the torch-pruning version whose methods :class:`DependencyGraph` and :class:`Pruner` copy
UPSTREAM = "1.6.0"

_NEG = 2**63  # CatBackward0._saved_dim stores dim=-k as 2**64 - k


class TraceError(RuntimeError):
    """Tracing or group building did not finish within its bounds."""


class GroupTooLarge(TraceError):
    """One pruning group grew past the bound (a cycle torch-pruning's index mapping cannot
    close); ``members`` holds the ids of the modules it had reached, ``root`` the module it was
    built from."""

    def __init__(self, message: str, members: set[int], root: Any = None) -> None:
        super().__init__(message)
        self.members = members
        self.root = root  # the module the group was built from


def conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers missing or broken
        return None
    return Conv1D


class Conv1DPruner(tp.pruner.BasePruningFunc):
    """Prunes Hugging Face ``Conv1D`` (weight ``(in, out)``, ``y = addmm(b, x, W)``)."""

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.nf

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


CONV1D_PRUNER = Conv1DPruner()


def _per_channel_extras(layer: nn.Module, out: int) -> list[str]:
    """Parameters of a ``nn.Conv*``/``nn.Linear`` subclass beside ``weight`` and ``bias`` that
    hold one value per output channel (timm's ``ScaledStdConv2d.gain``, shaped
    ``(out, 1, 1, 1)``)."""
    return [
        n
        for n, p in layer._parameters.items()
        if n not in ("weight", "bias")
        and p is not None
        and p.dim() >= 1
        and p.shape[0] == out
        and p.numel() == out
    ]


def _with_extras(base: type) -> type:
    class Pruner(base):  # type: ignore[misc, valid-type]
        """torch-pruning's pruner, also cutting the subclass's per-output-channel parameters."""

        def prune_out_channels(self, layer: nn.Module, idxs: Any) -> nn.Module:
            out = self.get_out_channels(layer)
            extras = _per_channel_extras(layer, out)
            keep = sorted(set(range(out)) - set(idxs))
            layer = super().prune_out_channels(layer, idxs)
            for n in extras:
                setattr(layer, n, self._prune_parameter_and_grad(getattr(layer, n), keep, 0))
            return layer

    Pruner.__name__ = Pruner.__qualname__ = f"{base.__name__}WithExtras"
    return Pruner


_EXTRAS_PRUNERS = {
    nn.Linear: _with_extras(tp.pruner.function.LinearPruner)(),
    nn.Conv1d: _with_extras(tp.pruner.function.ConvPruner)(),
    nn.Conv2d: _with_extras(tp.pruner.function.ConvPruner)(),
    nn.Conv3d: _with_extras(tp.pruner.function.ConvPruner)(),
}


def customized_pruners(model: nn.Module | None = None) -> dict[Any, Any]:
    """The pruners nnslim adds to torch-pruning's: Hugging Face ``Conv1D``, and subclasses of
    ``nn.Linear``/``nn.Conv*`` in ``model`` holding per-output-channel parameters of their own
    (torch-pruning cuts only ``weight`` and ``bias``; the rest would keep the old width)."""
    c = conv1d_type()
    out: dict[Any, Any] = {c: CONV1D_PRUNER} if c is not None else {}
    for m in model.modules() if model is not None else ():
        base = next((b for b in _EXTRAS_PRUNERS if isinstance(m, b)), None)
        if base is None or type(m) is base or type(m) in out:
            continue
        width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        if _per_channel_extras(m, width):
            out[type(m)] = _EXTRAS_PRUNERS[base]
    return out


# ----------------------------------------------------------------------------------------------
# Fixes: functions of the graph that DependencyGraph calls instead of upstream's


def watch_in_place(
    model: nn.Module, layer_types: tuple[type, ...]
) -> tuple[Callable[[], list[nn.Module]], list[Any]]:
    """Hooks that find, during the next forward, the layers whose output is a view that the
    model then changes in place (RoCBert's ``x = self.map_inputs_layer(x); x += ...``: a Linear
    on 3-D input returns a view of its matmul). Autograd then replaces the view's node, so
    torch-pruning cannot find the layer in the graph, treats its matmul as element-wise and
    leaves its input channels behind when the layer before it is pruned. Reads the private
    ``Tensor._is_view()`` and ``Tensor._version`` (no public API tells either; a test fails
    when torch's behaviour here changes). Returns ``(a function giving the layers once the
    forward ran, hook handles)``."""
    seen: list[tuple[nn.Module, torch.Tensor, int]] = []

    def hook(m: nn.Module, _: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out._is_view():
            seen.append((m, out, out._version))

    def found() -> list[nn.Module]:
        out: list[nn.Module] = []
        for m, t, version in seen:
            if t._version != version and m not in out:
                out.append(m)
        seen.clear()
        return out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layer_types)]
    return found, handles


def sized_split(grad_fn: Any) -> bool:
    """Whether an autograd node is a split sized at run time (``chunk``, ``split(n)``)."""
    return hasattr(grad_fn, "_saved_split_size")


def _feature_concat(graph: Any, cat_node: Any, depth: int = 0) -> bool:
    """Whether a concat on a negative dim joins features: its inputs' channel counts are all
    known and add up to the input width of a layer it feeds directly, or through another such
    concat (RoCBert's ``cat((cat((word, shape), -1), pronunciation), -1)`` into a Linear). A
    concat on the last dim that feeds no layer directly (Llama's ``rotate_half``, a KV cache's
    ``cat(past, new, -2)``) proves nothing; mapping its offsets would grow without end around
    the attention cycle."""
    try:
        chs = [_si.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs]
    except Exception:
        return False
    if None in chs or depth > 4:
        return False
    total = sum(chs)
    nodes, step = list(cat_node.outputs), list(cat_node.outputs)
    passing = (tp.ops.OPTYPE.RESHAPE, tp.ops.OPTYPE.ELEMENTWISE)
    for _ in range(3):  # a Linear on 3-D input: view -> addmm -> view, then the layer's node
        step = [o for n in step if n.type in passing for o in n.outputs]
        nodes += step
    for n in nodes:
        m = n.module
        if isinstance(m, nn.Linear) and m.in_features == total:
            return True
        if n.type == tp.ops.OPTYPE.CONCAT and _feature_concat(graph, n, depth + 1):
            return True
    return False


def update_concat_index_mapping(graph: Any, cat_node: Any) -> Any:
    """Upstream's, for a concat on the channel dim only (see the module docstring)."""
    if getattr(cat_node.grad_fn, "_saved_dim", 1) >= _NEG and not _feature_concat(graph, cat_node):
        return None  # a negative dim is the channel dim only where the sizes prove it
    try:
        return _im.update_concat_index_mapping(graph, cat_node)
    except (IndexError, TypeError):
        # an input whose channels it could not infer (a split on another dim: CvT's class
        # token): it sums them before checking for None; such a cat gets no index
        # mapping, as any cat it cannot size
        return None


def update_reshape_index_mapping(graph: Any, node: Any) -> Any:
    """Upstream's, behind its "1-D/4-D reshapes only" guard read from the current field."""
    from torch_pruning.dependency import constants

    g = node.grad_fn
    size = getattr(g, "_saved_self_sizes", None) or getattr(g, "_saved_self_sym_sizes", None)
    if size is not None:
        if len(size) not in (1, 4):
            return None
        if len(size) == 4:
            out_ch = None
            for n in node.outputs:
                depth = [0]
                out_ch = _si.infer_in_channels_recursively(graph, n, depth)
                if depth[0] > constants.MAX_RECURSION_DEPTH:
                    return None
                if out_ch is not None:
                    break
            if not out_ch or out_ch <= 0 or size[1] * size[2] * size[3] != out_ch:
                return None
    try:
        return _im.update_reshape_index_mapping(graph, node)
    except ZeroDivisionError:
        return None


def init_shape_information(graph: Any) -> Any:
    """Upstream's, then the sizes of ``chunk`` splits read from the current field."""
    out = _si.init_shape_information(graph)
    for node in graph.module2node.values():
        g = node.grad_fn
        if (
            node.type == tp.ops.OPTYPE.SPLIT
            and sized_split(g)
            and getattr(g, "_saved_dim", None) == 1
            and hasattr(g, "_saved_self_sym_sizes")
        ):
            total = int(g._saved_self_sym_sizes[1])
            s = int(g._saved_split_size)
            chs = [min(s, total - k) for k in range(0, total, s)]
            if len(chs) == len(node.outputs):
                node.module.split_sizes = chs
                node.module.offsets = [0] + [sum(chs[: i + 1]) for i in range(len(chs))]
    return out


def update_index_mapping(graph: Any) -> None:
    """Upstream's loop over the graph, with the fixed concat and reshape mappings."""
    op = tp.ops.OPTYPE
    for node in list(graph.module2node.values()):
        if node.type == op.CONCAT:
            update_concat_index_mapping(graph, node)
        if node.type == op.SPLIT:
            _im.update_split_index_mapping(graph, node)
        if node.type == op.RESHAPE:
            update_reshape_index_mapping(graph, node)
        if node.type == op.UNBIND:
            _im.update_unbind_index_mapping(graph, node)
        if node.type == op.EXPAND:
            _im.update_expand_index_mapping(graph, node)
        if node.type == op.SLICE:
            _im.update_slice_index_mapping(graph, node)


class _Group(tp.dependency.Group):
    """A group that stops growing at its graph's bounds (size and time), with
    ``has_pruning_op`` through an index by (target, handler): upstream scans the whole group
    for every dependency it adds, so building a group of n members costs n^2 index-list
    comparisons (45 s for gpt-oss's expert group on the way to the 20,000-member bound; under a
    second here). Appended members are indexed as they come; a member replaced in place drops
    the index, which is then rebuilt."""

    def __init__(self, graph: DependencyGraph) -> None:
        super().__init__()
        self._graph = graph
        self._ops: dict[tuple[int, Any], list[Any]] | None = None
        self._seen = 0

    def add_dep(self, dep: Any, idxs: Any) -> None:
        g = self._graph
        g.check_time()
        if g.max_group is not None and len(self._group) >= g.max_group:
            root = self._group[0].dep.target if self._group else dep.target
            raise GroupTooLarge(
                f"the pruning group rooted at {root._name or root.module} grew past "
                f"{g.max_group} coupled layers; the graph probably has a cycle that "
                f"torch-pruning's index mapping cannot close. Exclude that module "
                f"(exclude=[...]) or report the model.",
                {id(d.dep.target.module) for d in self._group},
                root.module,
            )
        super().add_dep(dep, idxs)

    def has_pruning_op(self, dep: Any, idxs: Any) -> bool:
        if self._ops is None or self._seen > len(self._group):
            self._ops, self._seen = {}, 0
        for item in self._group[self._seen :]:
            self._ops.setdefault((id(item.dep.target), item.dep.handler), []).append(item.idxs)
        self._seen = len(self._group)
        return any(i == idxs for i in self._ops.get((id(dep.target), dep.handler), ()))

    def __setitem__(self, k: Any, v: Any) -> None:
        self._ops = None
        super().__setitem__(k, v)


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's dependency graph with the fixed index mappings and bounded group
    building. ``max_group``: the most layers one group may reach (``None``: no bound)."""

    def __init__(self, max_group: int | None = None) -> None:
        super().__init__()
        self.max_group = max_group
        self._deadline: float | None = None
        self._limit: tuple[float, str] | None = None
        self._building = ""

    @contextlib.contextmanager
    def limit(self, seconds: float | None, what: str) -> Iterator[None]:
        """Groups built inside the block raise :class:`TraceError` (naming the root they were
        built from) once ``seconds`` have passed since the block began."""
        saved = self._deadline, self._limit
        if seconds is not None:
            self._deadline, self._limit = time.perf_counter() + seconds, (seconds, what)
        try:
            yield
        finally:
            self._deadline, self._limit = saved

    def check_time(self) -> None:
        if self._deadline is None or time.perf_counter() < self._deadline:
            return
        seconds, what = self._limit  # type: ignore[misc]
        at = f" (at {self._building})" if self._building else ""
        raise TraceError(
            f"{what} did not finish within {seconds:.0f} s{at}; the dependency graph is too "
            f"large or has a cycle torch-pruning cannot close. Exclude the module named here "
            f"(exclude=[...]), raise the time limit, or report the model."
        )

    # copied from torch-pruning 1.6.0, with the fixed shape and index-mapping functions
    def build_dependency(  # type: ignore[override]
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Any = None,
        output_transform: Any = None,
        unwrapped_parameters: dict[nn.Parameter, int] | None = None,
        customized_pruners: dict[Any, Any] | None = None,
        ignored_layers: list[nn.Module] | None = None,
        ignored_params: list[nn.Parameter] | None = None,
        verbose: bool = True,
    ) -> DependencyGraph:
        self.verbose = verbose
        self.model = model
        self._module2name = {module: name for (name, module) in model.named_modules()}
        if customized_pruners is not None:
            for customized_type, customized_pruner in customized_pruners.items():
                self.register_customized_layer(customized_type, customized_pruner)
        if ignored_layers is not None:
            self.IGNORED_LAYERS_IN_TRACING.extend(ignored_layers)
        self.ignored_params = ignored_params if ignored_params is not None else []
        for layer_type_or_instance in self.CUSTOMIZED_PRUNERS:
            for m in self.model.modules():
                if (m == layer_type_or_instance) or (
                    not isinstance(layer_type_or_instance, torch.nn.Module)
                    and isinstance(m, layer_type_or_instance)
                ):
                    for sub_module in m.modules():
                        if sub_module != m:
                            self.IGNORED_LAYERS_IN_TRACING.append(sub_module)
        self._param_to_name, self.unwrapped_parameters = self._detect_unwrapped_parameters(
            unwrapped_parameters
        )
        if not torch.is_grad_enabled():
            raise RuntimeError("the dependency graph is traced through autograd: enable grad")
        self.module2node = self._trace(
            model, example_inputs, forward_fn, output_transform=output_transform
        )
        self._build_dependency(self.module2node)
        init_shape_information(self)
        update_index_mapping(self)
        return self

    # copied from torch-pruning 1.6.0, with the fixed index mapping, a bounded and indexed
    # group, and the root's name kept for the time limit's message
    def get_pruning_group(
        self, module: nn.Module, pruning_fn: typing.Callable, idxs: typing.Sequence[int]
    ) -> Any:
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if (
            isinstance(module, tp.ops.TORCH_CONV)
            and module.groups == module.out_channels
            and module.out_channels > 1
        ):
            pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
        if isinstance(idxs, Number):
            idxs = [idxs]
        idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
        update_index_mapping(self)
        self._building = self._module2name.get(module, type(module).__name__)
        group = _Group(self)
        root_node = self.module2node[module]
        group.add_dep(
            dep=tp.dependency.Dependency(
                pruning_fn, pruning_fn, source=root_node, target=root_node
            ),
            idxs=idxs,
        )
        visited_node = set()
        stack = [group[0]]
        while stack:
            dep, idxs = stack.pop(-1)
            node, fn = dep.target, dep.handler
            visited_node.add(node)
            for new_dep in node.dependencies:
                if new_dep.is_triggered_by(fn):
                    new_indices = idxs
                    for mapping in new_dep.index_mapping:
                        if mapping is not None:
                            new_indices = mapping(new_indices)
                    if len(new_indices) == 0:
                        continue
                    if (new_dep.target in visited_node) and group.has_pruning_op(
                        new_dep, new_indices
                    ):
                        continue
                    group.add_dep(new_dep, new_indices)
                    stack.append((new_dep, new_indices))
        merged_group = tp.dependency.Group()
        for dep, idxs in group.items:
            if isinstance(dep.target.module, nn.Parameter) and any(
                dep.target.module is p for p in self.ignored_params
            ):
                continue
            merged_group.add_and_merge(dep, idxs)
        merged_group._DG = self
        for i in range(len(merged_group)):
            hybrid_idxs = merged_group[i].idxs
            plain = _helpers.to_plain_idxs(hybrid_idxs)
            root_idxs = _helpers.to_root_idxs(hybrid_idxs)
            merged_group[i] = _helpers.GroupItem(merged_group[i].dep, plain)
            merged_group[i].root_idxs = root_idxs
        return merged_group


class Pruner(tp.pruner.BasePruner):
    """torch-pruning's ``BasePruner`` on a graph built before (nnslim traces once and reuses
    the graph; upstream's constructor traces the model again). The constructor is upstream's
    (torch-pruning 1.6.0), for the arguments nnslim passes, with ``self.DG = graph``."""

    def __init__(
        self,
        graph: DependencyGraph,
        importance: typing.Callable,
        global_pruning: bool = False,
        pruning_ratio: float = 0.5,
        pruning_ratio_dict: dict[nn.Module, float] | None = None,
        iterative_steps: int = 1,
        ignored_layers: list[nn.Module] | None = None,
        round_to: int | None = None,
        root_module_types: list[type] | None = None,
    ) -> None:
        self.model = graph.model
        self.importance = importance
        self.pruning_ratio = pruning_ratio
        self.max_pruning_ratio = 1.0
        self.global_pruning = global_pruning
        self.isomorphic = False
        self.in_channel_groups: dict[nn.Module, int] = {}
        self.out_channel_groups: dict[nn.Module, int] = {}
        self.root_module_types = root_module_types or [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR]
        self.round_to = round_to
        self.num_heads: dict[nn.Module, int] = {}
        self.prune_num_heads = False
        self.prune_head_dims = True
        self.head_pruning_ratio = 0.0
        self.ignored_layers = []
        self.ignored_params: list[nn.Parameter] = []
        for layer in ignored_layers or []:
            if isinstance(layer, nn.Module):
                self.ignored_layers.extend(list(layer.modules()))
            elif isinstance(layer, nn.Parameter):
                self.ignored_params.append(layer)
        self.DG = graph
        graph.ignored_params = self.ignored_params
        self.iterative_steps = iterative_steps
        self.iterative_pruning_ratio_scheduler = linear_scheduler
        self.current_step = 0
        self.per_step_pruning_ratio = linear_scheduler(pruning_ratio, iterative_steps)
        self.per_step_head_pruning_ratio = linear_scheduler(0.0, iterative_steps)
        self._layer_to_scope: dict[nn.Module, Any] = {}
        self._scope_initial_channels: dict[Any, int] = {}
        self.pruning_ratio_dict: dict[nn.Module, list[float]] = {}
        # upstream lists the built-in types only: a per-layer ratio on a layer of a customized
        # pruner (Hugging Face's Conv1D) was dropped, and the layer pruned at the default ratio
        prunable_types = tuple(tp.ops.type2class(t) for t in self.DG.REGISTERED_PRUNERS) + tuple(
            t for t in getattr(self.DG, "CUSTOMIZED_PRUNERS", {}) if isinstance(t, type)
        )
        for scope_id, (module, ratio) in enumerate((pruning_ratio_dict or {}).items()):
            scope_name = f"_User_Defined_Scope_{scope_id}"
            for postfix, submodule in enumerate(
                s for s in module.modules() if isinstance(s, prunable_types)
            ):
                self._layer_to_scope[submodule] = (
                    (scope_name, [module])
                    if self.global_pruning
                    else (f"{scope_name}_{postfix}", [module])
                )
                self.pruning_ratio_dict[submodule] = linear_scheduler(ratio, iterative_steps)
        self.head_pruning_ratio_dict: dict[nn.Module, list[float]] = {}
        for m in self.model.modules():
            layer_pruner = self.DG.get_pruner_of_module(m)
            in_ch_group = layer_pruner.get_in_channel_groups(m)
            out_ch_group = layer_pruner.get_out_channel_groups(m)
            if isinstance(m, tp.ops.TORCH_CONV) and m.groups == m.out_channels:
                continue
            if in_ch_group > 1:
                self.in_channel_groups[m] = in_ch_group
            if out_ch_group > 1:
                self.out_channel_groups[m] = out_ch_group
        self.layer_init_out_ch: dict[nn.Module, int] = {}
        self.layer_init_in_ch: dict[nn.Module, int] = {}
        self.init_num_heads: dict[nn.Module, int] = {}
        for m in self.DG.module2node:
            if tp.ops.module2type(m) in self.DG.REGISTERED_PRUNERS:
                self.layer_init_out_ch[m] = self.DG.get_out_channels(m)
                self.layer_init_in_ch[m] = self.DG.get_in_channels(m)
        total = 0
        for group in self.DG.get_all_groups(
            ignored_layers=self.ignored_layers, root_module_types=self.root_module_types
        ):
            is_attention, _ = self._is_atten_group(group)
            if is_attention:
                group = self._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            total += self.DG.get_out_channels(group[0][0].target.module) // (
                self._get_channel_groups(group)
            )
        self.initial_total_channels = total
        self.initial_total_heads = 0
