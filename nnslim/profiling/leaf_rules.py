"""Leaf modules whose operators the profiler can charge without intercepting them.

Intercepting an aten operator with a ``TorchDispatchMode`` costs a Python call into
``__torch_dispatch__`` and back, which adds up on models made of many small operators
(mobilenet). For leaf modules of an exactly known type (not a subclass), in eval mode, without
gradients, on plain dense CPU tensors, the operators a forward dispatches are fixed by the
module's attributes and the input's shape and layout.
:class:`~nnslim.profiling.counter.OpCounter` pauses its mode inside such a module and charges,
after the forward, what the operators listed here cost, with the same bookkeeping as the
dispatch path.

Each rule lists the cost-bearing operators the module dispatches, with the arguments the
dispatcher passes them, and the cost of a call per output (or input) element as the built-in
formulas (:func:`~nnslim.profiling.formulas.cost_of`) give it: one multiplication per call
instead of a pass through the formulas. Where a formula of one of those operators has been
replaced with :func:`~nnslim.register_formula`, the listed operators go through the formulas. Operators that only make views or empty tensors (``aten.t``,
``aten.view``, BatchNorm's zero-size reserve) are free and left out. Outputs that the forward
creates and drops before returning (``max_pool2d_with_indices``'s indices, ``native_layer_norm``'s
mean and rstd) are reported as transient bytes, so that the memory peak stays what the dispatch
path measures.

The tests in ``tests/profiling/test_leaf_fast_path.py`` check, for every rule, that the fast path
(both ways) and the dispatch path give the same counts, per-module tallies and memory peak: what
an operator dispatches can change between torch versions, and those tests are what catch it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .formulas import ELEMENT_COSTS

# Rules read parameters and buffers from ``_parameters`` / ``_buffers`` directly: ``m.weight``
# goes through ``Module.__getattr__``, a Python call per access, on a path that runs for every
# leaf module.

__all__ = ["LeafRule", "OpCall", "rule_for"]

aten = torch.ops.aten

#: One operator call as the dispatcher would see it: ``(op, args, kwargs, out)``.
OpCall = tuple[Any, tuple[Any, ...], dict[str, Any], Any]


def _always(module: nn.Module) -> bool:
    return True


def _any_input(module: nn.Module, x: torch.Tensor) -> bool:
    return True


def _no_transient(m: nn.Module, out: torch.Tensor) -> int:
    return 0


#: ``(MACs, other FLOPs, per input element)`` per element of a leaf call (see ``LeafRule.coef``)
Coef = tuple[int, int, bool]


def _no_coef(m: nn.Module) -> Coef | None:
    return None


@dataclass(frozen=True)
class LeafRule:
    """How to charge one leaf module type from its input and output.

    Attributes:
        calls: the cost-bearing operator calls the forward made, from the module, its input and
            its output.
        module_ok: checked once per module and profile: attributes that select another
            operator sequence (a padding mode, missing running statistics) are refused.
        call_ok: checked before each call, with the input: refuses training mode, input ranks
            or layouts that dispatch other operators.
        transient_bytes: bytes of outputs the forward created and freed before returning, from
            the module and its output.
        ops: the aten overload packets ``calls`` lists.
        coef: the cost of a call per element, from the module alone: ``(MACs, other FLOPs,
            per input element)``, the counts per output element when the last is false.
            ``None`` (or no function): charge ``calls`` through the formulas. Each is what
            the built-in formulas of ``ops`` give, for every call ``call_ok`` admits (the
            tests compare them); a formula registered over one of ``ops`` turns it off.
    """

    calls: Callable[[nn.Module, torch.Tensor, torch.Tensor], list[OpCall]]
    module_ok: Callable[[nn.Module], bool] = _always
    call_ok: Callable[[nn.Module, torch.Tensor], bool] = _any_input
    transient_bytes: Callable[[nn.Module, torch.Tensor], int] = _no_transient
    ops: tuple[Any, ...] = ()
    coef: Callable[[nn.Module], Coef | None] = _no_coef


# -- convolution --------------------------------------------------------------------------------
def _has_weight_and_bias(m: nn.Module) -> bool:
    # a weight (or bias) moved out of _parameters (to a buffer, to freeze it) is read elsewhere
    return "weight" in m._parameters and "bias" in m._parameters


def _conv_module_ok(m: nn.Module) -> bool:
    # other padding modes pad the input first; string padding ("same") may pad it too
    return m.padding_mode == "zeros" and not isinstance(m.padding, str) and _has_weight_and_bias(m)


def _conv_call_ok(m: nn.Module, x: torch.Tensor) -> bool:
    # batched input: an unbatched one adds unsqueeze/squeeze
    return x.dim() == m._parameters["weight"].dim()


def _conv_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    params = m._parameters
    args = (
        x,
        params["weight"],
        params["bias"],
        list(m.stride),
        list(m.padding),
        list(m.dilation),
        False,
        list(m.output_padding),
        m.groups,
    )
    return [(aten.convolution.default, args, {}, out)]


def _conv_coef(m: nn.Module) -> Coef:
    # formulas._conv (not transposed): Cin/groups * prod(kernel) MACs per output element
    w = m._parameters["weight"]
    return w.shape[1] * math.prod(w.shape[2:]), int(m._parameters["bias"] is not None), False


_CONV = LeafRule(
    _conv_calls, _conv_module_ok, _conv_call_ok, ops=(aten.convolution,), coef=_conv_coef
)


# -- linear -------------------------------------------------------------------------------------
def _linear_call_ok(m: nn.Module, x: torch.Tensor) -> bool:
    # 2-D: addmm / mm; contiguous N-D: flattened to 2-D by views. A non-contiguous N-D input
    # is copied first (a temporary) and its bias added separately.
    return x.dim() == 2 or (x.dim() > 2 and x.is_contiguous())


def _linear_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    if x.dim() != 2:
        x = x.view(-1, x.shape[-1])
        out = out.view(-1, out.shape[-1])
    params = m._parameters
    w_t = params["weight"].t()
    bias = params["bias"]
    if bias is None:
        return [(aten.mm.default, (x, w_t), {}, out)]
    return [(aten.addmm.default, (bias, x, w_t), {}, out)]


def _linear_coef(m: nn.Module) -> Coef:
    # formulas._addmm / _mm: in_features MACs per output element, plus the bias
    params = m._parameters
    return params["weight"].shape[1], int(params["bias"] is not None), False


_LINEAR = LeafRule(
    _linear_calls,
    _has_weight_and_bias,
    _linear_call_ok,
    ops=(aten.addmm, aten.mm),
    coef=_linear_coef,
)


# -- batch norm ---------------------------------------------------------------------------------
def _bn_module_ok(m: nn.Module) -> bool:
    # without running statistics, eval mode normalises with batch statistics (training kernel)
    buffers = m._buffers
    return (
        m.track_running_stats
        and buffers.get("running_mean") is not None
        and buffers.get("running_var") is not None
    )


def _bn_call_ok(m: nn.Module, x: torch.Tensor) -> bool:
    return not m.training


def _bn_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    momentum = 0.0 if m.momentum is None else m.momentum
    params, buffers = m._parameters, m._buffers
    args = (
        x,
        params["weight"],
        params["bias"],
        buffers["running_mean"],
        buffers["running_var"],
        False,
        momentum,
        m.eps,
    )
    # the kernel also returns two empty tensors (no saved statistics in eval mode)
    return [(aten.native_batch_norm.default, args, {}, (out,))]


def _bn_coef(m: nn.Module) -> Coef:
    return 0, ELEMENT_COSTS["batch_norm_eval"], True  # formulas._bn, eval mode


_BATCH_NORM = LeafRule(
    _bn_calls, _bn_module_ok, _bn_call_ok, ops=(aten.native_batch_norm,), coef=_bn_coef
)


# -- activations --------------------------------------------------------------------------------
def _pointwise_coef(m: nn.Module) -> Coef:
    return 0, ELEMENT_COSTS["pointwise"], False  # formulas._pointwise (float outputs)


def _activation(op: Any, inplace_op: Any = None, *extra: Any) -> LeafRule:
    def calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
        chosen = inplace_op if inplace_op is not None and m.inplace else op
        return [(chosen, (x, *extra), {}, out)]

    ops = tuple(o.overloadpacket for o in (op, inplace_op) if o is not None)
    return LeafRule(calls, ops=ops, coef=_pointwise_coef)


def _gelu_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    kwargs = {} if m.approximate == "none" else {"approximate": m.approximate}
    return [(aten.gelu.default, (x,), kwargs, out)]


# -- pooling ------------------------------------------------------------------------------------
def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


def _pool2d_call_ok(m: nn.Module, x: torch.Tensor) -> bool:
    return x.dim() in (3, 4)


def _max_pool_module_ok(m: nn.Module) -> bool:
    return not m.return_indices


def _max_pool_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    args = (
        x,
        _pair(m.kernel_size),
        _pair(m.stride),
        _pair(m.padding),
        _pair(m.dilation),
        m.ceil_mode,
    )
    return [(aten.max_pool2d_with_indices.default, args, {}, (out,))]


def _max_pool_indices_bytes(m: nn.Module, out: torch.Tensor) -> int:
    # the kernel's int64 indices, dropped by F.max_pool2d before the module returns
    return out.numel() * 8


def _pool_coef(m: nn.Module) -> Coef | None:
    k = m.kernel_size
    if not isinstance(k, int) and len(k) != 2:
        return None  # a one-value tuple: the formula reads it as a square window
    return 0, math.prod(_pair(k)), False  # formulas._pool: the window per output


def _avg_pool_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    args = (
        x,
        _pair(m.kernel_size),
        _pair(m.stride),
        _pair(m.padding),
        m.ceil_mode,
        m.count_include_pad,
        m.divisor_override,
    )
    return [(aten.avg_pool2d.default, args, {}, out)]


def _adaptive_wanted(m: nn.Module) -> list[int | None]:
    size = m.output_size
    return [size, size] if isinstance(size, int) else list(size)


def _adaptive_avg_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    wanted = _adaptive_wanted(m)
    resolved = [int(x.shape[-2 + i]) if s is None else int(s) for i, s in enumerate(wanted)]
    if resolved == [1, 1]:
        # torch computes a 1x1 adaptive average as a mean over the spatial dimensions
        return [(aten.mean.dim, (x, [-1, -2], True), {}, out)]
    return [(aten._adaptive_avg_pool2d.default, (x, resolved), {}, out)]


def _adaptive_avg_coef(m: nn.Module) -> Coef | None:
    wanted = _adaptive_wanted(m)
    if None in wanted:
        return None  # resolved from the input: which operator runs depends on it
    # 1x1: a mean (formulas._reduction), else formulas._adaptive_pool; per input element
    return 0, ELEMENT_COSTS["reduction"] if wanted == [1, 1] else 1, True


# -- layer norm ---------------------------------------------------------------------------------
def _layer_norm_calls(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[OpCall]:
    params = m._parameters
    args = (x, list(m.normalized_shape), params["weight"], params["bias"], m.eps)
    return [(aten.native_layer_norm.default, args, {}, (out,))]


def _layer_norm_coef(m: nn.Module) -> Coef:
    return 0, ELEMENT_COSTS["layer_norm"], True  # formulas._per_in("layer_norm")


def _layer_norm_stats_bytes(m: nn.Module, out: torch.Tensor) -> int:
    # the kernel's mean and rstd, one per normalised row, in the input's dtype on CPU; dropped
    # by F.layer_norm before the module returns
    row = math.prod(m.normalized_shape)
    return 2 * (out.numel() // row) * out.element_size() if row else 0


_RULES: dict[type[nn.Module], LeafRule] = {
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.Linear: _LINEAR,
    nn.BatchNorm1d: _BATCH_NORM,
    nn.BatchNorm2d: _BATCH_NORM,
    nn.BatchNorm3d: _BATCH_NORM,
    nn.ReLU: _activation(aten.relu.default, aten.relu_.default),
    nn.ReLU6: _activation(aten.hardtanh.default, aten.hardtanh_.default, 0.0, 6.0),
    nn.Hardswish: _activation(aten.hardswish.default, aten.hardswish_.default),
    nn.Hardsigmoid: _activation(aten.hardsigmoid.default, aten.hardsigmoid_.default),
    nn.SiLU: _activation(aten.silu.default, aten.silu_.default),
    nn.Sigmoid: _activation(aten.sigmoid.default),
    nn.Tanh: _activation(aten.tanh.default),
    nn.GELU: LeafRule(_gelu_calls, ops=(aten.gelu,), coef=_pointwise_coef),
    nn.MaxPool2d: LeafRule(
        _max_pool_calls,
        _max_pool_module_ok,
        _pool2d_call_ok,
        _max_pool_indices_bytes,
        ops=(aten.max_pool2d_with_indices,),
        coef=_pool_coef,
    ),
    nn.AvgPool2d: LeafRule(
        _avg_pool_calls, call_ok=_pool2d_call_ok, ops=(aten.avg_pool2d,), coef=_pool_coef
    ),
    nn.AdaptiveAvgPool2d: LeafRule(
        _adaptive_avg_calls,
        call_ok=_pool2d_call_ok,
        ops=(aten.mean, aten._adaptive_avg_pool2d),
        coef=_adaptive_avg_coef,
    ),
    nn.LayerNorm: LeafRule(
        _layer_norm_calls,
        transient_bytes=_layer_norm_stats_bytes,
        ops=(aten.native_layer_norm,),
        coef=_layer_norm_coef,
    ),
}

_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def rule_for(module: nn.Module) -> LeafRule | None:
    """The rule for ``module`` if its exact type has one and its own tensors allow it.

    Subclasses are refused (they may override ``forward``), and so are modules whose parameters
    or buffers are not plain dense CPU tensors (tensor subclasses, meta, quantized).
    """
    rule = _RULES.get(type(module))
    if rule is None or module._modules or not rule.module_ok(module):
        return None
    for tensors in (module._parameters, module._buffers):
        for t in tensors.values():
            if t is not None and not (
                type(t) in _PLAIN_TENSOR_TYPES
                and t.is_cpu
                and t.layout is torch.strided
                and not t.is_quantized
                and not _is_functorch_wrapped(t)
            ):
                return None
    return rule
