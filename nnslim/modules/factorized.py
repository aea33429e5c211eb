"""Low-rank replacements for Linear and Conv2d layers.

Each holds ordinary ``nn.Linear``/``nn.Conv2d`` children, so the profiler, the tracer and other
transforms see plain layers, and the Trainer fine-tunes them like any other.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FactorizedConv2d", "FactorizedLinear"]


class FactorizedLinear(nn.Module):
    """``y = second(first(x))``: ``first`` maps ``in -> rank`` (no bias), ``second`` ``rank -> out``.

    Args:
        in_features: input width.
        out_features: output width.
        rank: the inner width.
        bias: whether ``second`` has a bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def nnslim_describe(self) -> str:
        return f"FactorizedLinear {self.in_features}->{self.rank}->{self.out_features}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class FactorizedConv2d(nn.Module):
    """A convolution as a chain of smaller ones.

    ``kind="tucker"``: 1x1 ``in -> rank_in``, ``k x k`` core ``rank_in -> rank_out`` (the
    original stride, padding and dilation), 1x1 ``rank_out -> out`` (Tucker-2).
    ``kind="spatial"``: ``k x 1`` ``in -> rank`` then ``1 x k`` ``rank -> out`` (spatial SVD).
    """

    def __init__(
        self,
        layers: nn.Sequential,
        kind: str,
        in_channels: int,
        out_channels: int,
        ranks: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.kind = kind
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.ranks = tuple(ranks)
        self.layers = layers

    def nnslim_describe(self) -> str:
        inner = "->".join(str(r) for r in self.ranks)
        return f"FactorizedConv2d[{self.kind}] {self.in_channels}->{inner}->{self.out_channels}"

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ranks={self.ranks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
