"""Importance: how much each weight matters, the ranking every pruning decision follows.

An :class:`Importance` scores every element of a weight tensor (higher = keep). Structured
pruning sums the scores of a channel across every layer coupled to it (the channel's group);
unstructured and N:M sparsity rank the scores directly. Built-ins:

* :class:`Magnitude` (``"l1"``, ``"l2"``): ``|w|^p``;
* :class:`Taylor` (``"taylor"``): ``|w * dL/dw|``, first-order Taylor, from calibration batches;
* :class:`Wanda` (``"wanda"``): ``|w| * ||x_j||``, weight times input activation norm
  (Sun et al. 2023), from calibration batches;
* :class:`SparseGPT` (``"sparsegpt"``): unstructured and N:M sparsity with the weights kept
  updated to reconstruct each layer's output (Frantar & Alistarh 2023), from calibration
  batches;
* :class:`Random` (``"random"``): a baseline.

Your own: subclass :class:`Importance` as a frozen dataclass and implement :meth:`score`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..base.config import Config
from ..base.modules import is_hf_conv1d
from ..base.validate import check_choice, check_fraction, check_int
from ..modules.quantized import GROUP_SIZES

__all__ = [
    "IMPORTANCE_NAMES",
    "Importance",
    "Magnitude",
    "Random",
    "SparseGPT",
    "Taylor",
    "Wanda",
    "as_importance",
]


@dataclass(frozen=True)
class Importance(Config, abc.ABC):
    """Scores for the elements of a weight.

    Attributes:
        needs_grad: the score uses gradients from calibration batches.
        needs_activations: the score uses input activation norms from calibration batches.
        needs_hessian: not a score but a weight update from each layer's input Hessian
            (:class:`SparseGPT`).
    """

    needs_grad: ClassVar[bool] = False
    needs_activations: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False

    @abc.abstractmethod
    def score(
        self,
        weight: torch.Tensor,
        *,
        module: nn.Module,
        grad: torch.Tensor | None = None,
        input_norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores with the shape of ``weight`` (non-negative; higher = more important).

        Args:
            weight: the weight (out, in, ...) for Linear/convolutions, (in, out) for Hugging
                Face ``Conv1D``, 1-D for norms.
            module: the layer holding it.
            grad: the calibration-loss gradient of ``weight`` (when ``needs_grad``).
            input_norm: ``||x_j||`` per input channel of ``module`` (when
                ``needs_activations``), ``None`` for layers without one (norms).
        """


@dataclass(frozen=True)
class Magnitude(Importance):
    """``|w|^p``.

    Args:
        p: the norm degree, 1 or 2.
    """

    p: int = 2

    def __post_init__(self) -> None:
        check_int("Magnitude", "p", self.p, low=1, high=2)

    def score(self, weight, *, module, grad=None, input_norm=None):
        return weight.detach().abs().float().pow(self.p)


@dataclass(frozen=True)
class Taylor(Importance):
    """``|w * g|``: the first-order estimate of the loss change when ``w`` is removed.

    The loss is cross-entropy against the calibration labels when batches carry them (``(x, y)``
    loaders), otherwise against the model's own predictions.
    """

    needs_grad: ClassVar[bool] = True

    def score(self, weight, *, module, grad=None, input_norm=None):
        if grad is None:
            return weight.detach().abs().float()  # layers without a gradient (frozen)
        return (weight.detach().float() * grad.float()).abs()


@dataclass(frozen=True)
class Wanda(Importance):
    """``|w_ij| * ||x_j||``: weight magnitude times the norm of its input (Wanda)."""

    needs_activations: ClassVar[bool] = True

    def score(self, weight, *, module, grad=None, input_norm=None):
        w = weight.detach().abs().float()
        if input_norm is None or w.dim() < 2:
            return w
        n = input_norm.to(w.device, torch.float32)
        if is_hf_conv1d(module):  # (in, out)
            return w * n[:, None]
        shape = [1, -1] + [1] * (w.dim() - 2)
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
            # weight (out, in/groups, ...): input channel of row o, column j is g(o)*in_g + j
            groups = module.groups
            out_g = w.shape[0] // groups
            per = n.reshape(groups, -1).repeat_interleave(out_g, 0)  # (out, in/groups)
            return w * per.reshape(w.shape[0], w.shape[1], *([1] * (w.dim() - 2)))
        return w * n.reshape(shape)


@dataclass(frozen=True)
class Random(Importance):
    """Random scores (a baseline), reproducible with ``seed``."""

    seed: int = 0

    def score(self, weight, *, module, grad=None, input_norm=None):
        g = torch.Generator().manual_seed(self.seed + weight.numel())
        return torch.rand(weight.shape, generator=g).to(weight.device)


@dataclass(frozen=True)
class SparseGPT(Wanda):
    """SparseGPT (Frantar & Alistarh 2023): weights pruned by their optimal-brain-surgeon
    saliency ``w^2 / [H^-1]_jj^2`` and the weights kept updated to reconstruct each layer's
    output on its calibration inputs (``H = X^T X``), layer by layer, every block calibrated
    on the outputs of the blocks already pruned. For ``Prune(structure="unstructured" or
    "N:M")`` on Linear layers (and Hugging Face ``Conv1D``); needs calibration.

    Where a plain ranking is asked for (OWL's outlier ratios) it scores like :class:`Wanda`.

    Args:
        block_size: columns per lazy-update (and unstructured mask-selection) block.
        damp: fraction of the Hessian's mean diagonal added for numerical stability.
        true_sequential: inside each block, layer group after layer group in the order the
            block runs them (q/k/v, then o, then gate/up, then down), each calibrated on the
            outputs of the groups already pruned; ``False``: all on the block's dense inputs.
        int4_group_size: also quantize the weights kept to int4 in the same pass (32, 64 or
            128 inputs per group, asymmetric with integer zero points, so every pruned weight
            is exactly the zero point's code): the layers become
            :class:`~nnslim.modules.quantized.Int4Linear`. ``None``: float weights and masks.
    """

    needs_hessian: ClassVar[bool] = True
    block_size: int = 128
    damp: float = 0.01
    true_sequential: bool = True
    int4_group_size: int | None = None

    def __post_init__(self) -> None:
        check_int("SparseGPT", "block_size", self.block_size, low=1)
        check_fraction("SparseGPT", "damp", self.damp, high_inclusive=True)
        if not isinstance(self.true_sequential, bool):
            raise TypeError("SparseGPT(true_sequential=...): expected a bool.")
        if self.int4_group_size is not None:
            check_choice("SparseGPT", "int4_group_size", self.int4_group_size, GROUP_SIZES)


IMPORTANCE_NAMES = ("l1", "l2", "taylor", "wanda", "sparsegpt", "random")


def as_importance(value: Any, owner: str = "Prune") -> Importance:
    """A name or an :class:`Importance` instance as an :class:`Importance`.

    Raises:
        ValueError: unknown name. TypeError: wrong type.
    """
    if isinstance(value, Importance):
        return value
    if isinstance(value, str):
        check_choice(owner, "importance", value, IMPORTANCE_NAMES)
        return {
            "l1": Magnitude(p=1),
            "l2": Magnitude(p=2),
            "taylor": Taylor(),
            "wanda": Wanda(),
            "sparsegpt": SparseGPT(),
            "random": Random(),
        }[value]
    raise TypeError(
        f"{owner}(importance=...): expected one of {IMPORTANCE_NAMES} or an nnslim.Importance "
        f"instance, got {type(value).__name__}."
    )
