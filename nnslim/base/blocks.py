"""Repeated blocks: the items of a ``ModuleList``/``Sequential`` (transformer layers, ResNet
stages' blocks). Calibration runs a model block by block, streaming compresses a checkpoint
block by block, and ShareWeights ties blocks of one structure: one notion of "block" for
all three."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["block_lists", "block_of", "layer_stack"]

_LISTS = (nn.ModuleList, nn.Sequential)


def block_lists(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, container)`` for every ``ModuleList``/``Sequential`` in ``model``."""
    for path, m in model.named_modules():
        if isinstance(m, _LISTS):
            yield path, m


def block_of(path: str, named: dict[str, nn.Module]) -> str | None:
    """The repeated block holding ``path``: the outermost prefix ``X.N`` that is an item of a
    ModuleList/Sequential (``model.layers.3`` for ``model.layers.3.mlp.up_proj``)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            container = ".".join(parts[:i])
            if isinstance(named.get(container), _LISTS) and i < len(parts) - 1:
                return ".".join(parts[: i + 1])
    return None


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``ModuleList`` of modules of one class (a transformer's layers), or
    ``None``."""
    best: tuple[str, nn.ModuleList] | None = None
    for path, m in block_lists(model):
        if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (path, m)
    return best
