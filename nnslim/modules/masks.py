"""Sparsity masks: a ``weight_mask`` buffer beside the weight it zeroes.

Unstructured and N:M pruning keep the dense weight with its pruned entries set to zero and store
the mask as a boolean buffer named ``weight_mask`` on the same module, so it is saved, reloaded
and counted. :func:`apply_masks` re-zeroes the masked weights (the Trainer calls it after each
optimizer step so pruned weights stay pruned).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MASK_NAME", "apply_masks", "cut_mask", "masked_modules"]

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


def cut_mask(module: nn.Module, side: str, gone: list[int]) -> None:
    """After ``module``'s weight lost output (``side="out"``) or input (``"in"``) channels
    ``gone`` (torch-pruning shrinks parameters only), cut its ``weight_mask`` the same way.
    A mask whose size already matches (a grouped convolution's inputs) is left."""
    mask = module._buffers.get(MASK_NAME)
    w = getattr(module, "weight", None)
    if not isinstance(mask, torch.Tensor) or not isinstance(w, torch.Tensor):
        return
    dim = 0 if side == "out" else 1
    if type(module).__name__ == "Conv1D" or isinstance(module, nn.modules.conv._ConvTransposeNd):
        dim = 1 - dim  # Hugging Face Conv1D stores (in, out); transposed convs (in, out, ...)
    if mask.shape[dim] == w.shape[dim]:
        return
    keep = torch.ones(mask.shape[dim], dtype=torch.bool)
    keep[sorted(set(gone))] = False
    module._buffers[MASK_NAME] = mask.index_select(dim, keep.nonzero().flatten().to(mask.device))
