"""Statistics from calibration batches: input activation norms, Gram matrices, gradients.

Data-aware transforms (Wanda and Taylor importance, GPTQ, activation-aware factorization) need
statistics of what flows through each layer. :func:`collect` runs the calibration batches once
and gathers, per selected layer, what was asked for. The model's parameters, gradients and modes
are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import Inputs, first_tensor

__all__ = ["LayerStats", "collect", "layer_input_dim"]


@dataclass
class LayerStats:
    """Statistics of one layer over the calibration data.

    Attributes:
        sq_sum: per input channel, the sum of squared inputs (``||X_j||^2``).
        gram: ``X^T X`` over all input rows (``in x in``), if requested (Linear-like only).
        grad: gradient of the calibration loss with respect to the weight, summed over batches.
        rows: number of input rows (tokens, or pixels for convolutions) seen.
    """

    sq_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_norm(self) -> torch.Tensor | None:
        """``||X_j||_2`` per input channel."""
        return None if self.sq_sum is None else self.sq_sum.sqrt()


def _is_conv1d_hf(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def layer_input_dim(m: nn.Module) -> int | None:
    """The input-channel count of a Linear, convolution or Hugging Face Conv1D."""
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels
    if _is_conv1d_hf(m):
        return m.weight.shape[0]
    return None


def _rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of input channels: ``(rows, in)``."""
    if isinstance(m, nn.modules.conv._ConvNd):
        # (N, C, *spatial) -> (N * spatial, C); channels seen by the conv
        return x.transpose(0, 1).reshape(x.shape[1], -1).t()
    return x.reshape(-1, x.shape[-1])


def calibration_loss(output: Any, targets: tuple[Any, ...]) -> torch.Tensor:
    """The loss Taylor importance differentiates.

    Cross-entropy against the labels when the batch carried integer labels shaped like the
    output's leading dims; otherwise cross-entropy against the model's own predictions
    (self-labelling), or the mean square of a non-logit output.
    """
    out = first_tensor(output)
    if out is None:
        raise ValueError("the model output holds no tensor to compute a calibration loss from")
    out = out.float()
    y = targets[0] if targets and isinstance(targets[0], torch.Tensor) else None
    if out.dim() >= 2 and out.shape[-1] > 1:
        logits = out.reshape(-1, out.shape[-1])
        if y is not None and not y.is_floating_point() and y.numel() == logits.shape[0]:
            labels = y.reshape(-1).to(logits.device)
        else:
            labels = logits.detach().argmax(-1)
        return F.cross_entropy(logits, labels)
    return out.pow(2).mean()


def collect(
    model: nn.Module,
    batches: Iterable[Inputs],
    layers: dict[str, nn.Module],
    *,
    norms: bool = False,
    gram: bool = False,
    grads: bool = False,
) -> dict[str, LayerStats]:
    """Run the calibration batches and gather statistics for ``layers`` (path -> module).

    Args:
        model: the model (left unchanged: its ``.grad`` fields and modes are restored).
        batches: calibration inputs.
        layers: the layers to watch.
        norms: per-input-channel sums of squares (Wanda).
        gram: ``X^T X`` (GPTQ, activation-aware factorization).
        grads: weight gradients of :func:`calibration_loss` (Taylor).
    """
    stats = {p: LayerStats() for p in layers}
    handles = []

    def make_hook(path: str, m: nn.Module):
        def hook(_mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            rows = _rows(m, x.detach()).float()
            st = stats[path]
            st.rows += rows.shape[0]
            if norms:
                sq = rows.pow(2).sum(0)
                st.sq_sum = sq if st.sq_sum is None else st.sq_sum + sq
            if gram and not isinstance(m, nn.modules.conv._ConvNd):
                g = rows.t() @ rows
                st.gram = g if st.gram is None else st.gram + g

        return hook

    if norms or gram:
        for path, m in layers.items():
            handles.append(m.register_forward_hook(make_hook(path, m)))
    saved_grads = {id(p): p.grad for p in model.parameters()}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for batch in batches:
            if grads:
                with torch.enable_grad():
                    for p in model.parameters():
                        p.grad = None
                    loss = calibration_loss(batch.call(model), batch.targets)
                    watched = [(p, m.weight) for p, m in layers.items() if m.weight.requires_grad]
                    gs = torch.autograd.grad(loss, [w for _, w in watched], allow_unused=True)
                for (path, _), g in zip(watched, gs):
                    if g is not None:
                        st = stats[path]
                        st.grad = g.detach() if st.grad is None else st.grad + g.detach()
            else:
                with torch.no_grad():
                    batch.call(model)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
        for p in model.parameters():
            p.grad = saved_grads.get(id(p))
    return stats
