"""One instrumented forward pass: operator costs per module and live-tensor memory.

:class:`OpCounter` is a ``TorchDispatchMode``: it sees every aten operator, whatever Python code
called it (modules, functional calls, ``@``, ``einsum``, fused attention kernels), and charges its
cost to the innermost module running. Modules are tracked by wrapping each one's ``forward`` for
the duration of the count (modules with hooks of their own get hooks instead). The counter also
tracks every tensor storage the operators create, through weak references, to measure peak
memory.

Leaf fast path (opt-in: ``profile(fast=True)``): inside leaf modules of an exactly known type (convolution, linear, eval-mode
BatchNorm, LayerNorm, common activations and pooling; see :mod:`.leaf_rules`), run without
gradients on plain CPU tensors, the counter pauses its mode and charges, after the forward, what
the operators that module dispatches cost: from per-element coefficients equal to the formulas'
(or through the formulas themselves, for an operator whose formula was replaced), with the same
bookkeeping. The counts, per-module tallies and memory peak are the same; those operators skip
the interception (a Python call into ``__torch_dispatch__`` and back, per operator).

Wrapping forwards rather than registering global module hooks keeps ``Module.__call__`` on its
hook-free path, and the wrappers are ``functools.partial`` objects: a profile allocates few
objects, so the garbage collector (whose full collections cost more than a small model's
forward) runs less often.
"""

from __future__ import annotations

import copy
import types
import weakref
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .formulas import REPLACED, cost_of
from .leaf_rules import Coef, LeafRule, rule_for

__all__ = ["OpCounter", "Tally"]

# the C functions behind the fast path's checks, looked up once (they run for every leaf call)
_pop_mode = torch._C._pop_torch_dispatch_stack
_push_mode = torch._C._push_on_torch_dispatch_stack
_mode_depth = torch._C._len_torch_dispatch_stack
_mode_at = torch._C._get_dispatch_stack_at
_any_autocast = torch._C._is_any_autocast_enabled
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


@dataclass(slots=True)
class Tally:
    """Costs charged to one module (exclusive of its children).

    ``unsupported``: operators without a formula and how often they ran (``None``: none).
    """

    macs: int = 0
    other_flops: int = 0
    calls: int = 0
    unsupported: dict[str, int] | None = None


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


class _Forward(partial):
    """A module's forward as an :class:`OpCounter` wraps it: ``partial(_counted or
    _counted_leaf, counter, forward, path, ...)``, set on the module instance.

    It looks like the forward it wraps where code inspects a module's forward during the
    count (``inspect.signature(self.forward)`` in Hugging Face ``generate``: ``__wrapped__``;
    ``__name__``, ``__self__``...), and a copy of the module made meanwhile gets the forward,
    not the wrapper.
    """

    __slots__ = ()

    @property
    def __wrapped__(self) -> Any:
        return self.args[1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.args[1], name)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return copy.deepcopy(self.args[1], memo)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.args[1].__reduce_ex__(protocol)


def _counted(counter: OpCounter, forward: Any, path: str, /, *args: Any, **kwargs: Any) -> Any:
    """A module's forward, with its path on the counter's stack (see ``OpCounter._install``)."""
    if not counter._counting:  # a wrapper that outlived its count (kept by other code)
        return forward(*args, **kwargs)
    stack = counter.stack
    stack.append(path)
    counter.tallies[path].calls += 1
    try:
        return forward(*args, **kwargs)
    finally:
        stack.pop()


def _counted_leaf(
    counter: OpCounter,
    forward: Any,
    path: str,
    module: nn.Module,
    rule: LeafRule,
    coef: Coef | None,
    /,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A leaf module's forward with a rule: the fast path where the call allows it."""
    if not counter._counting:
        return forward(*args, **kwargs)
    stack = counter.stack
    stack.append(path)
    tally = counter.tallies[path]
    tally.calls += 1
    try:
        if kwargs or len(args) != 1:
            return forward(*args, **kwargs)
        x = args[0]
        if not (counter._can_pause(x) and rule.call_ok(module, x)):
            return forward(x)
        # what torch.utils._python_dispatch._pop_mode does for a mode without a dispatch key,
        # minus its Python overhead
        _pop_mode(None)
        try:
            out = forward(x)
        finally:
            _push_mode(counter)
        if type(out) is torch.Tensor:  # None if the forward raised
            if coef is None:
                for func, op_args, op_kwargs, op_out in rule.calls(module, x, out):
                    counter._charge(tally, func, op_args, op_kwargs, op_out)
            else:
                n = x.numel() if coef[2] else out.numel()
                tally.macs += coef[0] * n
                tally.other_flops += coef[1] * n
            if counter.memory is not None:
                counter._leaf_memory(rule, module, out)
            counter.fast_calls += 1
        return out
    finally:
        stack.pop()


def _plain_forward(module: nn.Module, forward: Any) -> Any:
    """``forward`` without wrappers of counts that have ended; ``None`` if that leaves the
    class's own forward (nothing to set on the instance)."""
    while isinstance(forward, _Forward) and not forward.args[0]._counting:
        forward = forward.args[1]
    if (
        isinstance(forward, types.MethodType)
        and forward.__self__ is module
        and forward.__func__ is getattr(type(module), "forward", None)
    ):
        return None
    return forward


class OpCounter(TorchDispatchMode):
    """Count operator costs per module and track memory during one forward (and backward).

    Modules are tracked by wrapping their ``forward`` for the duration of the ``with`` block (an
    instance attribute, removed on exit), so that ``Module.__call__`` keeps its hook-free fast
    path: a global module hook sends every module call down the slow path. Modules with hooks
    of their own get a pre-hook (run first) and an always-called forward hook (run last)
    instead, so that what their hooks compute is charged to them. A leaf module's fast-path
    rule is chosen when the block is entered, from the module as it is then.

    Args:
        model: the model about to run; module paths come from its ``named_modules``.
        track_memory: track live tensor storages.
        fast_leaves: charge known leaf modules without intercepting their operators, where
            that gives the same figures (opt-in: it pauses the mode through private torch
            functions).
        named: the model's ``named_modules(remove_duplicate=False)``, if already listed.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        track_memory: bool = True,
        fast_leaves: bool = False,
        named: list[tuple[str, nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        self._named = list(model.named_modules(remove_duplicate=False)) if named is None else named
        self.tallies: dict[str, Tally] = defaultdict(Tally)
        self.stack: list[str] = [""]
        self.phase = "forward"
        self.backward = Tally()
        self.memory = _MemoryTracker() if track_memory else None
        self.fast_leaves = fast_leaves
        #: leaf modules charged by the fast path (calls), for tests and diagnostics
        self.fast_calls = 0
        # the modules whose forward is wrapped, their wrappers, and forwards that were set on
        # the instance before (parallel lists: few allocations, see _MemoryTracker.stop)
        self._wrapped: list[nn.Module] = []
        self._wrappers: list[Any] = []
        self._own_forwards: dict[int, Any] = {}
        self._handles: list[Any] = []
        #: between install and uninstall (wrappers kept past that call the forward directly)
        self._counting = False

    # -- module tracking ------------------------------------------------------------------------
    def _install(self) -> None:
        """Wrap the forward of every module (each once, at its first path).

        Modules with hooks of their own get hooks instead, so that what their hooks compute is
        charged to them; so do modules whose class makes ``forward`` a data descriptor (an
        instance attribute would not shadow it). The modules under an ``nn.DataParallel`` are
        left alone: it runs copies of them, which would share the wrappers (their costs go to
        the ``DataParallel`` module).
        """
        seen: set[int] = set()
        fast = self.fast_leaves
        coefs_ok: dict[int, bool] = {}  # per rule: no formula of its operators replaced
        skip: list[str] = []  # paths (with a trailing dot) under a DataParallel
        self._counting = True
        try:
            for path, m in self._named:
                if id(m) in seen or (skip and path.startswith(tuple(skip))):
                    continue
                seen.add(id(m))
                if isinstance(m, nn.DataParallel):
                    skip.append(path + "." if path else "")
                if (
                    m._forward_pre_hooks
                    or m._forward_hooks
                    or m._backward_hooks
                    or m._backward_pre_hooks
                ):
                    self._hook(m, path)
                    continue
                d = m.__dict__
                own = d.get("forward")  # a forward set on the instance (accelerate...)
                forward = m.forward
                rule = rule_for(m) if fast and own is None else None
                if rule is None:
                    wrapper = _Forward(_counted, self, forward, path)
                else:
                    ok = coefs_ok.get(id(rule))
                    if ok is None:
                        ok = coefs_ok[id(rule)] = REPLACED.isdisjoint(rule.ops)
                    coef = rule.coef(m) if ok else None
                    wrapper = _Forward(_counted_leaf, self, forward, path, m, rule, coef)
                d["forward"] = wrapper
                if m.forward is not wrapper:  # a data descriptor on the class
                    if own is None:
                        del d["forward"]
                    else:
                        d["forward"] = own
                    self._hook(m, path)
                    continue
                if own is not None:
                    self._own_forwards[id(m)] = own
                self._wrapped.append(m)
                self._wrappers.append(wrapper)
        except BaseException:
            self._uninstall()
            raise

    def _uninstall(self) -> None:
        self._counting = False
        own_forwards = self._own_forwards
        for m, wrapper in zip(self._wrapped, self._wrappers):
            d = m.__dict__
            if d.get("forward") is wrapper:  # unless the forward replaced it meanwhile
                # a forward set before, less the wrappers of counts ended since (another
                # thread's count of the same model that began before this one ended first)
                own = own_forwards.get(id(m))
                if own is not None:
                    own = _plain_forward(m, own)
                if own is None:
                    del d["forward"]
                else:
                    d["forward"] = own
        self._wrapped = []
        self._wrappers = []
        self._own_forwards = {}
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, path: str) -> None:
        def pre(m: nn.Module, args: Any) -> None:
            self.stack.append(path)
            self.tallies[path].calls += 1

        def post(m: nn.Module, args: Any, out: Any) -> None:
            if len(self.stack) > 1 and self.stack[-1] == path:
                self.stack.pop()

        self._handles.append(module.register_forward_pre_hook(pre, prepend=True))
        self._handles.append(module.register_forward_hook(post, always_call=True))

    def _can_pause(self, x: Any) -> bool:
        """Whether the fast path can give the dispatch path's figures for a call on ``x``.

        Refused (the operators are intercepted one by one): backward counting or gradients,
        tensor subclasses, non-CPU or non-float inputs, autocast, torch function modes,
        functorch transforms, and another dispatch mode pushed inside this one; then the
        module's rule has its say. (Several or keyword inputs are refused by the caller; the
        module's hooks, and global ones, run outside the paused region.)
        """
        if not (
            type(x) is torch.Tensor
            and self.phase == "forward"
            and x.is_cpu
            and x.layout is torch.strided
            and x.is_floating_point()
            and not torch.is_grad_enabled()
            and not _any_autocast()
            and not _torch_function_mode()
            and not _is_functorch_wrapped(x)
        ):
            return False
        depth = _mode_depth()
        return depth > 0 and _mode_at(depth - 1) is self

    def _leaf_memory(self, rule: LeafRule, module: nn.Module, out: torch.Tensor) -> None:
        """Track a paused leaf's output, and what it allocated and freed, as the dispatch path
        would have."""
        memory = self.memory
        memory.add(out)
        transient = rule.transient_bytes(module, out)
        if transient:
            memory.add_transient(transient)

    def __enter__(self) -> OpCounter:
        self._install()
        try:
            return super().__enter__()
        except BaseException:
            self._uninstall()
            raise

    def __exit__(self, *exc: Any) -> None:
        self._uninstall()
        del self.stack[1:]
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
            if tally.unsupported is None:
                tally.unsupported = {}
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
