"""Snapshots that put a model back exactly as it was when a transform fails.

A :class:`Snapshot` keeps every module's attribute dictionary (shallow copies of the parameter,
buffer, child and hook tables, deep copies of plain attributes such as Hugging Face configs) and a
handle on every parameter and buffer's storage. :meth:`Snapshot.restore` puts the same objects
back, so references the user holds (an optimizer over ``model.parameters()``, a submodule) stay
valid.

Transforms that never write into existing tensors in place (all built-in ones) snapshot without
copying weights. Others (``copy_tensors=True``, the default for user transforms) clone them.
Buffers that a forward may update (BatchNorm statistics, counters) are always cloned.

:func:`preserved_state` wraps nnslim's own forward passes, so that tracing, calibration and
profiling leave the model's state as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["Snapshot", "no_rollback", "preserved_state", "rollback_enabled"]

_NO_ROLLBACK: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nnslim_no_rollback", default=False
)


@contextlib.contextmanager
def no_rollback() -> Iterator[None]:
    """Within this block, transforms keep no snapshot and free what they replace.

    For callers that throw the whole model away when a transform fails (the block-by-block
    :func:`~nnslim.compress_checkpoint`): a replaced module's weights are released as soon as
    its replacement is in place, instead of being held until the transform returns, so memory
    never holds a block's original weights and its new ones at once. A transform that fails in
    this block leaves the model half-changed.
    """
    token = _NO_ROLLBACK.set(True)
    try:
        yield
    finally:
        _NO_ROLLBACK.reset(token)


def rollback_enabled() -> bool:
    """``False`` inside :func:`no_rollback`."""
    return not _NO_ROLLBACK.get()


def _state_buffers(modules: list[nn.Module]) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The buffers a forward may update: all but the integer weights of nnslim's own modules
    (those declare ``nnslim_weight_buffers`` and never write them in a forward)."""
    out, seen = [], set()
    for m in modules:  # a module listed at several paths once
        if m._buffers and id(m) not in seen and not hasattr(type(m), "nnslim_weight_buffers"):
            seen.add(id(m))
            out.extend((m, name, b) for name, b in m._buffers.items() if b is not None)
    return out


@contextlib.contextmanager
def preserved_state(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    """Run nnslim's own forwards (tracing, calibration, profiling) without changing the model.

    Inside the block every module is in eval mode (BatchNorm normalises with its running
    statistics and does not update them, dropout is off); on exit each module's own train/eval
    flag comes back (a module put in meanwhile takes its parent's), and every buffer a forward
    wrote anyway (a counter the model increments, a buffer it rebinds) holds its old value
    again, in the same tensor object. ``modules``: the model's modules, if already listed.
    """
    modules = list(model.modules()) if modules is None else modules
    flags = [m.training for m in modules]
    saved = [
        (m, name, b, b._version, b.detach().clone() if b.device.type != "meta" else None)
        for m, name, b in _state_buffers(modules)
    ]
    for m, training in zip(modules, flags):
        if training:
            m.training = False
    try:
        yield
    finally:
        for m, training in zip(modules, flags):
            if m.training != training:
                m.training = training
        # a module put in during the block (a transform's replacement, made while everything
        # was in eval mode) takes the mode of the module it sits in
        known = {id(m) for m in modules}
        for parent in model.modules():
            for child in parent.children():
                if id(child) not in known and child.training != parent.training:
                    child.training = parent.training
        for m, name, b, version, clone in saved:
            if name in m._buffers and m._buffers[name] is not b:
                m._buffers[name] = b
            if clone is not None and _changed(b, version, clone):
                if b.shape != clone.shape:  # resized in place
                    b.data = clone
                else:
                    with torch.no_grad():
                        b.copy_(clone)


def _changed(t: torch.Tensor, version: int, clone: torch.Tensor) -> bool:
    # BatchNorm's kernels update running statistics without bumping the version counter:
    # compare the values too
    return t._version != version or t.shape != clone.shape or not torch.equal(t, clone)


class _TensorState:
    __slots__ = ("alias", "clone", "grad", "obj", "requires_grad", "version")

    def __init__(self, t: torch.Tensor, copy_tensors: bool) -> None:
        self.obj = t
        self.alias = t.detach()  # same storage, same version counter
        self.version = self.alias._version
        self.clone = t.detach().clone() if copy_tensors and t.device.type != "meta" else None
        self.requires_grad = t.requires_grad
        self.grad = t.grad if isinstance(t, nn.Parameter) else None


class Snapshot:
    """The state of ``model`` now, restorable in place.

    Args:
        model: the model to snapshot.
        copy_tensors: clone every parameter and buffer (needed when the code that runs next may
            write into them in place).
    """

    def __init__(self, model: nn.Module, *, copy_tensors: bool = True) -> None:
        self.model = model
        self.copy_tensors = copy_tensors
        modules = list(model.modules())
        tensors: dict[int, _TensorState] = {}
        memo: dict[int, Any] = {}
        # buffers a forward may write (BatchNorm statistics, counters) are always copied: the
        # model's own forward may have updated them by the time a transform fails
        state = {id(b) for _, _, b in _state_buffers(modules)}
        for m in modules:
            memo[id(m)] = m
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None and id(t) not in tensors:
                    tensors[id(t)] = _TensorState(t, copy_tensors or id(t) in state)
                    memo[id(t)] = t
        self._tensors = tensors
        self._dicts: list[tuple[nn.Module, dict[str, Any], set[str]]] = []
        self._memo = dict(memo)  # modules and tensors: kept as themselves by every copy
        for m in modules:
            saved: dict[str, Any] = {}
            copied: set[str] = set()
            for k, v in m.__dict__.items():
                if isinstance(v, dict):
                    saved[k] = v.copy()
                elif isinstance(v, (nn.Module, torch.Tensor)) or callable(v):
                    saved[k] = v
                else:
                    try:
                        saved[k] = copy.deepcopy(v, memo)
                        copied.add(k)
                    except Exception:
                        saved[k] = v
            self._dicts.append((m, saved, copied))

    def restore(self) -> None:
        """Put every module, attribute, parameter and buffer back as it was.

        Raises:
            RuntimeError: if a tensor was modified in place and the snapshot holds no copy of it
                (a transform declared ``_copy_on_snapshot = False`` but wrote in place).
        """
        # the model gets copies, the snapshot keeps its own: a transform that retries (Prune)
        # restores the same snapshot again after its next attempt wrote into a config
        memo = dict(self._memo)
        for m, saved, copied in self._dicts:
            current = m.__dict__
            for k in [k for k in current if k not in saved]:
                del current[k]
            for k, v in saved.items():
                if isinstance(v, dict):
                    current[k] = v.copy()
                elif k in copied:
                    current[k] = copy.deepcopy(v, memo)
                else:
                    current[k] = v
        for st in self._tensors.values():
            t = st.obj
            changed = (
                _changed(st.alias, st.version, st.clone)
                if st.clone is not None
                else st.alias._version != st.version
            )
            if changed:
                if st.clone is None:
                    raise RuntimeError(
                        "a tensor of the model was modified in place by a transform that "
                        "promised not to, so it cannot be restored; this is a bug in that "
                        "transform (set `_copy_on_snapshot = True` on it)."
                    )
                if st.alias.shape == st.clone.shape and st.alias.dtype == st.clone.dtype:
                    # back into the original storage, and the snapshot's copy stays as it was
                    # (a transform that retries restores the same snapshot more than once)
                    with torch.no_grad():
                        st.alias.copy_(st.clone)
                    st.version = st.alias._version
                    t.data = st.alias
                else:
                    t.data = st.clone.clone()
            elif (
                t.data.untyped_storage().data_ptr() != st.alias.untyped_storage().data_ptr()
                or t.shape != st.alias.shape
                or t.dtype != st.alias.dtype
                or t.stride() != st.alias.stride()
            ):
                t.data = st.alias
            if isinstance(t, nn.Parameter):
                t.requires_grad_(st.requires_grad)
                t.grad = st.grad

    @property
    def tensor_objects(self) -> dict[int, torch.Tensor]:
        return {k: st.obj for k, st in self._tensors.items()}


@contextlib.contextmanager
def preserve_modes(model: nn.Module) -> Iterator[None]:
    """Every module's own train/eval flag comes back afterwards (torch-pruning sets eval; an
    evaluation sets eval; ``model.train(was)`` would put a frozen BatchNorm in train mode)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t
