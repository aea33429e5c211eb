"""One instrumented forward pass: operator costs per module and live-tensor memory.

:class:`OpCounter` is a ``TorchDispatchMode``: it sees every aten operator, whatever Python code
called it (modules, functional calls, ``@``, ``einsum``, fused attention kernels), and charges its
cost to the innermost module running, tracked with global forward hooks. It also tracks every
tensor storage the operators create, through weak references, to measure peak memory.

Leaf fast path: inside leaf modules of an exactly known type (convolution, linear, eval-mode
BatchNorm, LayerNorm, common activations and pooling; see :mod:`.leaf_rules`), run without
gradients on plain CPU tensors, the counter pauses its mode and charges, after the forward, the
operators that module dispatches, with the same formulas and bookkeeping. The counts, per-module
tallies and memory peak are the same; those operators skip the interception (a Python call into
``__torch_dispatch__`` and back, per operator).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from .formulas import cost_of
from .leaf_rules import LeafRule, rule_for

__all__ = ["OpCounter", "Tally"]


@dataclass
class Tally:
    """Costs charged to one module (exclusive of its children)."""

    macs: int = 0
    other_flops: int = 0
    calls: int = 0
    unsupported: dict[str, int] = field(default_factory=dict)


class _StorageRef(weakref.ref):
    """A weak reference to a storage, with what its tracker needs to know when it is freed.

    One object per storage (a ``functools.partial`` callback would add two more): the profiler
    allocates one for every tensor storage it sees, and fewer allocations mean fewer garbage
    collections during the forward.
    """

    __slots__ = ("key", "nbytes", "tracker")
    key: int
    nbytes: int
    tracker: _MemoryTracker


def _storage_freed(ref: _StorageRef) -> None:
    tracker = ref.tracker
    if tracker._live.get(ref.key) is ref:
        del tracker._live[ref.key]
        tracker.current -= ref.nbytes


class _MemoryTracker:
    """Bytes held by live tensor storages, and their peak.

    Storages are keyed by their C++ address; a weak reference to each storage's Python object
    (which torch keeps alive as long as the storage lives) tells when it is freed.
    """

    def __init__(self) -> None:
        self._live: dict[int, _StorageRef] = {}
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        if t.is_meta or t.layout != torch.strided:
            return  # no storage to track (opaque kernel layouts, sparse)
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        if key in self._live:
            return
        nbytes = st.nbytes()
        ref = _StorageRef(st, _storage_freed)
        ref.key = key
        ref.nbytes = nbytes
        ref.tracker = self
        self._live[key] = ref
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current

    def add_transient(self, nbytes: int) -> None:
        """Count ``nbytes`` allocated and freed right away (on top of what is live now)."""
        if self.current + nbytes > self.peak:
            self.peak = self.current + nbytes

    def stop(self) -> None:
        """Stop tracking, keeping ``current`` and ``peak``.

        Each weak reference holds the tracker: dropping them breaks that reference cycle, so
        the tracker and its references are freed at once rather than left to the cyclic
        garbage collector, whose full collections cost more than a small model's forward.
        """
        self._live.clear()


#: Use the leaf fast path (a switch for tests and for comparing against the dispatch path).
FAST_LEAVES = True


class OpCounter(TorchDispatchMode):
    """Count operator costs per module and track memory during one forward (and backward).

    Args:
        model: the model about to run; module paths come from its ``named_modules``.
        track_memory: track live tensor storages.
        fast_leaves: charge known leaf modules without intercepting their operators, where
            that gives the same figures (``None``: the module-level ``FAST_LEAVES``). Read
            when a module is first seen.
        named: the model's ``named_modules(remove_duplicate=False)``, if already listed.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        track_memory: bool = True,
        fast_leaves: bool | None = None,
        named: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        self.paths: dict[int, str] = {}
        if named is None:
            named = list(model.named_modules(remove_duplicate=False))
        for path, m in named:
            self.paths.setdefault(id(m), path)
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.stack: list[str] = [""]
        self.phase = "forward"
        self.backward = Tally()
        self.memory = _MemoryTracker() if track_memory else None
        self.fast_leaves = FAST_LEAVES if fast_leaves is None else fast_leaves
        #: leaf modules charged by the fast path (calls), for tests and diagnostics
        self.fast_calls = 0
        #: per module seen: its path, its tally and its fast-path rule (None: none)
        self._seen: dict[int, tuple[str, Tally, LeafRule | None]] = {}
        self._paused: list[tuple[nn.Module, LeafRule]] = []
        self._handles: list[Any] = []

    # -- module tracking ------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: Any) -> None:
        seen = self._seen.get(id(module))
        if seen is None:
            path = self.paths.get(id(module))
            if path is None:
                return  # not part of the model (created during the forward)
            rule = rule_for(module) if self.fast_leaves else None
            seen = self._seen[id(module)] = (path, self.tallies[path], rule)
        path, tally, rule = seen
        self.stack.append(path)
        tally.calls += 1
        if rule is not None and self._can_pause(module, args, rule):
            # what torch.utils._python_dispatch._pop_mode does for a mode without a dispatch
            # key, minus its Python overhead
            torch._C._pop_torch_dispatch_stack(None)
            self._paused.append((module, rule))

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._paused and self._paused[-1][0] is module:
            rule = self._paused.pop()[1]
            try:
                if isinstance(out, torch.Tensor):  # None when the forward raised
                    self._charge_leaf(rule, module, args[0], out)
            finally:
                torch._C._push_on_torch_dispatch_stack(self)
        seen = self._seen.get(id(module))
        if seen is not None and len(self.stack) > 1 and self.stack[-1] == seen[0]:
            self.stack.pop()

    def _can_pause(self, module: nn.Module, args: Any, rule: LeafRule) -> bool:
        """Whether the fast path gives the dispatch path's figures for this call.

        Refused (the operators are intercepted one by one): several or keyword inputs, backward
        counting or gradients, tensor subclasses, non-CPU or non-float inputs, autocast, torch
        function modes, functorch transforms, hooks that would run while the mode is paused,
        another dispatch mode pushed inside this one, and what the module's rule refuses.
        """
        if len(args) != 1 or self.phase != "forward":
            return False
        x = args[0]
        return (
            type(x) is torch.Tensor
            and x.is_cpu
            and x.layout is torch.strided
            and x.is_floating_point()
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            # nothing else may run inside the paused region: no hooks of the module's own
            # (a pre-hook may compute a weight), no global hooks but this counter's
            and not module._forward_pre_hooks
            and not module._backward_hooks
            and not module._backward_pre_hooks
            and len(_module_hooks._global_forward_pre_hooks) == 1
            and len(_module_hooks._global_forward_hooks) == 1
            and not _module_hooks._global_backward_hooks
            and not _module_hooks._global_backward_pre_hooks
            and _get_current_dispatch_mode() is self
            and rule.call_ok(module, x)
        )

    def _charge_leaf(
        self, rule: LeafRule, module: nn.Module, x: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Charge a paused leaf module's operators and output, as the dispatch path would."""
        tally = self.tallies[self.stack[-1]]
        for func, args, kwargs, op_out in rule.calls(module, x, out):
            self._charge(tally, func, args, kwargs, op_out)
        if self.memory is not None:
            self.memory.add(out)
            transient = rule.transient_bytes(module, out)
            if transient:
                self.memory.add_transient(transient)
        self.fast_calls += 1

    def __enter__(self) -> OpCounter:
        self._handles = [
            _module_hooks.register_module_forward_pre_hook(self._pre),
            _module_hooks.register_module_forward_hook(self._post, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.stack = [""]
        if self.memory is not None:
            self.memory.stop()
        return super().__exit__(*exc)

    def start_memory(self, tensors: list[torch.Tensor]) -> None:
        """Count these (parameters, buffers, inputs) as live from the start."""
        if self.memory is not None:
            for t in tensors:
                self.memory.add(t)

    # -- operators ------------------------------------------------------------------------------
    def _charge(self, tally: Tally, func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        cost = cost_of(func, args, kwargs, out)
        if cost is None:
            name = str(getattr(func, "overloadpacket", func))
            tally.unsupported[name] = tally.unsupported.get(name, 0) + 1
        else:
            tally.macs += int(cost[0])
            tally.other_flops += int(cost[1])

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tally = self.backward if self.phase == "backward" else self.tallies[self.stack[-1]]
        self._charge(tally, func, args, kwargs, out)
        if self.memory is not None:
            if isinstance(out, torch.Tensor):
                self.memory.add(out)
            elif isinstance(out, (tuple, list)):
                for t in out:
                    if isinstance(t, torch.Tensor):
                        self.memory.add(t)
        return out
