"""One instrumented forward pass: operator costs per module and live-tensor memory.

:class:`OpCounter` is a ``TorchDispatchMode``: it sees every aten operator, whatever Python code
called it (modules, functional calls, ``@``, ``einsum``, fused attention kernels), and charges its
cost to the innermost module running, tracked with global forward hooks. It also tracks every
tensor storage the operators create, through weak references, to measure peak memory.
"""

from __future__ import annotations

import functools
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .formulas import cost_of

__all__ = ["OpCounter", "Tally"]


@dataclass
class Tally:
    """Costs charged to one module (exclusive of its children)."""

    macs: int = 0
    other_flops: int = 0
    calls: int = 0
    unsupported: dict[str, int] = field(default_factory=dict)


class _MemoryTracker:
    """Bytes held by live tensor storages, and their peak.

    Storages are keyed by their C++ address; a weak reference to each storage's Python object
    (which torch keeps alive as long as the storage lives) tells when it is freed.
    """

    def __init__(self) -> None:
        self._live: dict[int, weakref.ref] = {}
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
        self._live[key] = weakref.ref(st, functools.partial(self._release, key, nbytes))
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current

    def _release(self, key: int, nbytes: int, _ref: weakref.ref) -> None:
        if self._live.get(key) is _ref:
            del self._live[key]
            self.current -= nbytes


class OpCounter(TorchDispatchMode):
    """Count operator costs per module and track memory during one forward (and backward).

    Args:
        model: the model about to run; module paths come from its ``named_modules``.
        track_memory: track live tensor storages.
    """

    def __init__(self, model: nn.Module, *, track_memory: bool = True) -> None:
        super().__init__()
        self.paths: dict[int, str] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(m), path)
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.stack: list[str] = [""]
        self.phase = "forward"
        self.backward = Tally()
        self.memory = _MemoryTracker() if track_memory else None
        self._handles: list[Any] = []

    # -- module tracking ------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None:
            self.stack.append(path)
            self.tallies[path].calls += 1

    def _post(self, module: nn.Module, args: Any, out: Any) -> None:
        path = self.paths.get(id(module))
        if path is not None and len(self.stack) > 1 and self.stack[-1] == path:
            self.stack.pop()

    def __enter__(self) -> OpCounter:
        from torch.nn.modules import module as mod

        self._handles = [
            mod.register_module_forward_pre_hook(self._pre),
            mod.register_module_forward_hook(self._post, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.stack = [""]
        return super().__exit__(*exc)

    def start_memory(self, tensors: list[torch.Tensor]) -> None:
        """Count these (parameters, buffers, inputs) as live from the start."""
        if self.memory is not None:
            for t in tensors:
                self.memory.add(t)

    # -- operators ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tally = self.backward if self.phase == "backward" else self.tallies[self.stack[-1]]
        cost = cost_of(func, args, kwargs, out)
        if cost is None:
            name = str(getattr(func, "overloadpacket", func))
            tally.unsupported[name] = tally.unsupported.get(name, 0) + 1
        else:
            tally.macs += int(cost[0])
            tally.other_flops += int(cost[1])
        if self.memory is not None:
            if isinstance(out, torch.Tensor):
                self.memory.add(out)
            elif isinstance(out, (tuple, list)):
                for t in out:
                    if isinstance(t, torch.Tensor):
                        self.memory.add(t)
        return out
