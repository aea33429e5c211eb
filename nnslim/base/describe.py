"""Short human descriptions of modules for reports (``Conv2d 64->128 k3``)."""

from __future__ import annotations

from torch import nn

__all__ = ["shape_of"]


def shape_of(m: nn.Module) -> str:
    """A short description of a module's shape."""
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(str(s) for s in m.kernel_size)
        g = f" g{m.groups}" if m.groups != 1 else ""
        return f"{type(m).__name__} {m.in_channels}->{m.out_channels} k{k}{g}"
    if isinstance(m, nn.Linear):
        return f"Linear {m.in_features}->{m.out_features}"
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return f"{type(m).__name__} {m.num_features}"
    if isinstance(m, nn.LayerNorm):
        return f"LayerNorm {tuple(m.normalized_shape)}"
    if isinstance(m, nn.Embedding):
        return f"Embedding {m.num_embeddings}x{m.embedding_dim}"
    describe = getattr(m, "nnslim_describe", None)
    if callable(describe):
        return str(describe())
    w = getattr(m, "weight", None)
    if w is not None and hasattr(w, "shape"):
        return f"{type(m).__name__} {tuple(w.shape)}"
    return type(m).__name__
