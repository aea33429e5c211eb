"""Cost formulas for aten operators: multiply-accumulates (MACs) and other FLOPs.

Matrix work (matmul, convolution, attention, integer and packed-weight kernels) is counted in
MACs; its FLOPs are ``2 * MACs``. Everything else that computes (pointwise arithmetic and
activations, normalisation, softmax, reductions, pooling) is counted as "other FLOPs", per
output (or input) element, with the costs in :data:`ELEMENT_COSTS`. Data movement (views, copies,
indexing, concatenation, embedding lookups) costs nothing.

Formulas are keyed by the aten overload packet. Operators without a formula are listed in
``Profile.unsupported``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import flop_registry

__all__ = ["ELEMENT_COSTS", "Cost", "cost_of", "register_formula"]

aten = torch.ops.aten

#: ``(macs, other_flops)``
Cost = tuple[int, int]
Formula = Callable[[Sequence[Any], dict[str, Any], Any], Cost]

_FORMULAS: dict[Any, Formula] = {}
#: operator overload -> its cost function (``None``: no formula), filled on first use
_CACHE: dict[Any, Formula | None] = {}
#: packets given a formula by ``register_formula`` after the built-in ones (the profiler's leaf
#: fast path then charges their modules through the formulas rather than its own arithmetic)
REPLACED: set[Any] = set()
_BUILTINS_DONE = False


def register_formula(*ops: Any) -> Callable[[Formula], Formula]:
    """Register ``fn(args, kwargs, out) -> (macs, other_flops)`` for aten overload packets.

    Use it to teach the profiler an operator of your own (a custom kernel)::

        @nnslim.register_formula(torch.ops.mylib.fused_mlp)
        def _(args, kwargs, out):
            x, w1, w2 = args[:3]
            return x.shape[0] * (w1.numel() + w2.numel()), 0
    """

    def deco(fn: Formula) -> Formula:
        for op in ops:
            _FORMULAS[_packet(op)] = fn
            if _BUILTINS_DONE:
                REPLACED.add(_packet(op))
        _CACHE.clear()
        return fn

    return deco


def _packet(op: Any) -> Any:
    return getattr(op, "overloadpacket", op)


def _n(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


# -- matrix work --------------------------------------------------------------------------------
# Matrix products and convolutions take their MACs from torch's own FLOP formulas
# (``torch.utils.flop_counter``, the ones ``FlopCounterMode`` uses: FLOPs are 2 x MACs), so both
# count the same work; nnslim adds the bias work torch leaves out as "other FLOPs".
def _torch_macs(packet: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> int:
    # the formula itself, on shapes: its registered wrapper maps tensors to shapes with a
    # pytree walk that leaves reference cycles behind on every call
    shape = _shape_formula(packet)
    sizes = [_size(a) for a in args]
    return int(shape(*sizes, **{k: _size(v) for k, v in kwargs.items()}, out_shape=_size(out))) // 2


@functools.cache
def _shape_formula(packet: Any) -> Callable[..., int]:
    return inspect.unwrap(flop_registry[packet])


def _size(x: Any) -> Any:
    return x.shape if isinstance(x, torch.Tensor) else x


@register_formula(aten.mm)
def _mm(args, kwargs, out) -> Cost:
    return _torch_macs(aten.mm, args, kwargs, out), 0


@register_formula(aten._int_mm)  # not in torch's table: an int8 mm, the same shapes
def _int_mm(args, kwargs, out) -> Cost:
    return _torch_macs(aten.mm, args, {}, out), 0


@register_formula(aten.addmm)
def _addmm(args, kwargs, out) -> Cost:
    # torch's addmm formula is its mm formula on the two matrices (called through the pytree
    # wrapper, so called here directly)
    return _torch_macs(aten.mm, args[1:3], {}, out), _n(out.shape)


@register_formula(aten.bmm)
def _bmm(args, kwargs, out) -> Cost:
    return _torch_macs(aten.bmm, args, kwargs, out), 0


@register_formula(aten.baddbmm)
def _baddbmm(args, kwargs, out) -> Cost:
    return _torch_macs(aten.bmm, args[1:3], {}, out), _n(out.shape)


@register_formula(aten.addbmm)  # not in torch's table: a baddbmm summed over the batch
def _addbmm(args, kwargs, out) -> Cost:
    a, b = args[1], args[2]
    bsz, m, k, n = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
    return bsz * m * k * n, m * n


@register_formula(aten._grouped_mm)
def _grouped_mm(args, kwargs, out) -> Cost:
    """Mixture-of-experts banks (transformers' ``grouped_mm`` experts): every row of ``a``
    meets one group's matrix, so MACs are the output's elements times the contraction width;
    a 2-D x 2-D call splits the contraction itself into groups."""
    a, b = args[0], args[1]
    if a.dim() == 2 and b.dim() == 2:
        return a.shape[0] * a.shape[1] * b.shape[1], 0
    return out.numel() * a.shape[-1], 0


@register_formula(aten.mv, aten.addmv)
def _mv(args, kwargs, out) -> Cost:
    mat = args[0] if len(args[0].shape) == 2 else args[1]
    return mat.shape[0] * mat.shape[1], 0


@register_formula(aten.dot, aten.vdot)
def _dot(args, kwargs, out) -> Cost:
    return args[0].numel(), 0


@register_formula(aten._weight_int8pack_mm)
def _int8pack(args, kwargs, out) -> Cost:
    x, w = args[0], args[1]
    return x.shape[0] * x.shape[1] * w.shape[0], 0


@register_formula(aten._weight_int4pack_mm_for_cpu, aten._weight_int4pack_mm)
def _int4pack(args, kwargs, out) -> Cost:
    x = args[0]
    return x.shape[0] * x.shape[1] * out.shape[-1], 0


def _qlinear(args, kwargs, out) -> Cost:
    x = args[0]
    return x.numel() // x.shape[-1] * x.shape[-1] * out.shape[-1], 0


# oneDNN's u8 x s8 linear (int8-dynamic layers on CPU): only present in builds with oneDNN
if hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise"):
    register_formula(torch.ops.onednn.qlinear_pointwise)(_qlinear)


def _conv_macs(x: Any, w: Any, out: Any, transposed: bool) -> int:
    if transposed:
        # weight (Cin, Cout/groups, k...): every input element feeds Cout/groups * k outputs
        return _n(x.shape) * w.shape[1] * _n(w.shape[2:])
    # weight (Cout, Cin/groups, k...): every output element sums Cin/groups * k products
    return _n(out.shape) * w.shape[1] * _n(w.shape[2:])


@register_formula(aten.convolution, aten._convolution)
def _conv(args, kwargs, out) -> Cost:
    macs = _torch_macs(aten.convolution, args, kwargs, out)
    return macs, (_n(out.shape) if args[2] is not None else 0)


def _attn_cost(q: Any, k: Any, v: Any) -> Cost:
    # q (..., L, E), k (..., S, E), v (..., S, Ev): QK^T and PV
    batch = _n(q.shape[:-2])
    length, e = q.shape[-2], q.shape[-1]
    s, ev = k.shape[-2], v.shape[-1]
    macs = batch * length * s * (e + ev)
    # scale + softmax over the scores
    other = batch * length * s * (1 + ELEMENT_COSTS["softmax"])
    return macs, other


@register_formula(
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_fused_attention_overrideable,
)
def _sdpa(args, kwargs, out) -> Cost:
    # not through torch's table: its attention formula calls its bmm formula through the
    # pytree wrapper (reference cycles on every call), and it has no CPU flash variant; the
    # count is the same (tests/profiling/test_formulas.py)
    return _attn_cost(args[0], args[1], args[2])


# -- backward ---------------------------------------------------------------------------------
@register_formula(
    aten._scaled_dot_product_flash_attention_for_cpu_backward,
    aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention_backward,
    aten._scaled_dot_product_cudnn_attention_backward,
    aten._scaled_dot_product_fused_attention_overrideable_backward,
)
def _sdpa_backward(args, kwargs, out) -> Cost:
    # args: grad_out, query, key, value, ...: four products (dP, dV, dS K, dS^T Q), twice the
    # forward's two; the softmax backward once more over the scores
    macs, other = _attn_cost(args[1], args[2], args[3])
    return 2 * macs, other


@register_formula(aten.convolution_backward)
def _conv_backward(args, kwargs, out) -> Cost:
    # not torch's formula: it counts a grouped convolution's weight gradient ``groups`` times
    # over (torch 2.14; tests/profiling/test_formulas.py notices when that changes)
    # args: grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
    # output_padding, groups, output_mask; each gradient asked for costs what the forward did
    grad_out, x, w = args[0], args[1], args[2]
    mask = args[10] if len(args) > 10 else kwargs.get("output_mask", (True, True, True))
    forward = _conv_macs(x, w, grad_out, bool(args[7]))
    return forward * (int(mask[0]) + int(mask[1])), (_n(grad_out.shape) if mask[2] else 0)


@register_formula(aten._native_multi_head_attention)
def _native_mha(args, kwargs, out) -> Cost:
    q, k = args[0], args[1]
    embed, heads = int(args[3]), int(args[4])
    proj_w = args[7]
    # q/k/v are (B, L, E) in the fused path
    bsz, length = q.shape[0], q.shape[1]
    s = k.shape[1]
    in_proj = bsz * length * embed * embed + 2 * bsz * s * embed * embed
    head_dim = embed // heads
    qh = torch.empty((bsz, heads, length, head_dim), device="meta")
    kh = torch.empty((bsz, heads, s, head_dim), device="meta")
    attn_macs, attn_other = _attn_cost(qh, kh, kh)
    out_proj = bsz * length * embed * proj_w.shape[0]
    bias_adds = bsz * length * 3 * embed + bsz * length * proj_w.shape[0]
    return in_proj + attn_macs + out_proj, attn_other + bias_adds


@register_formula(aten._transformer_encoder_layer_fwd)
def _encoder_layer(args, kwargs, out) -> Cost:
    src, embed, heads = args[0], int(args[1]), int(args[2])
    ffn1, ffn2 = args[14], args[16]
    mha_macs, mha_other = _native_mha(
        [src, src, src, embed, heads, args[3], args[4], args[5], args[6]], {}, None
    )
    tokens = _n(src.shape[:-1])
    ffn_macs = tokens * (ffn1.shape[0] * ffn1.shape[1] + ffn2.shape[0] * ffn2.shape[1])
    other = (
        mha_other
        + 2 * tokens * embed * ELEMENT_COSTS["layer_norm"]
        + tokens * ffn1.shape[0] * 2  # bias + activation
        + tokens * embed * 3  # bias + two residual adds
    )
    return mha_macs + ffn_macs, other


#: FLOPs per element for the non-matrix operators (documented conventions, not hardware
#: counts): pointwise ops cost one FLOP per output element.
ELEMENT_COSTS: dict[str, int] = {
    "pointwise": 1,
    "softmax": 3,  # exp, sum, divide (max subtraction not counted)
    "layer_norm": 5,  # mean, variance, normalise, scale, shift
    "rms_norm": 4,
    "group_norm": 5,
    "batch_norm_eval": 2,  # folded scale and shift
    "batch_norm_train": 5,
    "reduction": 1,  # per input element
}


def _per_out(key: str) -> Formula:
    def f(args, kwargs, out) -> Cost:
        return 0, ELEMENT_COSTS[key] * _n(_first_tensor(out).shape)

    return f


def _per_in(key: str) -> Formula:
    def f(args, kwargs, out) -> Cost:
        return 0, ELEMENT_COSTS[key] * _n(args[0].shape)

    return f


def _first_tensor(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise ValueError("operator returned no tensor")


register_formula(aten._softmax, aten._log_softmax, aten.softmax, aten.log_softmax)(
    _per_out("softmax")
)
register_formula(aten.cumsum, aten.cumprod, aten.logcumsumexp)(_per_in("reduction"))
register_formula(aten.native_layer_norm, aten.layer_norm)(_per_in("layer_norm"))
register_formula(aten._fused_rms_norm, aten.rms_norm)(_per_in("rms_norm"))
register_formula(aten.native_group_norm, aten.group_norm)(_per_in("group_norm"))
# backward of the normalisations: as many FLOPs per element as the forward in training
register_formula(aten.native_batch_norm_backward)(_per_in("batch_norm_train"))
register_formula(aten.native_layer_norm_backward)(_per_in("layer_norm"))


@register_formula(
    aten._native_batch_norm_legit_no_training,
    aten.native_batch_norm,
    aten._native_batch_norm_legit,
    aten.batch_norm,
    aten._batch_norm_impl_index,
    aten._batch_norm_with_update,
    aten._batch_norm_no_update,
)
def _bn(args, kwargs, out) -> Cost:
    training = any(isinstance(a, bool) and a for a in args[5:6])
    key = "batch_norm_train" if training else "batch_norm_eval"
    return 0, ELEMENT_COSTS[key] * _n(args[0].shape)


def _pool(dims: int) -> Formula:
    """Pooling over ``dims`` spatial dimensions: one comparison/add per window element per
    output element (a one-value kernel is the same size along every dimension)."""

    def f(args, kwargs, out) -> Cost:
        k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
        k = [k] if isinstance(k, int) else list(k)
        if len(k) == 1:
            k = k * dims
        return 0, _n(_first_tensor(out).shape) * _n(k)

    return f


register_formula(aten.max_pool1d, aten.avg_pool1d)(_pool(1))
register_formula(aten.max_pool2d, aten.max_pool2d_with_indices, aten.avg_pool2d)(_pool(2))
register_formula(aten.max_pool3d, aten.max_pool3d_with_indices, aten.avg_pool3d)(_pool(3))


@register_formula(
    aten._adaptive_avg_pool2d,
    aten._adaptive_avg_pool3d,
    aten.adaptive_avg_pool1d,
    aten.adaptive_max_pool2d,
    aten.adaptive_max_pool1d,
    aten.adaptive_max_pool3d,
)
def _adaptive_pool(args, kwargs, out) -> Cost:
    return 0, _n(args[0].shape)


@register_formula(aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten._upsample_bilinear2d_aa)
def _interp(args, kwargs, out) -> Cost:
    return 0, 4 * _n(out.shape)


#: Operators that move or create data without arithmetic.
FREE_OPS = {
    _packet(op)
    for op in (
        aten.cat,
        aten.stack,
        aten.clone,
        aten.copy_,
        aten._to_copy,
        aten.contiguous,
        aten.embedding,
        aten.index,
        aten.index_select,
        aten.gather,
        aten.scatter,
        aten.slice_scatter,
        aten.select_scatter,
        aten.index_put,
        aten.index_put_,
        aten.masked_select,
        aten.zeros,
        aten.zeros_like,
        aten.ones,
        aten.ones_like,
        aten.empty,
        aten.empty_like,
        aten.empty_strided,
        aten.full,
        aten.full_like,
        aten.fill_,
        aten.zero_,
        aten.new_zeros,
        aten.new_ones,
        aten.new_empty,
        aten.new_empty_strided,
        aten.new_full,
        aten.arange,
        aten.scalar_tensor,
        aten.lift_fresh,
        aten.lift_fresh_copy,
        aten._local_scalar_dense,
        aten.constant_pad_nd,
        aten.reflection_pad2d,
        aten.replication_pad2d,
        aten.roll,
        aten.flip,
        aten.repeat,
        aten.tril,
        aten.triu,
        aten.tril_,
        aten.triu_,
        aten.nonzero,
        aten.topk,
        aten.sort,
        aten.argsort,
        aten.one_hot,
        aten.masked_fill,
        aten.masked_fill_,
        aten.bernoulli_,
        aten.bernoulli,
        aten.native_dropout,
        aten.rand,
        aten.randn,
        aten.rand_like,
        aten.randn_like,
        aten.randint,
        aten.randperm,
        aten.linspace,
        aten.detach,
        aten.unbind,
        aten.split,
        aten.split_with_sizes,
        aten.chunk,
        aten._unsafe_view,
        aten.unfold,
        aten.im2col,
        aten.col2im,
        aten.pixel_shuffle,
        aten.channel_shuffle,
        aten.native_channel_shuffle,
        aten.repeat_interleave,
        aten.embedding_dense_backward,
        aten.select_backward,
        aten.slice_backward,
        aten.set_,
        aten.resize_,
        aten.alias,
        aten.view,
        aten.t,
        aten.transpose,
        aten.permute,
        aten.expand,
        aten.reshape,
        aten.squeeze,
        aten.unsqueeze,
        aten.flatten,
        aten.select,
        aten.slice,
        aten.as_strided,
        aten._reshape_alias,
        aten.unsafe_split,
        aten.diagonal,
        aten.narrow,
        aten.index_copy,
        aten.index_fill,
        aten.index_fill_,
        aten.isin,
        aten.eq,
        aten.ne,
        aten.lt,
        aten.le,
        aten.gt,
        aten.ge,
        aten.logical_and,
        aten.logical_or,
        aten.logical_not,
        aten.bitwise_and,
        aten.bitwise_or,
        aten.bitwise_not,
        aten.bitwise_xor,
        aten.bitwise_left_shift,
        aten.bitwise_right_shift,
        aten.__and__,
        aten.__or__,
        aten.__rshift__,
        aten.__lshift__,
        aten.is_nonzero,
        aten.item,
        aten.equal,
        aten.where,
        aten.argmax,
        aten.argmin,
        aten.sym_size,
        aten.sym_stride,
        aten.sym_numel,
        aten.sym_storage_offset,
        aten._assert_async,
        aten._assert_tensor_metadata,
        aten._functional_assert_async,
        aten.clamp_min_,
        aten.resolve_conj,
        aten.resolve_neg,
        aten.view_as_real,
        aten.view_as_complex,
        aten._pin_memory,
        aten.pin_memory,
        aten.is_pinned,
        aten._has_compatible_shallow_copy_type,
        aten.record_stream,
        aten.detach_,
        aten._convert_weight_to_int4pack_for_cpu,
        aten._convert_weight_to_int4pack,
        aten.bucketize,
        aten.searchsorted,
        aten.histc,
        aten.max_pool2d_with_indices_backward,
        getattr(getattr(torch.ops, "onednn", None), "qlinear_prepack", None),  # weight packing
    )
    if op is not None
}


#: Activations that aten does not tag as pointwise.
POINTWISE_EXTRA = {
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "elu",
    "selu",
    "celu",
    "leaky_relu",
    "mish",
    "prelu",
    "_prelu_kernel",
    "rrelu",
    "softplus",
    "softshrink",
    "hardshrink",
    "glu",
    "threshold",
    "relu6",
    "log_sigmoid_forward",
    "gelu",
    "silu",
    "logit",
    # integer arithmetic of nnslim's own unpacking (palettized indices, int4 nibbles)
    "floor_divide",
    "remainder",
}


@functools.cache
def _packet_tags(packet: Any) -> frozenset[Any]:
    """Tags of every overload of ``packet`` and of its functional twin (``relu_`` -> ``relu``)."""
    tags: set[Any] = set()
    name = getattr(packet, "__name__", "")
    packets = [packet]
    if name.endswith("_") and not name.startswith("__"):
        twin = getattr(aten, name[:-1], None)
        if twin is not None:
            packets.append(twin)
    for pk in packets:
        for ov in getattr(pk, "overloads", lambda: [])():
            tags |= set(getattr(pk, ov).tags)
        if getattr(pk, "__name__", "") in POINTWISE_EXTRA:
            tags.add(torch.Tag.pointwise)
    return frozenset(tags)


def _classify(func: Any) -> Formula | None:
    """The cost function for one operator overload (``None``: no formula)."""
    packet = _packet(func)
    f = _FORMULAS.get(packet)
    if f is not None:
        return f
    if packet in FREE_OPS:
        return _free
    tags = _packet_tags(packet)
    if torch.Tag.inplace_view in tags:
        return _free
    schema = getattr(func, "_schema", None)
    if (
        schema is not None
        and schema.returns
        and all(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    ):
        return _free  # views
    if torch.Tag.pointwise in tags and torch.Tag.reduction in tags:
        # a packet with both kinds of overload (max.other is elementwise, max.default and
        # max.dim reduce): the overload's own tags decide
        return _reduction if torch.Tag.reduction in getattr(func, "tags", ()) else _pointwise
    if torch.Tag.pointwise in tags:
        return _pointwise
    if torch.Tag.reduction in tags:
        return _reduction
    return None


def _free(args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> Cost:
    return 0, 0


def _pointwise(args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> Cost:
    try:
        t = _first_tensor(out)
    except (ValueError, TypeError):
        return 0, 0
    if t.dtype == torch.bool:
        return 0, 0
    return 0, ELEMENT_COSTS["pointwise"] * t.numel()


def _reduction(args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> Cost:
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return 0, (ELEMENT_COSTS["reduction"] * x.numel() if x is not None else 0)


def cost_of(func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> Cost | None:
    """``(macs, other_flops)`` of one operator call, or ``None`` if there is no formula."""
    try:
        f = _CACHE[func]
    except KeyError:
        f = _CACHE[func] = _classify(func)
    except TypeError:  # unhashable callables
        f = _classify(func)
    return None if f is None else f(args, kwargs, out)


_BUILTINS_DONE = True
