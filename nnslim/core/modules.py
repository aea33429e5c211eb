"""Small helpers about modules that every transform needs."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .snapshot import rollback_enabled

__all__ = ["is_hf_conv1d", "is_linear", "linear_weight", "replace_module", "set_module"]


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def is_linear(m: nn.Module) -> bool:
    """An exact ``nn.Linear`` or a Hugging Face ``Conv1D``."""
    return type(m) is nn.Linear or is_hf_conv1d(m)


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or Hugging Face ``Conv1D``."""
    return m.weight.t() if is_hf_conv1d(m) else m.weight


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``model``."""
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` for good (not a trial that may be undone).

    Inside :func:`~nnslim.core.snapshot.no_rollback` the old module's weights that the model
    no longer uses are released at once (each such tensor is emptied), so that a
    transform never holds a layer's old and new weights for longer than the replacement itself.
    """
    old = model.get_submodule(path)
    set_module(model, path, new)
    if rollback_enabled() or old is new:
        return
    live = {
        t.untyped_storage().data_ptr()
        for t in itertools.chain(model.parameters(), model.buffers())
        if t.device.type != "meta" and t.numel()
    }
    for m in old.modules():
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is None or t.device.type == "meta" or not t.numel():
                continue
            if t.untyped_storage().data_ptr() not in live:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
