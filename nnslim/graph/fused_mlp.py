"""Fused gate/up MLPs (Phi-3's ``gate_up_proj``, ModernBERT's ``Wi``): prune hidden units from both halves at once.

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

__all__ = ["ExpertBankSpec", "FusedMLPSpec", "find_expert_banks", "find_fused_mlps"]

#: child names of (fused gate/up layer, down layer)
NAMES = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))


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
        return _removable(self.units, ratio, round_to or 1)

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


def _removable(units: int, ratio: float, step: int) -> int:
    """Units ``ratio`` removes: the nearest whole number, at least one kept, the kept count
    rounded up to a multiple of ``step``."""
    keep = units - min(math.floor(ratio * units + 0.5), units - 1)
    if keep % step:
        keep = min(units, keep + step - keep % step)
    return units - keep


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
            if fused.out_features == units:
                continue  # a plain MLP that happens to use these names
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


# -- mixture-of-experts banks -------------------------------------------------------------------
#: parameter names of an expert bank: (fused gate/up ``[E, 2I, H]``, down ``[E, H, I]``)
EXPERT_NAMES = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))


@dataclass
class ExpertBankSpec:
    """The experts of one mixture-of-experts layer stored as 3-D parameters (transformers'
    ``Qwen3MoeExperts``, ``OlmoeExperts``, ``MixtralExperts``...): expert ``e`` computes
    ``down[e] @ (act(gate) * up)`` with ``gate, up = (gate_up[e] @ x).chunk(2)``. Each expert
    loses the same number of hidden units, each its own least important ones.

    Attributes:
        path: the experts module; gate_up, down: its parameter names; units: units per expert.
    """

    path: str
    module: nn.Module
    gate_up: str
    down: str
    experts: int
    units: int

    @property
    def fused(self) -> str:  # the key Prune plans and selects the bank by
        return self.path

    def removable(self, ratio: float, round_to: int | None = None) -> int:
        """Units ``ratio`` removes from each expert; the kept count is a multiple of 8 (and of
        ``round_to``): transformers runs expert banks through ``torch._grouped_mm``, which
        needs rows of a multiple of 16 bytes."""
        return _removable(self.units, ratio, math.lcm(8, round_to or 1))

    def unit_scores(self) -> torch.Tensor:
        """``[E, I]``: each unit's L2 magnitude over its gate row, up row and down column."""
        gu = self.module._parameters[self.gate_up].detach().float()
        down = self.module._parameters[self.down].detach().float()
        i = self.units
        return gu[:, :i].norm(dim=2) + gu[:, i:].norm(dim=2) + down.norm(dim=1)

    def prune_units(self, n: int) -> None:
        """Remove the ``n`` lowest-scoring units of every expert."""
        if n <= 0:
            return
        m, i = self.module, self.units
        keep = self.unit_scores().argsort(dim=1, descending=True)[:, : i - n].sort(dim=1).values
        gu, down = m._parameters[self.gate_up], m._parameters[self.down]
        rows = torch.cat([keep, keep + i], dim=1).to(gu.device)  # [E, 2(I-n)]
        new_gu = torch.gather(gu.data, 1, rows[:, :, None].expand(-1, -1, gu.shape[2]))
        cols = keep.to(down.device)[:, None, :].expand(-1, down.shape[1], -1)
        new_down = torch.gather(down.data, 2, cols)
        for name, old, new in ((self.gate_up, gu, new_gu), (self.down, down, new_down)):
            p = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
            m._parameters[name] = p
        bias = m._parameters.get(f"{self.gate_up}_bias")
        if bias is not None:
            b = torch.gather(bias.data, 1, rows)
            m._parameters[f"{self.gate_up}_bias"] = nn.Parameter(
                b, requires_grad=bias.requires_grad
            )
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if m.__dict__.get(attr) == i:
                m.__dict__[attr] = i - n
        self.units = i - n


def find_expert_banks(
    model: nn.Module, *, check: bool = True
) -> tuple[list[ExpertBankSpec], dict[str, str]]:
    """Expert banks nnslim can prune, and the ones it cannot, with reasons."""
    found: list[ExpertBankSpec] = []
    left: dict[str, str] = {}
    for path, m in model.named_modules():
        for gu_name, down_name in EXPERT_NAMES:
            gu, down = m._parameters.get(gu_name), m._parameters.get(down_name)
            if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor):
                continue
            if gu.dim() != 3 or down.dim() != 3:
                continue
            e, two_i, h = gu.shape
            if down.shape[0] != e or down.shape[1] != h or two_i != 2 * down.shape[2]:
                left[path] = (
                    f"expert bank {type(m).__name__} with {gu_name} {tuple(gu.shape)} and "
                    f"{down_name} {tuple(down.shape)}: not [E, 2I, H] and [E, H, I]"
                )
                continue
            if check and gu.device.type != "meta":
                why = _expert_layout_check(m, gu_name, down_name, e, down.shape[2], h)
                if why:
                    left[path] = why
                    continue
            found.append(ExpertBankSpec(path, m, gu_name, down_name, e, down.shape[2]))
    return found, left


def _expert_layout_check(
    m: nn.Module, gu_name: str, down_name: str, experts: int, units: int, hidden: int
) -> str | None:
    """``None`` when unit ``i`` of every expert is rows ``i`` and ``I + i`` of gate/up and
    column ``i`` of down (zeroing all three leaves the output as zeroing the rows alone)."""
    probe = copy.deepcopy(m).float().eval()
    gu, down = probe._parameters[gu_name], probe._parameters[down_name]
    i = units // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, hidden, generator=g)
    idx = torch.arange(6)[:, None] % experts
    w = torch.ones(6, 1)
    try:
        with torch.no_grad():
            gu[:, [i, units + i]] = 0
            bias = probe._parameters.get(f"{gu_name}_bias")
            if bias is not None:
                bias[:, [i, units + i]] = 0
            a = probe(x, idx, w)
            down[:, :, i] = 0
            b = probe(x, idx, w)
    except Exception as e:
        return f"expert bank {type(m).__name__} could not be checked ({type(e).__name__})"
    if not isinstance(a, torch.Tensor) or not torch.equal(a, b) or not a.abs().sum() > 0:
        return (
            f"{type(m).__name__}'s {gu_name} is not split into [gate | up] halves per expert as "
            "nnslim expects (an interleaved or biased layout): its units are kept"
        )
    return None
