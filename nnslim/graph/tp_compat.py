"""Fixes and extensions for torch-pruning, applied only while nnslim traces and prunes.

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

:func:`torch_pruning_fixes` patches the three functions for the duration of a ``with`` block and
restores them afterwards, so other users of torch-pruning in the process are unaffected. It also
bounds group growth and time (:func:`guard`), so tracing never hangs: it ends in a
:class:`TraceError` that names the module.

:class:`Conv1DPruner` teaches torch-pruning Hugging Face's ``Conv1D`` (GPT-2), whose weight is
stored transposed and which torch-pruning otherwise treats as element-wise (zero groups).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as _im
from torch_pruning.dependency import shape_infer as _si

__all__ = [
    "Conv1DPruner",
    "GroupTooLarge",
    "TraceError",
    "conv1d_type",
    "guard",
    "torch_pruning_fixes",
]

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


def _fixed_concat(orig: Any) -> Any:
    def update_concat_index_mapping(graph: Any, cat_node: Any) -> Any:
        if getattr(cat_node.grad_fn, "_saved_dim", 1) >= _NEG:
            return None  # a negative dim is never the channel dim 1
        try:
            return orig(graph, cat_node)
        except (IndexError, TypeError):
            # an input whose channels it could not infer (a split on another dim: CvT's class
            # token): it sums them before checking for None; such a cat gets no index
            # mapping, as any cat it cannot size
            return None

    return update_concat_index_mapping


def _fixed_reshape(orig: Any) -> Any:
    from torch_pruning.dependency import constants

    def update_reshape_index_mapping(graph: Any, node: Any) -> Any:
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
            return orig(graph, node)
        except ZeroDivisionError:
            return None

    return update_reshape_index_mapping


def _fixed_shape_info(orig: Any) -> Any:
    def init_shape_information(graph: Any) -> Any:
        out = orig(graph)
        for node in graph.module2node.values():
            g = node.grad_fn
            if (
                node.type == tp.ops.OPTYPE.SPLIT
                and hasattr(g, "_saved_split_size")
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

    return init_shape_information


_LOCK = threading.RLock()


@contextlib.contextmanager
def torch_pruning_fixes(max_group: int | None = None) -> Iterator[None]:
    """Apply the fixes (and a bound on group size) while the block runs."""
    with _LOCK:
        group_cls = tp.dependency.Group
        saved = (
            _im.update_concat_index_mapping,
            _im.update_reshape_index_mapping,
            _si.init_shape_information,
            group_cls.add_dep,
            group_cls.has_pruning_op,
            group_cls.__setitem__,
        )
        _im.update_concat_index_mapping = _fixed_concat(saved[0])
        _im.update_reshape_index_mapping = _fixed_reshape(saved[1])
        _si.init_shape_information = _fixed_shape_info(saved[2])
        group_cls.has_pruning_op = _indexed_has_pruning_op
        group_cls.__setitem__ = _setitem_forgets_index(saved[5])
        if max_group is not None:
            orig_add = saved[3]

            def add_dep(self: Any, dep: Any, idxs: Any) -> None:
                if len(self._group) >= max_group:
                    root = self._group[0].dep.target if self._group else dep.target
                    raise GroupTooLarge(
                        f"the pruning group rooted at {root._name or root.module} grew past "
                        f"{max_group} coupled layers; the graph probably has a cycle that "
                        f"torch-pruning's index mapping cannot close. Exclude that module "
                        f"(exclude=[...]) or report the model.",
                        {id(d.dep.target.module) for d in self._group},
                        root.module,
                    )
                orig_add(self, dep, idxs)

            group_cls.add_dep = add_dep
        try:
            yield
        finally:
            (
                _im.update_concat_index_mapping,
                _im.update_reshape_index_mapping,
                _si.init_shape_information,
                group_cls.add_dep,
                group_cls.has_pruning_op,
                group_cls.__setitem__,
            ) = saved


def _indexed_has_pruning_op(self: Any, dep: Any, idxs: Any) -> bool:
    """``Group.has_pruning_op`` through an index by (target, handler): upstream scans the whole
    group for every dependency it adds, so building a group of n members costs n^2 index-list
    comparisons (45 s for gpt-oss's expert group on the way to the 20,000-member bound; under a
    second now). Appended members are indexed as they come; a member replaced in place drops
    the index (``__setitem__``), which is then rebuilt."""
    d = self.__dict__
    index = d.get("_nnslim_ops")
    if index is None or d.get("_nnslim_seen", 0) > len(self._group):
        index = {}
        d["_nnslim_seen"] = 0
    for item in self._group[d["_nnslim_seen"] :]:
        index.setdefault((id(item.dep.target), item.dep.handler), []).append(item.idxs)
    d["_nnslim_ops"], d["_nnslim_seen"] = index, len(self._group)
    return any(i == idxs for i in index.get((id(dep.target), dep.handler), ()))


def _setitem_forgets_index(orig: Any) -> Any:
    def __setitem__(self: Any, k: Any, v: Any) -> None:
        self.__dict__.pop("_nnslim_ops", None)
        orig(self, k, v)

    return __setitem__


@contextlib.contextmanager
def guard(seconds: float | None, what: str, where: list[str] | None = None) -> Iterator[None]:
    """Raise :class:`TraceError` in this thread if the block runs longer than ``seconds``.

    ``where`` is a one-element list the caller keeps updated with the module being processed,
    so the error can name it. The exception is delivered between Python bytecodes, so it stops
    runaway Python loops (torch-pruning's group expansion), not a single long C++ kernel.
    """
    if seconds is None:
        yield
        return
    target = threading.get_ident()
    done = threading.Event()
    fired = []

    def watchdog() -> None:
        if not done.wait(seconds):
            fired.append(True)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(target), ctypes.py_object(_Timeout)
            )

    t = threading.Thread(target=watchdog, daemon=True)
    start = time.perf_counter()
    t.start()
    try:
        yield
    except _Timeout:
        at = f" (at {where[0]})" if where and where[0] else ""
        raise TraceError(
            f"{what} did not finish within {seconds:.0f} s{at}; the dependency graph is too "
            f"large or has a cycle torch-pruning cannot close. Exclude the module named here "
            f"(exclude=[...]), raise the time limit, or report the model."
        ) from None
    finally:
        done.set()
        t.join()
        if fired and time.perf_counter() - start >= seconds:
            # the async exception may still be pending if the block ended right at the limit
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)


class _Timeout(BaseException):
    pass
