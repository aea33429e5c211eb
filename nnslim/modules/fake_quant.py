"""Quantization-aware training: float modules that round like their integer twins.

:class:`FakeQuantLinear` keeps a float weight (trainable) and, in the forward, uses the weight
rounded to the integer grid of its scheme (and, for ``int8-dynamic``, activations rounded per
token), with the straight-through estimator: the gradient flows as if rounding were the
identity. :func:`nnslim.convert` replaces each with the real integer module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantized import int4_grid

__all__ = ["FakeQuantLinear", "fake_quant_weight"]

SCHEMES = ("int8", "int8-dynamic", "int4")


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, scheme: str, group_size: int) -> torch.Tensor:
    """``w`` rounded to the grid of ``scheme`` (values stay float), with a straight-through
    gradient."""
    if scheme == "int4":
        out, inp = w.shape
        # a width that group_size does not divide is padded with zeros, as Int4Linear pads it
        g = F.pad(w, (0, -inp % group_size)).reshape(out, -1, group_size)
        # the grid Int4Linear stores (bf16 scale and minimum), so convert keeps the function
        scale, mn = int4_grid(g.amin(-1).detach(), g.amax(-1).detach())
        scale, mn = scale[..., None], mn[..., None]
        q = torch.round((g - mn) / scale).clamp(0, 15) * scale + mn
        return _ste(w, q.reshape(out, -1)[:, :inp])
    amax = w.abs().amax(dim=1, keepdim=True).detach()
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return _ste(w, torch.round(w / scale).clamp(-127, 127) * scale)


class FakeQuantLinear(nn.Module):
    """A Linear trained with the rounding of ``scheme`` (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        scheme: str = "int8",
        group_size: int = 128,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"FakeQuantLinear: unknown scheme {scheme!r}; supported: {SCHEMES}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.group_size = group_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    @classmethod
    def from_float(cls, linear: nn.Module, scheme: str, group_size: int) -> FakeQuantLinear:
        w = linear.weight if isinstance(linear, nn.Linear) else linear.weight.t()
        m = cls(w.shape[1], w.shape[0], linear.bias is not None, scheme, group_size)
        m.weight = nn.Parameter(w.detach().clone().float())
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone().float())
        return m

    def nnslim_describe(self) -> str:
        return f"FakeQuantLinear[{self.scheme}] {self.in_features}->{self.out_features}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_weight(self.weight, self.scheme, self.group_size)
        if self.scheme == "int8-dynamic":
            amax = x.abs().amax(dim=-1, keepdim=True).detach().clamp_min(1e-12)
            s = amax / 127
            x = _ste(x, torch.round(x / s).clamp(-127, 127) * s)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
