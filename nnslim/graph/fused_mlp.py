"""Fused gate/up MLPs (Phi-3's ``gate_up_proj``): prune hidden units from both halves at once.

A gated MLP whose gate and up projections are one layer computes ``gate, up = fc(x).chunk(2)``
and ``down(act(gate) * up)``. Hidden unit ``i`` is row ``i`` and row ``I + i`` of the fused layer
and column ``i`` of ``down``. torch-pruning cannot follow ``chunk`` (it cuts at a position fixed
at run time), so nnslim removes these units itself, the same units from both halves.

The layout is checked on the module before it is trusted: with rows ``i`` and ``I + i`` of the
fused layer zeroed, unit ``i`` contributes nothing, so zeroing column ``i`` of ``down`` as well
must leave the output exactly as it was. An MLP that fails the check keeps its units, with the
reason.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["FusedMLPSpec", "find_fused_mlps"]

#: child names of (fused gate/up layer, down layer)
NAMES = (("gate_up_proj", "down_proj"),)


@dataclass
class FusedMLPSpec:
    """One fused gate/up MLP.

    Attributes:
        path: the MLP module's path; fused, down: paths of its two layers.
        units: hidden units (half the fused layer's outputs).
    """

    path: str
    module: nn.Module
    fused: str
    down: str
    units: int

    def removable(self, ratio: float, round_to: int | None = None) -> int:
        """Units ``ratio`` removes (nearest whole number; at least one kept; the kept count a
        multiple of ``round_to`` when given)."""
        keep = self.units - min(math.floor(ratio * self.units + 0.5), self.units - 1)
        if round_to and keep % round_to:
            keep = min(self.units, keep + round_to - keep % round_to)
        return self.units - keep

    def unit_scores(self, model: nn.Module, elem: Any) -> torch.Tensor:
        """Importance of each unit: its two rows of the fused layer and its column of down."""
        fused, down = model.get_submodule(self.fused), model.get_submodule(self.down)
        rows = elem(fused).reshape(2 * self.units, -1).sum(dim=1).float().cpu()
        cols = elem(down).sum(dim=0).float().cpu()
        return rows[: self.units] + rows[self.units :] + cols

    def prune_units(self, model: nn.Module, remove: list[int]) -> None:
        if not remove:
            return
        fused, down = model.get_submodule(self.fused), model.get_submodule(self.down)
        tp.prune_linear_out_channels(fused, sorted(remove + [self.units + i for i in remove]))
        tp.prune_linear_in_channels(down, sorted(remove))
        self.units -= len(remove)


def find_fused_mlps(
    model: nn.Module, *, check: bool = True
) -> tuple[list[FusedMLPSpec], dict[str, str]]:
    """Fused gate/up MLPs nnslim can prune, and the fused layers it cannot, with reasons."""
    found: list[FusedMLPSpec] = []
    left: dict[str, str] = {}
    for path, m in model.named_modules():
        for fused_name, down_name in NAMES:
            fused, down = m._modules.get(fused_name), m._modules.get(down_name)
            if type(fused) is not nn.Linear or type(down) is not nn.Linear:
                continue
            join = f"{path}.{{}}" if path else "{}"
            units = down.in_features
            if fused.out_features != 2 * units:
                left[join.format(fused_name)] = (
                    f"fused gate/up layer with {fused.out_features} outputs for "
                    f"{units} units of {down_name}: not two halves"
                )
                continue
            if check and fused.weight.device.type != "meta":
                why = _layout_check(m, fused_name, down_name, units)
                if why:
                    left[join.format(fused_name)] = why
                    continue
            found.append(
                FusedMLPSpec(path, m, join.format(fused_name), join.format(down_name), units)
            )
    return found, left


def _layout_check(m: nn.Module, fused_name: str, down_name: str, units: int) -> str | None:
    """``None`` when the module computes ``down(f(gate) * up)`` over the two halves."""
    probe = copy.deepcopy(m).float().eval()
    fused, down = probe._modules[fused_name], probe._modules[down_name]
    i = units // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, fused.in_features, generator=g)
    try:
        with torch.no_grad():
            fused.weight[[i, units + i]] = 0
            if fused.bias is not None:
                fused.bias[[i, units + i]] = 0
            a = probe(x)
            down.weight[:, i] = 0
            b = probe(x)
    except Exception as e:
        return f"fused gate/up MLP {type(m).__name__} could not be checked ({type(e).__name__})"
    if not isinstance(a, torch.Tensor) or not torch.equal(a, b):
        return (
            f"{type(m).__name__}'s {fused_name} is not split into [gate | up] halves as nnslim "
            "expects: its units are kept"
        )
    return None
