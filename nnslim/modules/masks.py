"""Sparsity masks: a ``weight_mask`` buffer beside the weight it zeroes.

Unstructured and N:M pruning keep the dense weight with its pruned entries set to zero and store
the mask as a boolean buffer named ``weight_mask`` on the same module, so it is saved, reloaded
and counted. :func:`apply_masks` re-zeroes the masked weights (the Trainer calls it after each
optimizer step so pruned weights stay pruned).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "MASK_NAME",
    "apply_masks",
    "cut_mask",
    "masked_modules",
    "not_recording_cuts",
    "recording_cuts",
]

MASK_NAME = "weight_mask"

#: the open :func:`recording_cuts` records (innermost last)
_RECORDS: list[dict[int, tuple[nn.Module, torch.Tensor]]] = []


@contextlib.contextmanager
def recording_cuts() -> Iterator[dict[int, tuple[nn.Module, torch.Tensor]]]:
    """Record, while open, which of its original output rows each layer keeps as channel
    pruning cuts it (every cut goes through :func:`cut_mask`): ``id(layer) -> (layer, kept
    original row indices)``. A refit of a pruned layer against the unpruned one needs them."""
    record: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


@contextlib.contextmanager
def not_recording_cuts() -> Iterator[None]:
    """Suspend :func:`recording_cuts` (cuts made meanwhile are on trial copies of a model)."""
    saved = _RECORDS[:]
    _RECORDS.clear()
    try:
        yield
    finally:
        _RECORDS[:] = saved


def _record_rows(module: nn.Module, gone: list[int]) -> None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    dim = 1 if type(module).__name__ == "Conv1D" else 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        dim = 1
    removed = sorted(set(gone))
    for record in _RECORDS:
        had = record.get(id(module))
        rows = (
            had[1]
            if had is not None and had[0] is module
            else torch.arange(w.shape[dim] + len(removed))
        )
        keep = torch.ones(rows.numel(), dtype=torch.bool)
        keep[removed] = False
        record[id(module)] = (module, rows[keep])


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
    A mask whose size already matches (a grouped convolution's inputs) is left. Output cuts
    are also recorded while :func:`recording_cuts` is open."""
    if side == "out" and _RECORDS:
        _record_rows(module, gone)
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
