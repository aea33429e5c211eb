"""Fused gate/up MLPs (Phi-3's ``gate_up_proj``, ModernBERT's ``Wi``) and mixture-of-experts
banks: prune hidden units from both halves at once.

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
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..modules.masks import cut_mask

__all__ = ["ExpertBankSpec", "FusedMLPSpec", "find_expert_banks", "find_fused_mlps"]

#: child names of (fused gate/up layer, down layer)
NAMES = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))

#: what a layout check found per module: for a fused MLP ``None`` (it holds) or why not; for an
#: expert bank whether it interleaves gate and up, or why neither layout holds. The forward
#: decides the layout and pruning does not change it, so a check (it deep-copies the module)
#: runs once per module; later traces and ``check=False`` lookups reuse it
_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool | str | None] = weakref.WeakKeyDictionary()


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
        rows = sorted(remove + [self.units + i for i in remove])
        tp.prune_linear_out_channels(fused, rows)
        cut_mask(fused, "out", rows)
        tp.prune_linear_in_channels(down, sorted(remove))
        cut_mask(down, "in", sorted(remove))
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
                if m not in _CHECKED:
                    _CHECKED[m] = _layout_check(m, fused_name, down_name, units)
                why = _CHECKED[m]
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
#: parameter names of an expert bank: (fused gate/up, down)
EXPERT_NAMES = (("gate_up_proj", "down_proj"), ("Wi", "Wo"))


@dataclass
class ExpertBankSpec:
    """The experts of one mixture-of-experts layer stored as 3-D parameters (transformers'
    ``Qwen3MoeExperts``, ``OlmoeExperts``, ``MixtralExperts``, ``GptOssExperts``,
    ``Llama4TextExperts``...): expert ``e`` computes ``down[e](act(gate) * up)`` from its
    fused gate/up projection. Each expert loses the same number of hidden units, each its own
    least important ones.

    Two layouts are known, each checked on the module before it is trusted:

    * ``transposed``: ``False`` for ``gate_up [E, 2I, H]`` and ``down [E, H, I]`` (``W @ x``),
      ``True`` for ``gate_up [E, H, 2I]`` and ``down [E, I, H]`` (``x @ W``: GPT-OSS, Llama 4);
    * ``interleaved``: ``False`` when unit ``i`` is gate ``i`` and up ``I + i`` (``chunk(2)``),
      ``True`` when it is ``2i`` and ``2i + 1`` (GPT-OSS's ``[..., ::2]``, ``[..., 1::2]``).

    Attributes:
        path: the experts module; gate_up, down: its parameter names; units: units per expert.
    """

    path: str
    module: nn.Module
    gate_up: str
    down: str
    experts: int
    units: int
    transposed: bool = False
    interleaved: bool = False

    @property
    def fused(self) -> str:  # the key Prune plans and selects the bank by
        return self.path

    def removable(self, ratio: float, round_to: int | None = None) -> int:
        """Units ``ratio`` removes from each expert; the kept count is a multiple of 8 (and of
        ``round_to``): transformers runs expert banks through ``torch._grouped_mm``, which
        needs rows of a multiple of 16 bytes."""
        return _removable(self.units, ratio, math.lcm(8, round_to or 1))

    def _unit_axes(self) -> tuple[int, int]:
        """The axis of the 2I gate/up rows and of the I down units in the stored parameters."""
        return (2, 1) if self.transposed else (1, 2)

    def _pairs(self, units: torch.Tensor) -> torch.Tensor:
        """``[E, k]`` unit indices -> ``[E, 2k]`` gate/up positions, ascending."""
        if self.interleaved:
            return torch.stack([2 * units, 2 * units + 1], dim=2).flatten(1)
        return torch.cat([units, units + self.units], dim=1)

    def unit_scores(self) -> torch.Tensor:
        """``[E, I]``: each unit's L2 magnitude over its gate row, up row and down column."""
        gu_axis, down_axis = self._unit_axes()
        gu = self.module._parameters[self.gate_up].detach().float().movedim(gu_axis, 1)
        down = self.module._parameters[self.down].detach().float().movedim(down_axis, 2)
        per_row = gu.norm(dim=2)  # [E, 2I]
        if self.interleaved:
            pair = per_row[:, 0::2] + per_row[:, 1::2]
        else:
            pair = per_row[:, : self.units] + per_row[:, self.units :]
        return pair + down.norm(dim=1)

    def prune_units(self, n: int) -> None:
        """Remove the ``n`` lowest-scoring units of every expert."""
        if n <= 0:
            return
        m, i = self.module, self.units
        keep = self.unit_scores().argsort(dim=1, descending=True)[:, : i - n].sort(dim=1).values
        gu, down = m._parameters[self.gate_up], m._parameters[self.down]
        gu_axis, down_axis = self._unit_axes()
        rows = self._pairs(keep)  # [E, 2(I-n)]
        new_gu = _gather(gu.data, gu_axis, rows)
        new_down = _gather(down.data, down_axis, keep)
        for name, old, new in ((self.gate_up, gu, new_gu), (self.down, down, new_down)):
            p = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
            m._parameters[name] = p
        bias = m._parameters.get(f"{self.gate_up}_bias")
        if bias is not None:
            b = torch.gather(bias.data, 1, rows.to(bias.device))
            m._parameters[f"{self.gate_up}_bias"] = nn.Parameter(
                b, requires_grad=bias.requires_grad
            )
        for attr in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if m.__dict__.get(attr) == i:
                m.__dict__[attr] = i - n
        self.units = i - n


def _gather(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``t[e]`` keeps, along ``axis`` (1 or 2), the positions ``index[e]`` of each expert."""
    index = index.to(t.device)
    if axis == 1:
        return torch.gather(t, 1, index[:, :, None].expand(-1, -1, t.shape[2]))
    return torch.gather(t, 2, index[:, None, :].expand(-1, t.shape[1], -1))


def _bank_shape(gu: torch.Tensor, down: torch.Tensor) -> tuple[bool, int, int] | None:
    """``(transposed, units, hidden)`` when the two parameters form a bank, else ``None``."""
    e = gu.shape[0]
    if down.shape[0] != e:
        return None
    if gu.shape[1] == 2 * down.shape[2] and down.shape[1] == gu.shape[2]:
        return False, down.shape[2], gu.shape[2]
    if gu.shape[2] == 2 * down.shape[1] and down.shape[2] == gu.shape[1]:
        return True, down.shape[1], gu.shape[1]
    return None


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
            shape = _bank_shape(gu, down)
            if shape is None:
                left[path] = (
                    f"expert bank {type(m).__name__} with {gu_name} {tuple(gu.shape)} and "
                    f"{down_name} {tuple(down.shape)}: neither [E, 2I, H] and [E, H, I] nor "
                    f"[E, H, 2I] and [E, I, H]"
                )
                continue
            transposed, units, hidden = shape
            layout = _CHECKED.get(m, False)
            if check and m not in _CHECKED and gu.device.type != "meta":
                layout = _expert_layout(m, gu_name, down_name, gu.shape[0], units, hidden)
                _CHECKED[m] = layout
            if isinstance(layout, str):
                if check:
                    left[path] = layout
                    continue
                layout = False
            interleaved = layout
            found.append(
                ExpertBankSpec(
                    path, m, gu_name, down_name, gu.shape[0], units, transposed, interleaved
                )
            )
    return found, left


def _expert_layout(
    m: nn.Module, gu_name: str, down_name: str, experts: int, units: int, hidden: int
) -> bool | str:
    """Whether the bank interleaves gate and up (``False``: halves), or why neither layout
    holds. A layout holds when zeroing unit ``i``'s gate and up entries of every expert, and
    then its down entries too, gives the same output (the unit contributes nothing either
    way); the wrong layout zeroes half of two different units and changes it."""
    transposed = _bank_shape(m._parameters[gu_name], m._parameters[down_name])[0]  # type: ignore[index]
    i = units // 2
    for interleaved in (False, True):
        probe = copy.deepcopy(m).float().eval()
        gu, down = probe._parameters[gu_name], probe._parameters[down_name]
        pair = [2 * i, 2 * i + 1] if interleaved else [i, units + i]
        try:
            with torch.no_grad():
                gu.index_fill_(2 if transposed else 1, torch.tensor(pair), 0.0)
                bias = probe._parameters.get(f"{gu_name}_bias")
                if bias is not None:
                    bias[:, pair] = 0
                a = _run_bank(probe, experts, hidden)
                down.index_fill_(1 if transposed else 2, torch.tensor([i]), 0.0)
                b = _run_bank(probe, experts, hidden)
        except Exception as e:
            return f"expert bank {type(m).__name__} could not be checked ({type(e).__name__})"
        if isinstance(a, torch.Tensor) and torch.equal(a, b) and a.abs().sum() > 0:
            return interleaved
    return (
        f"{type(m).__name__}'s {gu_name} pairs gate and up units neither as halves nor "
        "interleaved, as far as nnslim can check: its units are kept"
    )


def _run_bank(probe: nn.Module, experts: int, hidden: int) -> Any:
    """The bank's forward on 2 tokens per expert: ``(x, expert index, weight)`` as most
    banks take it, or ``x`` alone, pre-sorted per expert (Llama 4)."""
    x = torch.randn(2 * experts, hidden, generator=torch.Generator().manual_seed(0))
    try:
        idx = torch.arange(2 * experts)[:, None] % experts
        return probe(x, idx, torch.ones(2 * experts, 1))
    except TypeError:
        return probe(x)
