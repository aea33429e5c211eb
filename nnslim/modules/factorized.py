"""Low-rank replacements for Linear and Conv2d layers.

Each holds ordinary ``nn.Linear``/``nn.Conv2d`` children, so the profiler, the tracer and other
transforms see plain layers, and the Trainer fine-tunes them like any other.

They are drop-ins for the layer they replace: code that reads ``weight``, ``bias``,
``in_features``/``out_features`` (``in_channels``, ``kernel_size``, ``stride``... for
convolutions) gets what an ``nn.Linear``/``nn.Conv2d`` computing the same function would
answer. ``weight`` is the product of the factors, built on each access (a copy: writing into it
does not change the layer); sizes come from the factors, so they stay right after pruning.
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
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def in_features(self) -> int:
        return self.first.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.second.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.first.weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` product ``second.weight @ first.weight``."""
        with torch.no_grad():
            w = self.second.weight
            return (w.float() @ self.first.weight.float()).to(w.dtype)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.second.bias

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
        self.layers = layers

    @property
    def in_channels(self) -> int:
        return self.layers[0].weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.layers[-1].weight.shape[0]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(layer.weight.shape[0]) for layer in list(self.layers)[:-1])

    # the convolution the chain computes
    @property
    def kernel_size(self) -> tuple[int, int]:
        if self.kind == "tucker":
            return tuple(self.layers[1].kernel_size)  # type: ignore[return-value]
        return (self.layers[0].kernel_size[0], self.layers[1].kernel_size[1])

    def _spatial(self, attr: str) -> tuple[int, int]:
        if self.kind == "tucker":
            return tuple(getattr(self.layers[1], attr))  # type: ignore[return-value]
        a, b = getattr(self.layers[0], attr), getattr(self.layers[1], attr)
        if self.kernel_size == (1, 1) and attr != "dilation":
            # two 1x1 convolutions (a pointwise layer's SVD): on each axis one of the two
            # strides and pads (the first on both, or, as the spatial split of any kernel
            # does, the first vertically and the second horizontally)
            if attr == "stride":
                return (a[0] * b[0], a[1] * b[1])
            return (a[0] + b[0], a[1] + b[1])
        return (a[0], b[1])

    @property
    def stride(self) -> tuple[int, int]:
        return self._spatial("stride")

    @property
    def padding(self) -> tuple[int, int]:
        return self._spatial("padding")

    @property
    def dilation(self) -> tuple[int, int]:
        return self._spatial("dilation")

    @property
    def groups(self) -> int:
        return 1

    @property
    def padding_mode(self) -> str:
        return str(self.layers[1 if self.kind == "tucker" else 0].padding_mode)

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel of the convolution the chain computes."""
        with torch.no_grad():
            dtype = self.layers[-1].weight.dtype
            if self.kind == "tucker":
                first, mid, last = self.layers
                w = torch.einsum(
                    "ob,bahw,ai->oihw",
                    last.weight[:, :, 0, 0].float(),
                    mid.weight.float(),
                    first.weight[:, :, 0, 0].float(),
                )
            else:
                first, second = self.layers
                w = torch.einsum(
                    "rih,orw->oihw", first.weight[..., 0].float(), second.weight[:, :, 0, :].float()
                )
            return w.to(dtype)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.layers[-1].bias

    def nnslim_describe(self) -> str:
        inner = "->".join(str(r) for r in self.ranks)
        return f"FactorizedConv2d[{self.kind}] {self.in_channels}->{inner}->{self.out_channels}"

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, ranks={self.ranks}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
