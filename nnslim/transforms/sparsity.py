"""Unstructured and N:M sparsity: zero the least important weights, keep a mask."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..base.modules import is_hf_conv1d, weight_rows
from ..modules.masks import MASK_NAME
from .importance import Importance, Wanda

__all__ = ["PATTERN_RE", "nm_mask", "parse_pattern", "unstructured_masks"]

PATTERN_RE = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(structure: str) -> tuple[int, int] | None:
    """``"2:4" -> (2, 4)``; ``None`` for other structures."""
    m = PATTERN_RE.match(structure)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def _rows(weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """View scores as (out, rest) rows; HF Conv1D stores (in, out)."""
    return weight_rows(weight, module)


def _unrows(rows: torch.Tensor, like: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if is_hf_conv1d(module):
        return rows.t().contiguous()
    return rows.reshape(like.shape)


def existing_mask(module: nn.Module) -> torch.Tensor | None:
    m = module._buffers.get(MASK_NAME)
    return m if isinstance(m, torch.Tensor) else None


def _scores_with_prior(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    prior = existing_mask(module)
    if prior is not None:
        scores = scores.masked_fill(~prior.to(torch.bool), -1.0)  # already pruned: first to go
    return scores


def unstructured_masks(
    layers: dict[str, nn.Module],
    scores: dict[str, torch.Tensor],
    ratios: dict[str, float],
    importance: Importance,
    global_scope: bool,
    ratio: float,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing the lowest-scoring fraction of each layer's weights.

    Wanda ranks within each output row (as in the paper); other importances within the layer,
    or across all layers with ``global_scope``.
    """
    masks: dict[str, torch.Tensor] = {}
    if global_scope:
        flat = torch.cat([_scores_with_prior(layers[p], s).flatten() for p, s in scores.items()])
        k = int(ratio * flat.numel())
        threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
        for p, s in scores.items():
            s = _scores_with_prior(layers[p], s)
            masks[p] = s > threshold
        return masks
    for p, s in scores.items():
        m = layers[p]
        s = _scores_with_prior(m, s)
        r = ratios[p]
        if isinstance(importance, Wanda):
            rows = _rows(s, m)
            k = int(r * rows.shape[1])
            keep = torch.ones_like(rows, dtype=torch.bool)
            if k > 0:
                idx = rows.argsort(dim=1)[:, :k]
                keep.scatter_(1, idx, False)
            masks[p] = _unrows(keep, s, m)
        else:
            k = int(r * s.numel())
            keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
            if k > 0:
                keep[s.flatten().argsort()[:k]] = False
            masks[p] = keep.reshape(s.shape)
    return masks


def nm_mask(module: nn.Module, scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive weights along the input dimension."""
    s = _scores_with_prior(module, scores)
    rows = _rows(s, module)
    groups = rows.reshape(rows.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return _unrows(keep.reshape(rows.shape), s, module)
