"""``nnslim.trace``: the dependency graph of a model, built on torch-pruning's DependencyGraph.

torch-pruning traces the autograd graph of one forward pass and finds the groups of coupled
layers (a convolution's output channels, the BatchNorm after it, the next convolution's input
channels, residual partners...). :class:`Graph` wraps it with what nnslim needs on top: module
paths, the layers whose outputs reach the model output (never pruned by default), and modes and
errors that do not surprise.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..core.inputs import Inputs, as_inputs, output_tensors, run_model

__all__ = ["Graph", "trace"]

#: Layer types whose output channels are the roots of pruning groups.
ROOT_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)


@contextlib.contextmanager
def preserve_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag afterwards (torch-pruning sets eval)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


@dataclass
class Graph:
    """The dependency graph of a model.

    Attributes:
        model: the traced model.
        inputs: the example inputs used.
        dg: torch-pruning's ``DependencyGraph`` (an escape hatch; its API is torch-pruning's).
    """

    model: nn.Module
    inputs: Inputs
    dg: Any
    output_grad_fns: list[Any]

    @property
    def paths(self) -> dict[int, str]:
        return {id(m): p for p, m in self.model.named_modules()}

    def layers(self) -> list[str]:
        """Paths of the traced layers (modules that appear in the graph), in model order."""
        traced = {id(m) for m in self.dg.module2node if isinstance(m, nn.Module)}
        return [p for p, m in self.model.named_modules() if id(m) in traced and p]

    def output_layers(self) -> list[str]:
        """Paths of layers whose output channels reach a model output.

        Pruning those would change the output's shape (the classifier, the LM head, the last
        block of a backbone whose features are the output).
        """
        paths = self.paths
        by_fn = {n.grad_fn: n for n in self.dg.module2node.values() if n.grad_fn is not None}
        stack = [by_fn[f] for f in self.output_grad_fns if f in by_fn]
        found: list[str] = []
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            m = node.module
            if isinstance(m, ROOT_TYPES) or isinstance(m, nn.Embedding):
                if id(m) in paths:
                    found.append(paths[id(m)])
                continue
            stack.extend(node.inputs)
        order = {p: i for i, p in enumerate(paths.values())}
        return sorted(set(found), key=lambda p: order.get(p, 0))


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignored: list[nn.Module] | None = None,
    customized_pruners: dict[Any, Any] | None = None,
    unwrapped_parameters: dict[nn.Parameter, int] | None = None,
) -> Graph:
    """Trace ``model`` on ``example_inputs`` and build its dependency graph.

    Every tensor in the output (a tensor, a tuple, a dict, a Hugging Face ``ModelOutput``) is
    traced, so heads such as BERT's pooler are part of the graph. The model's train/eval flags
    are preserved.

    Args:
        model: any ``nn.Module``.
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors.
        ignored: modules to leave out of the trace.
        customized_pruners: torch-pruning pruners for custom layer types.
        unwrapped_parameters: parameters used outside modules, with their pruning dim.

    Returns:
        The :class:`Graph`.

    Raises:
        ValueError: if the forward fails on the inputs.
    """
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TypeError("trace: example_inputs is required.")
    run_model(model, inputs)
    dg = tp.DependencyGraph()
    outputs: list[torch.Tensor] = []

    def output_transform(out: Any) -> list[torch.Tensor]:
        outputs[:] = [t for t in output_tensors(out) if t.grad_fn is not None]
        return outputs

    def forward_fn(m: nn.Module, _: Any) -> Any:
        return inputs.call(m)

    with preserve_modes(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg.build_dependency(
            model,
            example_inputs=inputs.as_tuple(),
            forward_fn=forward_fn,
            output_transform=output_transform,
            ignored_layers=ignored,
            customized_pruners=customized_pruners,
            unwrapped_parameters=unwrapped_parameters,
            verbose=False,
        )
    return Graph(model, inputs, dg, [t.grad_fn for t in outputs])
