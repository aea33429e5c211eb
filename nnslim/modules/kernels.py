"""nnslim's integer matrix kernels as torch custom operators.

Each is a :func:`torch.library.custom_op` with a fake (meta) implementation and a backward,
so that ``torch.compile`` and ``torch.export`` see one opaque call per layer instead of the
private aten kernels inside (Inductor cannot lower ``aten._weight_int8pack_mm``, wants the
oneDNN packed weight as a graph constant, and re-packs int4 weights on every call of an
exported program), and gradients flow to the activations (straight through the weight
quantization: the gradient of ``x @ dequantized(W).T``).

* ``nnslim::int8_weight_mm(x, qweight, scale)``: int8 weights, float activations.
* ``nnslim::int8_dynamic_mm(x, qweight, scale)``: int8 weights, activations quantized per
  row at run time (7-bit on CPUs without VNNI, whose u8 x s8 sums saturate in int16).
* ``nnslim::int4_mm(x, qweight, scales, mins, group_size)``: 4-bit group-wise weights.
* ``nnslim::int8_rows_mm`` and ``nnslim::int4_packed_mm``: the bare CPU GEMMs that compiled
  inference calls, with the rounding and casts around them traced (see :func:`matmul`).

``x`` is 2-D ``(rows, in_features)``; each returns float32 ``(rows, out_features)``. Packed
kernel layouts are cached per weight tensor (a new weight tensor packs again).

:func:`matmul` calls the plain function in eager inference (a custom operator's dispatch costs
about 8 us a call, a third of a small layer's time) and the operator when compiling,
exporting or computing gradients.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from ..profiling.formulas import register_formula

__all__ = [
    "cpu_has_vnni",
    "int4_mm",
    "int8_dynamic_mm",
    "int8_weight_mm",
    "matmul",
    "quantize_rows",
]

#: smallest per-row activation scale: keeps tiny (but nonzero) activations from rounding to 0
MIN_SCALE = torch.finfo(torch.float32).tiny

# packed kernel layouts per weight tensor, by id (rebuilt on demand; never saved); an entry
# goes with its tensor (a WeakKeyDictionary would compare tensors with ==, elementwise)
_PACKED: dict[int, Any] = {}


def _packed_of(weight: torch.Tensor) -> Any:
    return _PACKED.get(id(weight))


def _keep_packed(weight: torch.Tensor, value: Any) -> None:
    if id(weight) not in _PACKED:
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    _PACKED[id(weight)] = value


_VNNI: bool | None = None


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (u8 x s8 dot products without int16 saturation)."""
    global _VNNI
    if _VNNI is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
            _VNNI = "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags
        except OSError:
            _VNNI = False
    return _VNNI


def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (high nibble first) -> int32 codes, twice as many columns."""
    hi = (packed >> 4).to(torch.int32)
    lo = (packed & 0xF).to(torch.int32)
    return torch.stack([hi, lo], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The float weight of packed 4-bit codes, all ``padded`` columns: ``q * scale + min``."""
    out = qweight.shape[0]
    q = unpack_int4(qweight).float().reshape(out, -1, group_size)
    w = q * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(out, -1)


# -- int8 weights, float activations ------------------------------------------------------------
def _int8_weight_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T`` in float32."""
    if x.device.type == "cpu" and qweight.shape[1] % 16 == 0:
        if qweight.data_ptr() % 64 or not qweight.is_contiguous():
            # the packed kernel reads the weight with aligned (AVX-512) loads and crashes
            # (SIGSEGV) on a tensor at an 8-byte offset (safetensors' tensors, a view): copy
            qweight = qweight.clone(memory_format=torch.contiguous_format)
        y = torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16).contiguous(), qweight, scale.to(torch.bfloat16)
        )
        return y.float()
    return F.linear(x.float(), qweight.float() * scale.float()[:, None])


int8_weight_mm = torch.library.custom_op("nnslim::int8_weight_mm", mutates_args=())(_int8_weight_mm)


@int8_weight_mm.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


# -- int8 weights and dynamically quantized activations ---------------------------------------
@torch.compiler.assume_constant_result
def _half_range() -> int:
    """The activations' codes are ``[0, 2 * half + 1]`` around ``half + 1``: without VNNI, u8 x
    s8 pairs are summed in int16 and saturate, so 7-bit (as fbgemm's reduce_range does)."""
    return 127 if cpu_has_vnni() else 63


def quantize_rows(x2: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x2`` (float32) as uint8 codes around ``half + 1``, and its scale."""
    sx = (x2.abs().amax(dim=1, keepdim=True) / half).clamp_min(MIN_SCALE)
    xq = (torch.round(x2 / sx) + (half + 1)).clamp(0, 2 * half + 1).to(torch.uint8)
    return xq, sx


def _int8_rows_mm(
    xq: torch.Tensor, sx: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, half: int
) -> torch.Tensor:
    """oneDNN's u8 x s8 GEMM of the row codes (zero point ``half + 1``) with the int8 weight
    (packed once per weight), rescaled per column and per row, in float32."""
    packed = _packed_of(qweight)
    if packed is None:
        packed = torch.ops.onednn.qlinear_prepack(qweight, None)
        _keep_packed(qweight, packed)
    zp = torch.zeros(qweight.shape[0], dtype=torch.int64)
    y = torch.ops.onednn.qlinear_pointwise(
        xq, 1.0, half + 1, packed, scale.float(), zp, None, 1.0, 0, torch.float32, "none",
        [], "",
    )  # fmt: skip
    return y * sx


int8_rows_mm = torch.library.custom_op("nnslim::int8_rows_mm", mutates_args=())(_int8_rows_mm)


@int8_rows_mm.register_fake
def _(xq, sx, qweight, scale, half):  # type: ignore[no-untyped-def]
    return sx.new_empty((xq.shape[0], qweight.shape[0]), dtype=torch.float32)


def _int8_dynamic_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized per row to int8 at run time, times the int8 weight, in float32."""
    if x.device.type == "cpu" and onednn_available():
        return _int8_rows_cpu(_int8_rows_mm, x, qweight, scale)
    x2 = x.float().contiguous()
    sx = (x2.abs().amax(dim=1, keepdim=True) / 127).clamp_min(MIN_SCALE)
    xq = torch.round(x2 / sx).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, qweight.t()).float() * sx * scale.float()


def _int8_rows_cpu(
    gemm: Any, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """int8-dynamic on CPU: ``x``'s rows rounded on their own scales, then ``gemm`` (the
    integer GEMM, as a function or as its operator)."""
    half = _half_range()
    xq, sx = quantize_rows(x.float().contiguous(), half)
    return gemm(xq, sx, qweight, scale, half)


int8_dynamic_mm = torch.library.custom_op("nnslim::int8_dynamic_mm", mutates_args=())(
    _int8_dynamic_mm
)


@int8_dynamic_mm.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


# -- int4 weights ---------------------------------------------------------------------------------
def _int4_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x @ W.T`` for 4-bit codes ``W = q * scale + min`` per group of ``group_size`` inputs,
    in float32; ``x`` has the layer's own width (at most the stored, padded one)."""
    if x.device.type != "cpu":
        w = dequantize_int4(qweight, scales, mins, group_size)[:, : x.shape[1]]
        return F.linear(x.float(), w)
    return _int4_cpu(_int4_packed_mm, x, qweight, scales, mins, group_size)


def _int4_cpu(
    gemm: Any,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """int4 on CPU: ``x`` in bf16, padded to the stored width, through ``gemm`` (the packed
    GEMM, as a function or as its operator), cut back to the output width, in float32."""
    out, padded = qweight.shape[0], 2 * qweight.shape[1]
    xb = x.to(torch.bfloat16)
    if padded != x.shape[1]:
        xb = F.pad(xb, (0, padded - x.shape[1]))
    return gemm(xb.contiguous(), qweight, scales, mins, group_size)[:, :out].float()


int4_mm = torch.library.custom_op("nnslim::int4_mm", mutates_args=())(_int4_mm)


@int4_mm.register_fake
def _(x, qweight, scales, mins, group_size):  # type: ignore[no-untyped-def]
    return x.new_empty((x.shape[0], qweight.shape[0]), dtype=torch.float32)


def _int4_packed_mm(
    xb: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """The CPU int4 GEMM alone: bf16 ``xb`` of the stored (padded) width times the weight
    (packed once per weight), bf16 out with the output width padded to a multiple of 16."""
    packed, sz = _int4_packed(qweight, scales, mins)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, group_size, sz)


int4_packed_mm = torch.library.custom_op("nnslim::int4_packed_mm", mutates_args=())(_int4_packed_mm)


@int4_packed_mm.register_fake
def _(xb, qweight, scales, mins, group_size):  # type: ignore[no-untyped-def]
    n = qweight.shape[0]
    return xb.new_empty((xb.shape[0], n + (-n) % 16), dtype=torch.bfloat16)


def _int4_packed(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cached = _packed_of(qweight)
    if cached is not None and cached[0] is scales and cached[1] is mins:
        return cached[2], cached[3]
    q = unpack_int4(qweight)
    n = qweight.shape[0]
    pad = (-n) % 16  # the kernel takes output widths in multiples of 16
    s, m = scales.float(), mins.float()
    if pad:
        q = torch.cat([q, torch.zeros(pad, q.shape[1], dtype=q.dtype, device=q.device)])
        s = torch.cat([s, torch.ones(pad, s.shape[1], device=q.device)])
        m = torch.cat([m, torch.zeros(pad, m.shape[1], device=q.device)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
    # the kernel computes (q - 8) * scale + zero: zero = minimum + 8 * scale
    sz = torch.stack([s.t(), (m + 8 * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    _keep_packed(qweight, (scales, mins, packed, sz))
    return packed, sz


# -- gradients: to the activations, through the dequantized weight -----------------------------
def _save_weight(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, *weight = inputs
    ctx.dtype = x.dtype
    ctx.width = x.shape[1]
    ctx.group_size = weight.pop() if isinstance(weight[-1], int) else None
    ctx.save_for_backward(*weight)


def _backward_int8(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    qweight, scale = ctx.saved_tensors
    w = qweight.float() * scale.float()[:, None]
    return (grad.float() @ w).to(ctx.dtype), None, None


def _backward_int4(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    qweight, scales, mins = ctx.saved_tensors
    w = dequantize_int4(qweight, scales, mins, ctx.group_size)[:, : ctx.width]
    return (grad.float() @ w).to(ctx.dtype), None, None, None, None


int8_weight_mm.register_autograd(_backward_int8, setup_context=_save_weight)
int8_dynamic_mm.register_autograd(_backward_int8, setup_context=_save_weight)
int4_mm.register_autograd(_backward_int4, setup_context=_save_weight)


# -- their cost, for the profiler ------------------------------------------------------------
def _matmul_cost(args: Any, kwargs: Any, out: Any) -> tuple[int, int]:
    x = args[0]
    return x.shape[0] * x.shape[1] * out.shape[1], 0


def _packed_cost(args: Any, kwargs: Any, out: Any) -> tuple[int, int]:
    xb, qweight = args[0], args[1]  # the padding of the output width is not the layer's work
    return xb.shape[0] * xb.shape[1] * qweight.shape[0], 0


def _dynamic_cost(args: Any, kwargs: Any, out: Any) -> tuple[int, int]:
    # quantizing the activations (absolute value, row maximum, divide, round, clamp: five per
    # input element) and rescaling the output (two per output element)
    x = args[0]
    return x.shape[0] * x.shape[1] * out.shape[1], 5 * x.numel() + 2 * out.numel()


register_formula(torch.ops.nnslim.int8_weight_mm, torch.ops.nnslim.int4_mm)(_matmul_cost)
register_formula(torch.ops.nnslim.int8_dynamic_mm)(_dynamic_cost)
register_formula(torch.ops.nnslim.int4_packed_mm)(_packed_cost)


_EAGER = {}  # operator -> its plain function, filled below


def matmul(op: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """``op(x, *args)``; in eager inference its function directly (same result, no dispatch).

    Compiled inference on CPU traces what surrounds the integer GEMM as plain torch operations
    (Inductor fuses them with the layers around) and keeps only the GEMM opaque, with the same
    arithmetic as the eager kernel: int8-dynamic's activation rounding around
    ``nnslim::int8_rows_mm``, int4's casts to and from bf16 and its padding around
    ``nnslim::int4_packed_mm``."""
    grad = x.requires_grad and torch.is_grad_enabled()
    if not (torch.compiler.is_compiling() or grad):
        return _EAGER[op](x, *args)
    if not grad and op is int8_dynamic_mm and x.device.type == "cpu" and onednn_available():
        return _int8_rows_cpu(int8_rows_mm, x, *args)
    if not grad and op is int4_mm and x.device.type == "cpu":
        return _int4_cpu(int4_packed_mm, x, *args)
    return op(x, *args)


_EAGER.update(
    {
        int8_weight_mm: _int8_weight_mm,
        int8_dynamic_mm: _int8_dynamic_mm,
        int4_mm: _int4_mm,
    }
)
