"""``nnslim.profile``: FLOPs, MACs, parameters, bytes, memory and latency, per module."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..base.inputs import Inputs, as_inputs, check_device, forward_error, output_tensors
from ..base.snapshot import preserved_state
from ..base.table import format_table, human
from ..base.validate import check_int
from .counter import OpCounter, Tally
from .latency import Latency, measure_latency

__all__ = ["Comparison", "ModuleProfile", "Profile", "profile"]


@dataclass
class ModuleProfile:
    """Figures for one module, its children included."""

    path: str
    type: str
    macs: int = 0
    other_flops: int = 0
    params: int = 0
    param_bytes: int = 0
    calls: int = 0

    @property
    def flops(self) -> int:
        """FLOPs of matrix work (``2 * macs``) plus the other FLOPs."""
        return 2 * self.macs + self.other_flops


@dataclass
class Profile:
    """The result of :func:`profile`.

    Attributes:
        macs: multiply-accumulates of matrix work (matmul, convolution, attention).
        other_flops: FLOPs of everything else (pointwise, normalisation, softmax, pooling).
        params: number of weights, tied weights counted once; packed and shared weights count
            the weights they stand for.
        param_bytes: bytes that hold the weights (packed storage at its real size).
        buffer_bytes: bytes of other persistent buffers (BatchNorm statistics, masks...).
        zero_params: weights equal to zero, in weight tensors (two or more dimensions, packed
            weights included).
        weight_count: number of weights in those tensors (the denominator of ``sparsity``).
        peak_bytes: peak bytes of live tensors during one forward pass (parameters, buffers,
            inputs, activations and temporaries), ``None`` if memory was not tracked.
        static_bytes: bytes live before the forward (parameters, buffers, inputs).
        backward_peak_bytes: peak during forward + backward, if requested.
        backward_macs: MACs of the backward pass, if requested.
        latency: latency statistics if requested.
        modules: per-module figures (inclusive of children), keyed by path (``""`` is the model).
        unsupported: operators without a cost formula, mapped to the modules that ran them
            (``"(backward)"`` for the backward pass); they were counted as zero.
        output_finite: whether every floating-point tensor the forward returned was finite
            (no NaN or Inf).
    """

    macs: int
    other_flops: int
    params: int
    param_bytes: int
    buffer_bytes: int
    zero_params: int
    weight_count: int
    peak_bytes: int | None
    static_bytes: int
    modules: dict[str, ModuleProfile] = field(default_factory=dict)
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    latency: Latency | None = None
    backward_macs: int | None = None
    backward_peak_bytes: int | None = None
    output_finite: bool = True

    @property
    def flops(self) -> int:
        """All FLOPs: ``2 * macs + other_flops``."""
        return 2 * self.macs + self.other_flops

    @property
    def sparsity(self) -> float:
        """Fraction of weights (in tensors of two or more dimensions) that are zero."""
        return self.zero_params / self.weight_count if self.weight_count else 0.0

    @property
    def activation_peak_bytes(self) -> int | None:
        """Peak bytes above what was live before the forward."""
        return None if self.peak_bytes is None else self.peak_bytes - self.static_bytes

    def summary(self) -> dict[str, Any]:
        """The headline figures as a flat dict."""
        return {
            "macs": self.macs,
            "flops": self.flops,
            "other_flops": self.other_flops,
            "params": self.params,
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "sparsity": self.sparsity,
            "peak_bytes": self.peak_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "backward_macs": self.backward_macs,
            "backward_peak_bytes": self.backward_peak_bytes,
            "latency_ms": self.latency.median_ms if self.latency else None,
            "threads": self.latency.threads if self.latency else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready: the summary, the per-module tree and unsupported operators."""
        return {
            **self.summary(),
            "latency": None
            if self.latency is None
            else {
                "median_ms": self.latency.median_ms,
                "p10_ms": self.latency.p10_ms,
                "p90_ms": self.latency.p90_ms,
                "runs": self.latency.runs,
                "threads": self.latency.threads,
            },
            "modules": {
                p: {
                    "type": m.type,
                    "macs": m.macs,
                    "flops": m.flops,
                    "other_flops": m.other_flops,
                    "params": m.params,
                    "param_bytes": m.param_bytes,
                    "calls": m.calls,
                }
                for p, m in self.modules.items()
            },
            "unsupported": self.unsupported,
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, depth: int = 1) -> str:
        """The per-module breakdown down to ``depth`` levels below the model, as text."""
        total = max(self.macs, 1)
        rows = []
        for path, m in self.modules.items():
            d = 0 if path == "" else path.count(".") + 1
            if d > depth:
                continue
            name = "  " * d + (path.rsplit(".", 1)[-1] if path else "(model)")
            rows.append(
                [
                    name,
                    m.type,
                    human(m.params),
                    human(m.macs),
                    human(m.other_flops),
                    f"{100 * m.macs / total:.1f}%",
                ]
            )
        head = (
            f"MACs {human(self.macs)}  FLOPs {human(self.flops)} (other {human(self.other_flops)})"
            f"  params {human(self.params)}  weights {human(self.param_bytes, 'B')}"
        )
        if self.peak_bytes is not None:
            head += f"  peak memory {human(self.peak_bytes, 'B')}"
        if self.latency is not None:
            head += f"\nlatency {self.latency}"
        parts = [
            head,
            format_table(["module", "type", "params", "MACs", "other FLOPs", "MACs %"], rows),
        ]
        if self.unsupported:
            ops = ", ".join(
                f"{op} (in {', '.join(p or '(model)' for p in paths[:3])})"
                for op, paths in self.unsupported.items()
            )
            parts.append(f"counted as zero (no formula): {ops}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def compare(self, after: Profile) -> Comparison:
        """Before/after ratios, with this profile as "before"."""
        return Comparison(self, after)

    def __sub__(self, other: Profile) -> Comparison:
        return self.compare(other)


_METRICS = [
    ("MACs", "macs", ""),
    ("FLOPs", "flops", ""),
    ("params", "params", ""),
    ("weight bytes", "param_bytes", "B"),
    ("sparsity", "sparsity", ""),
    ("peak memory", "peak_bytes", "B"),
    ("latency ms", "latency_ms", ""),
]


@dataclass(frozen=True)
class Comparison:
    """Before/after figures of two profiles and their ratios (after / before)."""

    before: Profile
    after: Profile

    def ratio(self, metric: str) -> float | None:
        """``after / before`` for a summary metric (``"macs"``, ``"params"``, ...)."""
        b = self.before.summary().get(metric)
        a = self.after.summary().get(metric)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def to_dict(self) -> dict[str, Any]:
        return {
            key: {
                "before": self.before.summary()[key],
                "after": self.after.summary()[key],
                "ratio": self.ratio(key),
            }
            for _, key, _ in _METRICS
        }

    def table(self) -> str:
        rows = []
        for label, key, unit in _METRICS:
            b = self.before.summary()[key]
            a = self.after.summary()[key]
            if a is None and b is None:
                continue
            if key == "sparsity":
                rows.append([label, f"{b:.1%}", f"{a:.1%}", "-"])
                continue
            r = self.ratio(key)
            rows.append(
                [label, _fmt(b, key, unit), _fmt(a, key, unit), "-" if r is None else f"{r:.3f}x"]
            )
        return format_table(["", "before", "after", "ratio"], rows)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: Any, key: str, unit: str) -> str:
    if key == "latency_ms":
        return "-" if value is None else f"{value:.3f}"
    return human(value, unit)


def _own_tensors(walk: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """Every parameter and buffer of the walked modules, once each; not those of lazy modules
    that are still to be built (they are allocated during the forward)."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for _, m in walk:
        for tensors in (m._parameters, m._buffers):
            if tensors:
                for t in tensors.values():
                    if t is not None and id(t) not in seen and not is_lazy(t):
                        seen.add(id(t))
                        out.append(t)
    return out


def _storage_key(st: Any) -> Any:
    """One key per block of memory: a storage's device, address and size where it has an
    address (two storage objects over the same memory are one), else the storage object."""
    try:
        ptr = st.data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without data
        ptr = 0
    return (st.device, ptr, st.nbytes()) if ptr else st._cdata


def _weights(
    named: list[tuple[str, nn.Module]],
) -> tuple[int, int, int, int, int, dict[str, tuple[int, int]]]:
    """Params, param bytes, buffer bytes, zero weights, weight count; per-module own figures.

    ``named`` is the model's ``named_modules()``. A tensor seen before (the same view of the
    same storage: tied weights) counts once; bytes count once per storage (views of one
    storage, a fused qkv weight split three ways, hold its bytes once). The
    ``nnslim_weight_buffers`` and ``nnslim_zero_weights`` methods are looked up on each module's
    class: looking them up on the instance goes through ``Module.__getattr__``, which raises for
    every module without them. Modules without tensors of their own (containers) are left out
    of the per-module figures.
    """
    views: set[Any] = set()
    storages: set[Any] = set()
    params = pbytes = bbytes = zeros = wcount = 0
    own: dict[str, tuple[int, int]] = {}
    hooks: dict[type, tuple[Any, Any]] = {}
    for path, m in named:
        cls = type(m)
        found = hooks.get(cls)
        if found is None:
            found = hooks[cls] = (
                getattr(cls, "nnslim_weight_buffers", None),
                getattr(cls, "nnslim_zero_weights", None),
            )
        weight_buffers, zero_weights = found
        mp = mb = 0
        # weights a layer stores in another form (codes, packed values): counted as the
        # weights they stand for
        weight_bufs = m.nnslim_weight_buffers() if callable(weight_buffers) else {}
        for pname, p in m._parameters.items():
            if p is None:
                continue
            st = p.untyped_storage()
            key = _storage_key(st)
            view = (key, p.storage_offset(), p.shape, p.stride())
            if view in views:
                continue
            views.add(view)
            numel = p.numel()
            if key not in storages:
                storages.add(key)
                mb += st.nbytes()
            if pname in weight_bufs:
                mp += int(weight_bufs[pname])
                wcount += int(weight_bufs[pname])
                continue
            mp += numel
            if p.dim() >= 2:
                wcount += numel
                if not p.is_meta:
                    zeros += numel - int(torch.count_nonzero(p))
        if m._buffers:
            for name, b in m._buffers.items():
                if b is None or name in m._non_persistent_buffers_set:
                    continue
                view = (_storage_key(b.untyped_storage()), b.storage_offset(), b.shape, b.stride())
                if view in views:
                    continue
                views.add(view)
                nbytes = b.numel() * b.element_size()
                if name in weight_bufs:
                    mp += int(weight_bufs[name])
                    wcount += int(weight_bufs[name])
                    mb += nbytes
                else:
                    bbytes += nbytes
        # zeros are read from the values: none on the meta device (as for float weights)
        on_meta = any(
            t.is_meta for t in (*m._parameters.values(), *m._buffers.values()) if t is not None
        )
        if callable(zero_weights) and not on_meta:
            zeros += int(m.nnslim_zero_weights())
        if mp or mb:
            params += mp
            pbytes += mb
            own[path] = (mp, mb)
    return params, pbytes, bbytes, zeros, wcount, own


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency: bool = False,
    memory: bool = True,
    backward: bool = False,
    threads: int | None = None,
    warmup: int = 3,
    repeat: int = 20,
    fast: bool = False,
) -> Profile:
    """Profile one forward pass of ``model`` on ``example_inputs``.

    MACs and FLOPs are counted at the dispatcher level, so functional code, ``@``, ``einsum``,
    ``addmm`` (Hugging Face ``Conv1D``), grouped/depthwise convolutions and fused attention
    kernels are all counted, with and without gradients. The model runs in eval mode and its
    state is left as it was (each module's train/eval flag, and any buffer the forward writes,
    such as a counter, is restored afterwards).

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, tuple of tensors or dict of keyword tensors.
        latency: also time the forward (median of ``repeat`` runs after ``warmup``).
        memory: track the peak memory of live tensors during the forward.
        backward: also run a backward pass (sum of floating outputs) and record its MACs and
            the forward+backward memory peak.
        threads: torch threads for the latency measurement (``None``: current setting).
        warmup: untimed runs before timing.
        repeat: timed runs.
        fast: charge leaf modules of a known type (convolution, linear, eval-mode norms,
            activations, pooling) without intercepting their operators, where that gives the
            same figures: mobilenet_v3_small 2.2x a forward instead of 2.7x, transformers
            unchanged (``benchmarks/profiler.py --quick --threads 1``); it steps around the
            dispatcher with private torch functions, so it is off unless asked for.

    Returns:
        A :class:`Profile`.

    Raises:
        TypeError: if the inputs have the wrong type.
        ValueError: if the forward fails on the inputs or they are on another device.

    Example:
        >>> import torch, nnslim
        >>> p = nnslim.profile(torch.nn.Linear(64, 32), torch.randn(8, 64))
        >>> p.macs, p.params
        (16384, 2080)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"profile: expected an nn.Module, got {type(model).__name__}.")
    check_int("profile", "repeat", repeat, low=1)
    check_int("profile", "warmup", warmup, low=0)
    if threads is not None:
        check_int("profile", "threads", threads, low=1, hint="None keeps torch's setting.")
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TypeError("profile: example_inputs is required (a tensor, tuple or dict).")
    check_device(model, inputs)
    # one walk of the model before the forward serves the mode switch, the module paths and
    # the tensors live from the start (each walk costs a few percent of a small model's forward)
    walk = list(model.named_modules(remove_duplicate=False))
    with preserved_state(model, [m for _, m in walk]):
        counter = OpCounter(model, track_memory=memory, fast_leaves=fast, named=walk)
        state = _own_tensors(walk) + inputs.tensors()
        try:
            with counter, torch.no_grad():
                counter.start_memory(state)
                static = counter.memory.current if counter.memory else 0
                out = inputs.call(model)
        except Exception as e:
            raise forward_error(model, inputs, e, "example_inputs") from e
        finite = _finite_output(out)
        del out
        peak = counter.memory.peak if counter.memory else None
        back_macs = back_peak = None
        back_unsupported: dict[str, int] = {}
        if backward:
            back_macs, back_peak, back_unsupported = _backward(model, inputs, memory)
        lat = (
            measure_latency(model, inputs, warmup=warmup, repeat=repeat, threads=threads)
            if latency
            else None
        )
    named = list(model.named_modules())  # after the forward: lazy modules are built
    params, pbytes, bbytes, zeros, wcount, own = _weights(named)
    if not memory:
        static = sum(t.untyped_storage().nbytes() for t in state if t.device.type != "meta")
    modules, total_macs, total_other = _tree(named, counter.tallies, own)
    unsupported: dict[str, list[str]] = {}
    for path, tally in counter.tallies.items():
        for op in tally.unsupported or ():
            unsupported.setdefault(op, []).append(path)
    for op in back_unsupported:
        unsupported.setdefault(op, []).append("(backward)")
    return Profile(
        macs=total_macs,
        other_flops=total_other,
        params=params,
        param_bytes=pbytes,
        buffer_bytes=bbytes,
        zero_params=zeros,
        weight_count=wcount,
        peak_bytes=peak,
        static_bytes=static,
        modules=modules,
        unsupported=unsupported,
        latency=lat,
        backward_macs=back_macs,
        backward_peak_bytes=back_peak,
        output_finite=finite,
    )


def _finite_output(out: Any) -> bool:
    return all(
        bool(torch.isfinite(t).all())
        for t in output_tensors(out)
        if t.is_floating_point() and t.device.type != "meta"
    )


def _backward(
    model: nn.Module, inputs: Inputs, memory: bool
) -> tuple[int, int | None, dict[str, int]]:
    walk = list(model.named_modules(remove_duplicate=False))
    counter = OpCounter(model, track_memory=memory, named=walk)
    state = _own_tensors(walk) + inputs.tensors()
    grads = [p.grad for p in model.parameters()]
    with counter:
        counter.start_memory(state)
        with torch.enable_grad():
            out = inputs.call(model)
            loss = sum(
                t.float().sum()
                for t in output_tensors(out)
                if t.is_floating_point() and t.requires_grad
            )
            counter.phase = "backward"
            if isinstance(loss, torch.Tensor):
                loss.backward()
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    peak = counter.memory.peak if counter.memory else None
    return counter.backward.macs, peak, counter.backward.unsupported or {}


#: the tally of a module that did not run (read only)
_NOT_CALLED = Tally()


def _tree(
    named: list[tuple[str, nn.Module]], tallies: dict[str, Tally], own: dict[str, tuple[int, int]]
) -> tuple[dict[str, ModuleProfile], int, int]:
    modules: dict[str, ModuleProfile] = {}
    for path, m in named:
        mp, mb = own.get(path, (0, 0))
        t = tallies.get(path, _NOT_CALLED)
        modules[path] = ModuleProfile(
            path, type(m).__name__, t.macs, t.other_flops, mp, mb, t.calls
        )
    # costs charged to paths the model no longer has after the forward (a module it removed)
    extra = [path for path in tallies if path not in modules]
    for path in extra:
        t = tallies[path]
        modules[path] = ModuleProfile(path, "?", t.macs, t.other_flops, 0, 0, t.calls)
    # roll children up into parents, children first: named_modules lists a module before its
    # children, so the reverse lists every child before its parent
    order = reversed(modules) if not extra else sorted(modules, key=lambda p: -p.count("."))
    for path in order:
        if path == "":
            continue
        parent = path.rpartition(".")[0]
        while parent not in modules and parent:
            parent = parent.rpartition(".")[0]
        pm, cm = modules[parent], modules[path]
        pm.macs += cm.macs
        pm.other_flops += cm.other_flops
        pm.params += cm.params
        pm.param_bytes += cm.param_bytes
    root = modules[""]
    return modules, root.macs, root.other_flops
