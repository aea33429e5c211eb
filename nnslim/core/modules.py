"""Small helpers about modules that every transform needs."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_hf_conv1d", "is_linear", "linear_weight", "set_module"]


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
