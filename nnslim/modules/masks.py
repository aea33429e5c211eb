"""Sparsity masks: a ``weight_mask`` buffer beside the weight it zeroes.

Unstructured and N:M pruning keep the dense weight with its pruned entries set to zero and store
the mask as a boolean buffer named ``weight_mask`` on the same module, so it is saved, reloaded
and counted. :func:`apply_masks` re-zeroes the masked weights (the Trainer calls it after each
optimizer step so pruned weights stay pruned).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MASK_NAME", "apply_masks", "masked_modules"]

MASK_NAME = "weight_mask"


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module holding a ``weight_mask``."""
    return [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m._buffers.get(MASK_NAME), torch.Tensor)
        and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Zero every masked weight in place; returns the number of masked modules."""
    mods = masked_modules(model)
    for _, m in mods:
        m.weight.mul_(m._buffers[MASK_NAME].to(m.weight.dtype))
    return len(mods)
