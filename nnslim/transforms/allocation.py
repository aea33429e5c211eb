"""Non-uniform sparsity: how much of each layer to prune when the whole model loses ``ratio``.

:class:`OWL` (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): blocks whose weights
carry more outliers of the Wanda metric ``|w| * ||x||`` are pruned less. Per block (a
transformer layer; a layer on its own where there is no repeated block) the outlier ratio is
the fraction of its layers' metric above ``threshold`` times the block's mean; the ratios are
scaled linearly to a range of width ``2 * spread`` around the target and shifted so that their
mean is the target (fewer outliers, more sparsity). The paper's defaults: ``threshold=5``,
``spread=0.08``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base.blocks import block_of
from ..base.config import Config
from ..base.validate import check_fraction
from .importance import Wanda

__all__ = ["OWL", "blocks_of", "owl_ratios"]


@dataclass(frozen=True)
class OWL(Config):
    """Outlier-weighted layerwise sparsity (see the module docstring).

    Args:
        threshold: an entry is an outlier above this multiple of its block's mean metric.
        spread: block sparsities range over ``target - spread .. target + spread``.
    """

    threshold: float = 5.0
    spread: float = 0.08

    def __post_init__(self) -> None:
        check_fraction("OWL", "threshold", self.threshold, high=float("inf"), low_inclusive=False)
        check_fraction("OWL", "spread", self.spread, high=0.5)


def owl_ratios(
    layers: dict[str, nn.Module],
    input_norms: dict[str, torch.Tensor | None],
    blocks: dict[str, str],
    target: float,
    owl: OWL,
) -> tuple[dict[str, float], dict[str, float]]:
    """``(per-layer sparsity, per-block outlier ratio)`` for a model pruned to ``target`` on
    average over its blocks.

    Args:
        layers: path -> layer (its weight is scored).
        input_norms: path -> ``||x_j||`` per input channel (Wanda's statistic).
        blocks: path -> the block it belongs to (the allocation unit).
        target: the mean sparsity over blocks.
        owl: the settings.
    """
    metric = Wanda()
    scores: dict[str, list[torch.Tensor]] = {}
    for p, m in layers.items():
        s = metric.score(m.weight, module=m, input_norm=input_norms.get(p)).flatten()
        scores.setdefault(blocks[p], []).append(s)
    ratio = {}
    for b, parts in scores.items():
        s = torch.cat(parts)  # the block's layers together, against the block's mean (as OWL)
        ratio[b] = float((s > owl.threshold * s.mean()).sum()) / s.numel()
    values = torch.tensor(list(ratio.values()), dtype=torch.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:
        density = {b: 1.0 - target for b in ratio}
    else:
        scaled = {b: (r - lo) / (hi - lo) * 2 * owl.spread for b, r in ratio.items()}
        mean = sum(scaled.values()) / len(scaled)
        density = {b: v - mean + (1.0 - target) for b, v in scaled.items()}
    sparsity = {b: min(max(1.0 - d, 0.0), 0.99) for b, d in density.items()}
    return {p: sparsity[blocks[p]] for p in layers}, ratio


def blocks_of(paths: list[str], named: dict[str, Any]) -> dict[str, str]:
    """path -> its repeated block (the allocation unit), or the path itself."""
    out = {}
    for p in paths:
        b = block_of(p, named)
        out[p] = b if b is not None else p
    return out
