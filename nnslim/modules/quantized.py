"""Modules that hold integer weights and run integer kernels.

Every module stores its integer weights and scales as buffers (so ``state_dict`` and
:func:`nnslim.save` write the real, small tensors) and reports them to the profiler through
``nnslim_weight_buffers``. Kernel-specific packed layouts are built lazily on first use and
kept outside the state (they are a cache, not data).

Kernels (all in core torch, chosen per call; measured in ``benchmarks/quantize.py``):

* :class:`Int8Linear` (weight-only): ``aten._weight_int8pack_mm`` on bf16 activations when
  ``in_features % 16 == 0`` (else a dequantized matmul: on AVX2 CPUs the kernel mis-computes
  widths that are not a multiple of 8, and on AVX-512 CPUs it crashes the process on widths that
  are not a multiple of 16, measured with torch 2.14.1).
* :class:`Int8DynamicLinear`: activations quantized per token at run time; oneDNN's u8s8 GEMM
  (``onednn.qlinear_pointwise``) where available, else ``torch._int_mm``.
* :class:`Int4Linear` (weight-only, group-wise asymmetric): ``aten._weight_int4pack_mm_for_cpu``
  on bf16 activations (output rows padded to a multiple of 16 for the kernel).
* :class:`Int8Conv2d`: int8 storage, dequantized per forward.

Each is a drop-in for the layer it replaces: ``weight`` (the float weight it stands for, built
on each access: a copy, writing into it does not change the layer), ``bias``,
``in_features``/``out_features`` (``in_channels``, ``kernel_size``... for the convolution), and
``.to(dtype)``/``.half()`` move the float parts and the dtype ``weight`` reports. Inputs of any
layout (transposed, strided, 3-D/4-D) are made what the kernels need.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..base.modules import linear_weight
from ..base.validate import all_finite
from .kernels import (
    dequantize_int4,
    int4_mm,
    int8_dynamic_mm,
    int8_weight_mm,
    matmul,
    unpack_int4,
)

__all__ = [
    "GROUP_SIZES",
    "ZERO_POINTS",
    "Int4Embedding",
    "Int4Linear",
    "Int8Conv2d",
    "Int8DynamicLinear",
    "Int8Embedding",
    "Int8Linear",
    "int4_grid",
    "int4_group_size",
    "pack_int4",
    "quantize_groupwise",
    "quantize_per_channel",
    "unpack_int4",
]


def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of ``w`` (dim 0 = output channels).

    Returns:
        ``(q, scale)``: ``q`` int8 with values in ``[-(2**(bits-1)-1), 2**(bits-1)-1]`` and
        ``scale`` float32 of shape ``(w.shape[0],)`` with ``w ~= q * scale``.
    """
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().float().reshape(w.shape[0], -1)
    amax = flat.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(flat / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scale


#: how an int4 group's offset is held: ``"float"``, a minimum per group (GGUF's ``Q4_1``);
#: ``"integer"``, a zero point in ``[0, 15]`` (GPTQ/AWQ checkpoints, compressed-tensors, vLLM)
ZeroPoint = Literal["float", "integer"]
ZERO_POINTS: tuple[str, ...] = get_args(ZeroPoint)


def int4_grid(
    mn: torch.Tensor, mx: torch.Tensor, zero_point: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, minimum)`` of the 4-bit grids spanning ``[mn, mx]``, as :class:`Int4Linear`
    stores them, so that codes rounded on them dequantize to exactly what the layer holds.

    The scale is rounded to bf16 (how it is stored). ``"float"``: the minimum is ``mn`` rounded
    to bf16. ``"integer"``: the range is widened to include 0 and the minimum is
    ``-zp * scale`` for an integer zero point ``zp`` in ``[0, 15]`` (exact in float32).
    """
    if zero_point == "integer":
        mn, mx = mn.clamp(max=0), mx.clamp(min=0)
    scale = ((mx - mn) / 15).clamp_min(1e-8).to(torch.bfloat16).float()
    if zero_point == "integer":
        return scale, -torch.round(-mn / scale).clamp(0, 15) * scale
    return scale, mn.to(torch.bfloat16).float()


def quantize_groupwise(
    w: torch.Tensor, group_size: int, bits: int = 4, zero_point: str = "float"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise quantization along the input dim of ``w`` ``(out, in)``.

    Returns:
        ``(q, scale, minimum)``: integer codes ``q`` in ``[0, 2**bits - 1]`` (int32,
        ``(out, in)``), and per-group ``scale`` and ``minimum`` of shape ``(out, in/group)``
        with ``w ~= q * scale + minimum`` (for 4 bits, the grid of :func:`int4_grid`).
    """
    out, inp = w.shape
    levels = 2**bits - 1
    g = w.detach().float().reshape(out, inp // group_size, group_size)
    mn = g.amin(-1)
    mx = g.amax(-1)
    if bits == 4:
        scale, mn = int4_grid(mn, mx, zero_point)
    else:
        scale = ((mx - mn) / levels).clamp_min(1e-8)
    q = torch.round((g - mn[..., None]) / scale[..., None]).clamp(0, levels).to(torch.int32)
    return q.reshape(out, inp).contiguous(), scale, mn


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``(out, in)`` int codes -> ``(out, in/2)`` uint8 (high nibble first)."""
    q = q.to(torch.uint8)
    return ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()


def padded_width(width: int, group_size: int) -> int:
    """``width`` rounded up to a multiple of ``group_size`` (how wide an int4 layer is stored)."""
    return -(-width // group_size) * group_size


#: the int4 group sizes (inputs per group) nnslim quantizes with
GROUP_SIZES = (32, 64, 128)


def int4_group_size(width: int, wanted: int) -> int:
    """The group size an int4 layer ``width`` inputs wide gets when ``wanted`` is asked for.

    The largest of the allowed sizes up to ``wanted`` that divides ``width``; where none does,
    the one that needs the fewest zero columns of padding (the largest among equals).
    """
    sizes = [g for g in GROUP_SIZES if g <= wanted]
    padded = {g: padded_width(width, g) for g in sizes}
    least = min(padded.values())
    return max(g for g in sizes if padded[g] == least)


def _pad_columns(w: torch.Tensor, width: int) -> torch.Tensor:
    """``w`` ``(out, in)`` with zero columns added up to ``width``."""
    return w if w.shape[1] == width else F.pad(w, (0, width - w.shape[1]))


def _int4_storage(m: nn.Module, rows: int, width: int, group_size: int, zero_point: str) -> None:
    """Register the int4 layout's empty buffers on ``m``: packed codes ``(rows, padded / 2)``,
    a bf16 scale and a minimum per group (float32 for integer zero points: exact)."""
    groups = padded_width(width, group_size) // group_size
    m.register_buffer("qweight", torch.zeros(rows, groups * group_size // 2, dtype=torch.uint8))
    m.register_buffer("scales", torch.ones(rows, groups, dtype=torch.bfloat16))
    mins_dtype = torch.float32 if zero_point == "integer" else torch.bfloat16
    m.register_buffer("mins", torch.zeros(rows, groups, dtype=mins_dtype))


def _set_int4_codes(
    m: nn.Module, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, device: Any
) -> None:
    """Fill the int4 layout's buffers from unpacked codes and group parameters."""
    m.qweight = pack_int4(q).to(device)
    m.scales = scale.to(torch.bfloat16).to(device)
    m.mins = minimum.to(m.mins.dtype).to(device)


#: ``id(old tensor) -> (old, fn, new)``, weak references, for the buffers converted by a
#: running ``_apply``: see :meth:`_DtypeTracking._apply`
_CONVERTED: dict[int, tuple[Any, Any, Any]] = {}


def _keep_shared(m: nn.Module, before: dict[str, torch.Tensor], fn: Any) -> None:
    for k in [k for k, refs in _CONVERTED.items() if any(r() is None for r in refs)]:
        del _CONVERTED[k]  # the conversion is over, or a tensor gone
    for name, old in before.items():
        new = m._buffers.get(name)
        if new is None or new is old:
            continue
        seen = _CONVERTED.get(id(old))
        first = seen[2]() if seen is not None else None
        if first is not None and seen[0]() is old and seen[1]() is fn:
            if (first.device, first.dtype, first.shape) == (new.device, new.dtype, new.shape):
                m._buffers[name] = first
            continue
        try:
            _CONVERTED[id(old)] = (weakref.ref(old), weakref.ref(fn), weakref.ref(new))
        except TypeError:  # a conversion that cannot be weakly referenced: nothing shared
            pass


class _DtypeTracking(nn.Module):
    """Remembers the float dtype the layer computes in (the original weight's), and follows
    ``.to(dtype)``/``.half()``/``.float()`` like an ``nn.Linear``'s weight would."""

    #: the dtype's name (a plain string, so it is recorded by :func:`nnslim.save`)
    float_dtype: str = "float32"

    def _weight_dtype(self) -> torch.dtype:
        return getattr(torch, self.float_dtype)

    def _take_float(self, w: torch.Tensor) -> None:
        """Report ``w``'s dtype from now on (the float weight this layer replaces)."""
        if w.is_floating_point():
            self.float_dtype = str(w.dtype).removeprefix("torch.")

    #: buffers whose dtype is part of the stored format (scales, minima, smoothing factors):
    #: a dtype cast of the layer (``.half()``, ``.to(torch.bfloat16)``) moves them but keeps
    #: their dtype (fp16 scales would underflow below ~6e-8, and the integer-zero-point
    #: minima would lose exactness); the layer still computes in the new dtype
    _format_buffers: tuple[str, ...] = ("scale", "scales", "mins", "smooth")

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Cast or move the layer (see ``_format_buffers``); buffers it shares with another
        layer (a tied embedding and LM head) stay shared.

        ``model.to(device)`` converts each module's buffers on its own (torch keeps shared
        *parameters* shared across a move, not buffers), so two layers holding one tensor
        would end up with two copies. The first layer converted notes its new tensor against
        the old one for this conversion (``fn``); the second, finding its old tensor noted,
        takes that new tensor instead of its own copy."""
        before = {n: b for n, b in self._buffers.items() if b is not None}
        out = self._convert(fn, recurse)
        _keep_shared(self, before, fn)
        return out

    def _convert(self, fn: Any, recurse: bool) -> Any:
        probe = fn(torch.empty(0, dtype=self._weight_dtype()))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self.float_dtype = str(probe.dtype).removeprefix("torch.")
        casts = isinstance(probe, torch.Tensor) and any(
            fn(torch.empty(0, dtype=d)).dtype != d
            for d in (torch.float32, torch.bfloat16, torch.float16)
        )
        if not casts:
            return super()._apply(fn, recurse)
        kept = {
            n: self._buffers[n]
            for n in self._format_buffers
            if isinstance(self._buffers.get(n), torch.Tensor)
        }
        for n in kept:
            self._buffers[n] = None
        try:
            out = super()._apply(fn, recurse)
        finally:
            for n, b in kept.items():
                self._buffers[n] = b.to(probe.device)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The float weight this layer stands for, rebuilt on each access (read-only: a copy,
        writing into it does not change the layer)."""
        with torch.no_grad():
            return self.dequantize().to(self._weight_dtype())

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not all_finite(w):
        raise ValueError(f"{what} has NaN or Inf weights; fix or exclude it before quantizing.")


class _QuantLinearBase(_DtypeTracking):
    in_features: int
    out_features: int

    def _init_bias(self, bias: bool) -> None:
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def _finish(self, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        y = y.to(dtype)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        s = self._buffers.get("smooth")
        return x if s is None else x / s.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinearBase):
    """``nn.Linear`` with int8 weights (symmetric, per output channel), weight-only.

    Args:
        in_features: input width.
        out_features: output width.
        bias: whether there is a bias (kept in float).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self._init_bias(bias)

    @classmethod
    def from_float(cls, linear: nn.Module, weight: torch.Tensor | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear``/``Conv1D`` (round to nearest, or a given ``weight``)."""
        w = linear_weight(linear) if weight is None else weight
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None)
        q, s = quantize_per_channel(w)
        m.qweight, m.scale = q.to(w.device), s.to(w.device)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().float().clone())
        m._take_float(linear_weight(linear))
        return m

    def nnslim_weight_buffers(self) -> dict[str, int]:
        return {"qweight": self.qweight.numel(), "scale": 0}

    def nnslim_zero_weights(self) -> int:
        return int((self.qweight == 0).sum())

    def nnslim_describe(self) -> str:
        return f"Int8Linear {self.in_features}->{self.out_features}"

    def dequantize(self) -> torch.Tensor:
        """The float weight the integer weight stands for."""
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = matmul(int8_weight_mm, x.reshape(-1, shape[-1]), self.qweight, self.scale)
        return self._finish(y, shape, x.dtype)


class Int8DynamicLinear(_QuantLinearBase):
    """``nn.Linear`` with int8 weights and int8 activations quantized per token at run time.

    ``smooth`` (optional, per input channel) divides the activations before quantization; the
    weight was multiplied by it (SmoothQuant), which moves activation outliers into the weight.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, smooth: bool = False
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features))
        self._init_bias(bias)

    @classmethod
    def from_float(
        cls,
        linear: nn.Module,
        weight: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
    ) -> Int8DynamicLinear:
        """Quantize (``weight`` already multiplied by ``smooth`` when given)."""
        w = linear_weight(linear) if weight is None else weight
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, smooth=smooth is not None)
        q, s = quantize_per_channel(w)
        m.qweight, m.scale = q.to(w.device), s.to(w.device)
        if smooth is not None:
            m.smooth = smooth.detach().float().to(w.device)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().float().clone())
        m._take_float(linear_weight(linear))
        return m

    nnslim_weight_buffers = Int8Linear.nnslim_weight_buffers
    nnslim_zero_weights = Int8Linear.nnslim_zero_weights

    def nnslim_describe(self) -> str:
        return f"Int8DynamicLinear {self.in_features}->{self.out_features}"

    def dequantize(self) -> torch.Tensor:
        w = self.qweight.float() * self.scale[:, None]
        s = self._buffers.get("smooth")
        return w if s is None else w / s[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._smooth(x.reshape(-1, shape[-1]).float())
        y = matmul(int8_dynamic_mm, x2, self.qweight, self.scale)
        return self._finish(y, shape, x.dtype)


class Int4Linear(_QuantLinearBase):
    """``nn.Linear`` with 4-bit weights, asymmetric per group of ``group_size`` inputs.

    Storage: two codes per byte plus a bf16 scale and minimum per group, about 1/7.5 of fp32
    at group size 128. With ``zero_point="integer"`` each minimum is ``-zp * scale`` for an
    integer zero point ``zp`` in ``[0, 15]``, kept in float32 (exact; the layout GPTQ/AWQ
    checkpoints and compressed-tensors hold). ``smooth`` (optional) divides the activations
    (activation-aware scaling).
    A width that ``group_size`` does not divide is padded with zero weights up to the next
    multiple (``padded_in_features``), and the input with zeros to match, so any width works.
    """

    #: ``"float"`` or ``"integer"`` (a class default: files saved before the field had floats)
    zero_point: str = "float"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        smooth: bool = False,
        zero_point: ZeroPoint = "float",
    ) -> None:
        super().__init__()
        if group_size < 2 or group_size % 2:
            raise ValueError(
                f"Int4Linear: group_size must be a positive even number, got {group_size}"
            )
        if zero_point not in ZERO_POINTS:
            raise ValueError(
                f"Int4Linear: zero_point must be one of {ZERO_POINTS}, got {zero_point!r}"
            )
        self.zero_point = zero_point
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        _int4_storage(self, out_features, in_features, group_size, zero_point)
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features))
        self._init_bias(bias)

    @classmethod
    def from_codes(
        cls,
        linear: nn.Module,
        q: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor,
        group_size: int,
        smooth: torch.Tensor | None = None,
        zero_point: ZeroPoint = "float",
    ) -> Int4Linear:
        """Build from integer codes and group parameters (see :func:`quantize_groupwise`).

        ``q`` holds ``padded_in_features`` columns (the layer's width rounded up to a multiple
        of ``group_size``); the layer's own width is ``linear``'s. With ``zero_point="integer"``
        every minimum must be ``-zp * scale`` for an integer ``zp`` in ``[0, 15]``
        (:func:`int4_grid` makes such grids).
        """
        out = q.shape[0]
        inp = linear_weight(linear).shape[1]
        m = cls(
            inp,
            out,
            bias=linear.bias is not None,
            group_size=group_size,
            smooth=smooth is not None,
            zero_point=zero_point,
        )
        if q.shape[1] != m.padded_in_features:
            raise ValueError(
                f"Int4Linear.from_codes: codes have {q.shape[1]} columns, expected "
                f"{m.padded_in_features} ({inp} inputs padded to a multiple of {group_size})."
            )
        dev = q.device
        _set_int4_codes(m, q, scale, minimum, dev)
        if zero_point == "integer":
            zp = m.zero_points()
            if zp is None:
                raise ValueError(
                    "Int4Linear.from_codes(zero_point='integer'): the minima are not -zp * scale "
                    "for integer zero points in [0, 15]; build the grid with int4_grid(..., "
                    "'integer')."
                )
        if smooth is not None:
            m.smooth = smooth.detach().float().to(dev)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().float().clone())
        m._take_float(linear_weight(linear))
        return m

    def zero_points(self) -> torch.Tensor | None:
        """The integer zero points ``zp = -minimum / scale`` (uint8, ``(out, groups)``) when
        every minimum is such a multiple of its scale in ``[0, 15]`` (always for
        ``zero_point="integer"``); ``None`` otherwise."""
        s, m = self.scales.float(), self.mins.float()
        zp = torch.round(-m / s)
        if not torch.equal(-zp * s, m) or bool((zp < 0).any() or (zp > 15).any()):
            return None
        return zp.to(torch.uint8)

    @property
    def padded_in_features(self) -> int:
        """``in_features`` rounded up to a multiple of ``group_size`` (the stored width)."""
        return padded_width(self.in_features, self.group_size)

    @classmethod
    def from_float(
        cls,
        linear: nn.Module,
        group_size: int = 128,
        weight: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
        zero_point: ZeroPoint = "float",
    ) -> Int4Linear:
        """Quantize (round to nearest)."""
        w = linear_weight(linear) if weight is None else weight
        w = _pad_columns(w, padded_width(w.shape[1], group_size))
        q, s, mn = quantize_groupwise(w, group_size, zero_point=zero_point)
        return cls.from_codes(linear, q, s, mn, group_size, smooth, zero_point)

    def nnslim_weight_buffers(self) -> dict[str, int]:
        return {"qweight": self.out_features * self.in_features, "scales": 0, "mins": 0}

    def nnslim_zero_weights(self) -> int:
        """Weights exactly zero (a sparse model quantized with integer zero points keeps its
        zeros as the zero point's code)."""
        return int((self.dequantize() == 0).sum())

    def nnslim_describe(self) -> str:
        return f"Int4Linear {self.in_features}->{self.out_features} g{self.group_size}"

    def extra_repr(self) -> str:
        zp = ", zero_point='integer'" if self.zero_point == "integer" else ""
        return super().extra_repr() + f", group_size={self.group_size}{zp}"

    def dequantize(self) -> torch.Tensor:
        w = dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)
        w = w[:, : self.in_features]
        s = self._buffers.get("smooth")
        return w if s is None else w / s[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = self._smooth(x.reshape(-1, shape[-1]))
        y = matmul(int4_mm, x2, self.qweight, self.scales, self.mins, self.group_size)
        return self._finish(y, shape, x.dtype)


class Int8Conv2d(_DtypeTracking):
    """``nn.Conv2d`` whose weight is stored as int8 with per-output-channel scales.

    The weight is dequantized for each forward (storage is 4x smaller than fp32; speed is that
    of the float convolution).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> Int8Conv2d:
        """Quantize a ``nn.Conv2d`` (round to nearest)."""
        m = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
        )
        q, s = quantize_per_channel(conv.weight)
        m.qweight = q.to(conv.weight.device)
        m.scale = s.to(conv.weight.device)
        if conv.bias is not None:
            m.bias = nn.Parameter(conv.bias.detach().clone())
        m._take_float(conv.weight)
        return m

    def nnslim_weight_buffers(self) -> dict[str, int]:
        return {"qweight": self.qweight.numel(), "scale": 0}

    def nnslim_zero_weights(self) -> int:
        return int((self.qweight == 0).sum())

    def nnslim_describe(self) -> str:
        k = "x".join(str(s) for s in self.kernel_size)
        return f"Int8Conv2d {self.in_channels}->{self.out_channels} k{k}"

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.view(-1, 1, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]  # type: ignore[arg-type]
            x = F.pad(x, pad, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class _QuantEmbeddingBase(_DtypeTracking):
    """An ``nn.Embedding`` whose table is stored quantized, one row per token.

    The table's layout is the one of the Linear layer of the same shape (``num_embeddings``
    outputs, ``embedding_dim`` inputs), so an embedding tied to an LM head shares the head's
    integer codes and scales: :meth:`sharing` builds the lookup over a quantized head's own
    tensors (one copy of the codes, as the float model had one weight). A lookup de-quantizes
    only the rows it reads.
    """

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None = None
    #: buffers a tied head holds under the same names
    _shared_buffers: tuple[str, ...] = ()

    def _init_shape(self, emb: nn.Module) -> None:
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = getattr(emb, "padding_idx", None)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _share(self, head: nn.Module) -> None:
        for name in self._shared_buffers:
            t = head._buffers.get(name)
            if t is not None:
                self.register_buffer(name, t)
        self.float_dtype = head.float_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ids.reshape(-1))
        s = self._buffers.get("smooth")
        if s is not None:  # a tied head's activation-aware scaling
            rows = rows / s.float()[None, :]
        return rows.to(self._weight_dtype()).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class Int8Embedding(_QuantEmbeddingBase):
    """``nn.Embedding`` with int8 rows (symmetric, one scale per token: an int8 LM head's
    layout, see :class:`Int8Linear`)."""

    _shared_buffers = ("qweight", "scale", "smooth")

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer(
            "qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8)
        )
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, emb: nn.Module) -> Int8Embedding:
        """Round ``emb``'s table to nearest, per row."""
        w = emb.weight.detach()
        _check_finite(w, "Int8Embedding.from_float: the embedding")
        m = cls(*w.shape)
        m._init_shape(emb)
        q, s = quantize_per_channel(w.float())
        m.qweight, m.scale = q.to(w.device), s.to(w.device)
        m._take_float(w)
        return m

    @classmethod
    def sharing(cls, emb: nn.Module, head: Int8Linear | Int8DynamicLinear) -> Int8Embedding:
        """The lookup of ``emb`` (tied to ``head``) over the quantized head's own tensors."""
        m = cls.__new__(cls)
        _DtypeTracking.__init__(m)
        m._init_shape(emb)
        m._share(head)
        return m

    def nnslim_weight_buffers(self) -> dict[str, int]:
        return {"qweight": self.qweight.numel(), "scale": 0}

    def nnslim_describe(self) -> str:
        return f"Int8Embedding {self.num_embeddings}x{self.embedding_dim}"

    def dequantize(self) -> torch.Tensor:
        w = self.qweight.float() * self.scale.float()[:, None]
        s = self._buffers.get("smooth")
        return w if s is None else w / s.float()[None, :]

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * self.scale.float()[ids][:, None]


class Int4Embedding(_QuantEmbeddingBase):
    """``nn.Embedding`` with 4-bit rows, asymmetric per group of ``group_size`` columns (an
    int4 LM head's layout, see :class:`Int4Linear`)."""

    _shared_buffers = ("qweight", "scales", "mins", "smooth")
    zero_point: str = "float"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group_size: int = 128,
        zero_point: ZeroPoint = "float",
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group_size, self.zero_point = group_size, zero_point
        _int4_storage(self, num_embeddings, embedding_dim, group_size, zero_point)

    @classmethod
    def from_float(
        cls, emb: nn.Module, group_size: int = 128, zero_point: ZeroPoint = "float"
    ) -> Int4Embedding:
        """Round ``emb``'s table to nearest, per group of ``group_size`` columns of a row."""
        w = emb.weight.detach()
        _check_finite(w, "Int4Embedding.from_float: the embedding")
        m = cls(*w.shape, group_size=group_size, zero_point=zero_point)
        m._init_shape(emb)
        padded = _pad_columns(w.float(), padded_width(w.shape[1], group_size))
        q, s, mn = quantize_groupwise(padded, group_size, zero_point=zero_point)
        _set_int4_codes(m, q, s, mn, w.device)
        m._take_float(w)
        return m

    @classmethod
    def sharing(cls, emb: nn.Module, head: Int4Linear) -> Int4Embedding:
        """The lookup of ``emb`` (tied to ``head``) over the quantized head's own tensors."""
        m = cls.__new__(cls)
        _DtypeTracking.__init__(m)
        m._init_shape(emb)
        m.group_size, m.zero_point = head.group_size, head.zero_point
        m._share(head)
        return m

    def nnslim_weight_buffers(self) -> dict[str, int]:
        return {"qweight": self.num_embeddings * self.embedding_dim, "scales": 0, "mins": 0}

    def nnslim_describe(self) -> str:
        return f"Int4Embedding {self.num_embeddings}x{self.embedding_dim} g{self.group_size}"

    def dequantize(self) -> torch.Tensor:
        w = dequantize_int4(self.qweight, self.scales, self.mins, self.group_size)
        w = w[:, : self.embedding_dim]
        s = self._buffers.get("smooth")
        return w if s is None else w / s.float()[None, :]

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(self.qweight[ids], self.scales[ids], self.mins[ids], self.group_size)
        return w[:, : self.embedding_dim]
