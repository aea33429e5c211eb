"""Packed sparse layers: the kept weights and a bitmask, for unstructured and N:M sparsity.

``Prune(structure="unstructured" | "N:M", pack=True)`` stores each sparsified Linear (or
Hugging Face ``Conv1D``) as :class:`SparseLinear` and each Conv2d as :class:`SparseConv2d`:

* ``values``: a 1-D parameter, the kept weights in row-major order, in the layer's float dtype;
* ``bitmask``: a ``uint8`` buffer, one bit per weight of the dense ``(out, in[, kh, kw])``
  weight in row-major order, eight to a byte, the first weight in the lowest bit.

At 50% sparsity an fp32 layer takes 0.53 of its dense bytes and a bf16 one 0.56 (the values plus
one bit per weight); a 2:4 layer the same (its bitmask holds, per group of four, what the usual
pair of 2-bit indices holds). The layout is compressed-tensors' ``sparse-bitmask`` one (values,
bitmask) without its per-row offsets, which the row-major order makes unnecessary.

Each call rebuilds the dense weight (zeros where the bit is off) and runs the dense kernel: the
layer saves memory and file bytes, not time (no CPU kernel here multiplies by the kept weights
alone). Gradients reach ``values`` only, so fine-tuning keeps the pattern without a mask.
``weight`` is that dense weight (a copy: writing into it does not change the layer; gradients
through it reach ``values``), which is how the export formats read it (zeros stored dense where the format has no sparse layout).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base.modules import is_hf_conv1d, linear_weight
from .masks import MASK_NAME

__all__ = ["SparseConv2d", "SparseLinear", "bit_table", "pack_bits", "unpack_bits"]

_BIT_WEIGHTS = tuple(1 << i for i in range(8))
_BITS: dict[torch.device, torch.Tensor] = {}


def bit_table(device: torch.device) -> torch.Tensor:
    """``(256, 8)`` booleans: the bits of each byte, lowest first (a lookup unpacks a byte in
    one read: 5x faster than shifting each bit out, measured on CPU)."""
    table = _BITS.get(device)
    if table is None:
        table = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
        table = _BITS[device] = table.bool()
    return table


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as ``uint8`` bytes, row-major, eight to a byte, lowest bit first."""
    flat = keep.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bitmask: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat boolean mask of ``numel`` entries that :func:`pack_bits` packed."""
    return bit_table(bitmask.device).index_select(0, bitmask.long()).reshape(-1)[:numel]


class _PackedSparse(nn.Module):
    """The storage both layers share: ``values``, ``bitmask`` and the dense shape."""

    weight_shape: tuple[int, ...]
    #: other transforms leave these layers, saying why (see ``layer_skip_reason``)
    nnslim_packed_sparse = True

    def _pack(self, w: torch.Tensor, keep: torch.Tensor, requires_grad: bool) -> None:
        if tuple(keep.shape) != tuple(w.shape):
            raise ValueError(
                f"{type(self).__name__}: the mask's shape {tuple(keep.shape)} is not the "
                f"weight's {tuple(w.shape)}"
            )
        keep = keep.to(torch.bool)
        self.weight_shape = tuple(int(s) for s in w.shape)
        self.values = nn.Parameter(
            w.detach().reshape(-1)[keep.reshape(-1)].clone(), requires_grad=requires_grad
        )
        self.register_buffer("bitmask", pack_bits(keep))

    def _fill(self, shell: nn.Module) -> Any:
        """``shell`` (a Linear/Conv2d built on the meta device) with the dense weight, this
        layer's bias and the mask."""
        shell.weight = nn.Parameter(self.dense().detach(), requires_grad=self.values.requires_grad)
        shell.bias = self.bias
        shell.register_buffer(MASK_NAME, self.mask)
        return shell

    def _take_bias(self, layer: nn.Module) -> None:
        bias = layer.bias
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)
        )

    @property
    def mask(self) -> torch.Tensor:
        """The boolean keep-mask, in the dense weight's shape (a copy)."""
        return unpack_bits(self.bitmask, math.prod(self.weight_shape)).reshape(self.weight_shape)

    def dense(self) -> torch.Tensor:
        """The dense weight: ``values`` where the bitmask is set, zeros elsewhere
        (differentiable in ``values``)."""
        numel = math.prod(self.weight_shape)
        keep = unpack_bits(self.bitmask, numel)
        flat = torch.zeros(numel, dtype=self.values.dtype, device=self.values.device)
        if self.values.numel():
            flat = flat.masked_scatter(keep, self.values)
        return flat.reshape(self.weight_shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight this layer stands for (a copy: writing into it does not change
        the layer; a gradient through it reaches ``values``, for code that reads a layer's
        ``weight``, as ``nn.MultiheadAttention`` does its output projection's)."""
        return self.dense()

    def nnslim_weight_buffers(self) -> dict[str, int]:
        # the profiler counts the dense weights this layer stands for (the zeros among them
        # through nnslim_zero_weights), and the bytes of what it stores
        return {"values": math.prod(self.weight_shape), "bitmask": 0}

    def nnslim_zero_weights(self) -> int:
        kept = self.values.numel()
        return math.prod(self.weight_shape) - kept + int((self.values == 0).sum())

    @property
    def sparsity(self) -> float:
        """The fraction of the dense weight that is not stored."""
        return 1.0 - self.values.numel() / max(1, math.prod(self.weight_shape))


class SparseLinear(_PackedSparse):
    """``nn.Linear`` whose weight is stored packed: the kept weights and a bitmask.

    Args:
        in_features: input width.
        out_features: output width.
        kept: how many weights are stored.
        bias: whether there is a bias.
    """

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_shape = (out_features, in_features)
        self.values = nn.Parameter(torch.zeros(kept))
        self.register_buffer(
            "bitmask", torch.zeros(-(-in_features * out_features // 8), dtype=torch.uint8)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Module, keep: torch.Tensor | None = None) -> SparseLinear:
        """Pack an ``nn.Linear`` or Hugging Face ``Conv1D``: the weights ``keep`` marks (the
        non-zero ones by default; ``keep`` in the layer's own weight layout)."""
        w = linear_weight(linear).detach()
        if keep is None:
            keep = w != 0
        elif is_hf_conv1d(linear):
            keep = keep.t()
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = int(w.shape[1]), int(w.shape[0])
        m._pack(w, keep, linear.weight.requires_grad)
        m._take_bias(linear)
        return m

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight and its ``weight_mask`` (what
        ``Prune(pack=False)`` leaves): the form that Prune re-sparsifies and the Trainer's masks
        keep."""
        shell = nn.Linear(self.in_features, self.out_features, self.bias is not None, "meta")
        return self._fill(shell)

    def nnslim_describe(self) -> str:
        return f"SparseLinear {self.in_features}->{self.out_features} ({self.sparsity:.0%} zeros)"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"kept={self.values.numel()}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense().to(x.dtype), b)


class SparseConv2d(_PackedSparse):
    """``nn.Conv2d`` (zero padding) whose weight is stored packed: the kept weights and a
    bitmask."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        kept: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self._conv_attrs(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.values = nn.Parameter(torch.zeros(kept))
        self.register_buffer(
            "bitmask", torch.zeros(-(-math.prod(self.weight_shape) // 8), dtype=torch.uint8)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def _conv_attrs(
        self, cin: int, cout: int, k: Any, stride: Any, padding: Any, dil: Any, groups: int
    ) -> None:
        self.in_channels, self.out_channels = int(cin), int(cout)
        self.kernel_size = tuple(int(s) for s in k)
        self.stride = tuple(int(s) for s in stride)
        self.padding = padding if isinstance(padding, str) else tuple(int(s) for s in padding)
        self.dilation = tuple(int(s) for s in dil)
        self.groups = int(groups)
        self.weight_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, keep: torch.Tensor | None = None) -> SparseConv2d:
        """Pack an ``nn.Conv2d`` with zero padding (the non-zero weights, or those ``keep``
        marks)."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"SparseConv2d packs zero-padded convolutions; this one pads with "
                f"{conv.padding_mode!r}"
            )
        w = conv.weight.detach()
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m._conv_attrs(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        m._pack(w, w != 0 if keep is None else keep, conv.weight.requires_grad)
        m._take_bias(conv)
        return m

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dense weight and its ``weight_mask``."""
        shell = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            device="meta",
        )
        return self._fill(shell)

    def nnslim_describe(self) -> str:
        k = "x".join(str(s) for s in self.kernel_size)
        return (
            f"SparseConv2d {self.in_channels}->{self.out_channels} k{k} ({self.sparsity:.0%} zeros)"
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"kept={self.values.numel()}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(
            x,
            self.dense().to(x.dtype),
            b,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
