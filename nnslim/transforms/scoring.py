"""Channel scores for torch-pruning groups from nnslim's element-wise importances.

:class:`GroupScorer` plugs an :class:`~nnslim.transforms.importance.Importance` into
torch-pruning's pruners: for every layer coupled in a group it sums the element scores of the
channel's slice of the weight, maps them to the root channels, averages across layers and
normalises by the mean (so that groups are comparable for global ranking).
"""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..base.modules import is_hf_conv1d
from ..core.calibrate import LayerStats

__all__ = ["GroupScorer", "channel_scores"]


def _as_out_major(m: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Element scores with output channels first: (out, in_per_group, ...)."""
    if is_hf_conv1d(m):
        return s.t()
    if isinstance(m, nn.Embedding):
        return s.t()  # (dim, num): the embedding dim is what gets pruned
    if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
        return s.transpose(0, 1)
    return s


def channel_scores(m: nn.Module, s: torch.Tensor, is_out: bool, idxs: list[int]) -> torch.Tensor:
    """Scores of the channels ``idxs`` of layer ``m`` given its element scores ``s``."""
    if s.dim() == 1:
        return s[idxs]
    w = _as_out_major(m, s)
    if is_out:
        return w[idxs].flatten(1).sum(1)
    if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
        groups = m.groups
        out_g = w.shape[0] // groups
        per = w.reshape(groups, out_g, w.shape[1], -1).sum(dim=(1, 3))  # (groups, in_g)
        return per.reshape(-1)[idxs]
    return w.transpose(0, 1).flatten(1).sum(1)[idxs]


class GroupScorer(tp.importance.Importance):
    """A torch-pruning importance backed by an nnslim element-wise importance.

    Args:
        importance: the element-wise importance.
        stats: calibration statistics by layer (``id(module)`` -> stats), when needed.
        dg: the dependency graph (to tell output-channel from input-channel pruning).
    """

    def __init__(self, importance: Any, stats: dict[int, LayerStats], dg: Any) -> None:
        self.importance = importance
        self.stats = stats
        self.dg = dg
        self._cache: dict[int, torch.Tensor | None] = {}
        self.last_group: Any = None

    def reset(self) -> None:
        """Forget cached element scores (call after the model changed)."""
        self._cache.clear()

    def element_scores(self, m: Any) -> torch.Tensor | None:
        key = id(m)
        if key not in self._cache:
            w = getattr(m, "weight", None) if isinstance(m, nn.Module) else None
            if not isinstance(w, torch.Tensor) or w.device.type == "meta":
                self._cache[key] = None
            else:
                st = self.stats.get(key)
                self._cache[key] = self.importance.score(
                    w,
                    module=m,
                    grad=st.grad if st is not None else None,
                    input_norm=st.input_norm if st is not None else None,
                )
        return self._cache[key]

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        self.last_group = group  # the group torch-pruning is working on (to name it on error)
        parts: list[torch.Tensor] = []
        roots: list[list[int]] = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            root_idxs = group[i].root_idxs
            if not idxs or any(r is None for r in root_idxs):
                continue
            s = self.element_scores(layer)
            if s is None:
                continue
            is_out = self.dg.is_out_channel_pruning_fn(dep.pruning_fn)
            if not is_out and not self.dg.is_in_channel_pruning_fn(dep.pruning_fn):
                continue
            try:
                parts.append(channel_scores(layer, s, is_out, list(idxs)).float())
            except (IndexError, RuntimeError):
                continue  # a layout this scorer does not know: leave it to the others
            roots.append(list(root_idxs))
        if not parts:
            return None
        n = max(max(r) for r in roots) + 1
        total = torch.zeros(n, dtype=torch.float32, device=parts[0].device)
        for p, r in zip(parts, roots):
            total.scatter_add_(0, torch.tensor(r, device=p.device), p.to(total.device))
        total /= len(parts)
        mean = total.mean()
        return total / mean if mean > 0 else total
