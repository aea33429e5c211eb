"""Modules that hold integer weights and run integer kernels.

Every module stores its integer weights and scales as buffers (so ``state_dict`` and
:func:`nnslim.save` write the real, small tensors) and reports them to the profiler through
``nnslim_weight_buffers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Int8Conv2d", "Int8Linear", "quantize_per_channel"]


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
    return q.reshape(w.shape), scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (per-output-channel scales), weight-only.

    When ``in_features`` is a multiple of 8 it runs ``aten._weight_int8pack_mm`` on bf16
    activations (the fast CPU kernel; the output goes back to the input dtype); otherwise it
    dequantizes the weight and runs a float matmul (the kernel mis-computes for other widths).

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
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Module) -> Int8Linear:
        """Quantize a ``nn.Linear`` (round to nearest)."""
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None)
        q, s = quantize_per_channel(w)
        m.qweight = q.to(w.device)
        m.scale = s.to(w.device)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone())
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
        x2 = x.reshape(-1, shape[-1])
        if self.in_features % 8 == 0 and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(
                x2.to(torch.bfloat16), self.qweight, self.scale.to(torch.bfloat16)
            ).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class Int8Conv2d(nn.Module):
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
