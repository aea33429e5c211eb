"""``Prune``: remove channels, heads and hidden units for real, dependency-graph aware."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..core.describe import shape_of
from ..core.report import Report
from ..core.select import normalize_selector
from ..core.transform import Context, Transform
from ..core.validate import check_choice, check_fraction, check_int
from ..graph.trace import ROOT_TYPES, preserve_modes, trace

__all__ = ["Prune"]

IMPORTANCES = ("l1", "l2", "random")
SCOPES = ("local", "global")


@dataclass(frozen=True)
class Prune(Transform):
    """Structured pruning: remove whole channels (and the layers coupled to them).

    Exactly one of ``ratio``, ``macs`` and ``params`` sets how much to remove.

    Args:
        ratio: fraction of output channels removed from each selected layer's group, in
            ``[0, 1)``. With ``select`` as a mapping, the values are per-module ratios.
        macs: target MACs as a fraction of the original, in ``(0, 1]``.
        params: target parameter count as a fraction of the original, in ``(0, 1]``.
        importance: how channels are ranked: ``"l2"`` or ``"l1"`` (weight magnitude of the
            whole coupled group), ``"random"`` (a baseline).
        scope: ``"local"`` (the same ratio in every group) or ``"global"`` (rank channels
            across all groups).
        select: layers whose output channels may be pruned (names, ``re:`` patterns, types,
            or a mapping to per-layer ratios). Default: every Conv/Linear except the layers
            that produce the model output.
        exclude: layers never pruned.
        round_to: keep channel counts multiples of this (8 suits fast kernels).
        steps: prune in this many equal steps (iterative pruning).

    Example:
        >>> import torch, nnslim
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(16, 8, 3))
        >>> report = nnslim.Prune(ratio=0.5).apply(model, torch.randn(1, 3, 16, 16))
        >>> model[0].out_channels, model[2].in_channels, model[2].out_channels
        (8, 8, 8)
    """

    ratio: float | None = None
    macs: float | None = None
    params: float | None = None
    importance: str = "l2"
    scope: str = "local"
    select: Any = None
    exclude: Any = None
    round_to: int | None = None
    steps: int = 1

    _copy_on_snapshot = False

    def __post_init__(self) -> None:
        given = [n for n in ("ratio", "macs", "params") if getattr(self, n) is not None]
        sel = normalize_selector(self.select)
        per_module = sel is not None and all(v is not None for _, v in sel)
        if len(given) > 1 or (not given and not per_module):
            raise ValueError(
                f"Prune: give exactly one of ratio=, macs=, params= (got {given or 'none'}), or "
                f"per-module ratios as select={{name: ratio}}; for example Prune(ratio=0.3) or "
                f"Prune(macs=0.5)."
            )
        if self.ratio is not None:
            check_fraction("Prune", "ratio", self.ratio)
        for name in ("macs", "params"):
            v = getattr(self, name)
            if v is not None:
                check_fraction("Prune", name, v, low_inclusive=False, high_inclusive=True)
        check_choice("Prune", "importance", self.importance, IMPORTANCES)
        check_choice("Prune", "scope", self.scope, SCOPES)
        if self.round_to is not None:
            check_int("Prune", "round_to", self.round_to, low=1)
        check_int("Prune", "steps", self.steps, low=1, high=1000)
        if sel is not None:
            for key, v in sel:
                if v is not None:
                    check_fraction("Prune", f"select[{key!r}]", v)
        normalize_selector(self.exclude, "exclude")

    # ------------------------------------------------------------------------------------------
    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        inputs = ctx.require_inputs("Prune", "to trace the dependency graph")
        graph = trace(model, inputs)
        outputs = set(graph.output_layers())
        named = dict(model.named_modules())
        eligible = [(p, named[p]) for p in graph.layers() if isinstance(named[p], ROOT_TYPES)]
        explicit = self.select is not None
        chosen = dict(self.resolve(model, self.select, self.exclude, eligible=eligible))
        for p in list(chosen):
            if p in outputs and not explicit:
                del chosen[p]
        for p, _ in eligible:
            if p in outputs and p not in chosen:
                report.skipped(p, "produces the model output (its channels are the output's)")
            elif p not in chosen:
                report.skipped(p, "not selected" if explicit else "excluded")
        if not chosen:
            raise ValueError(
                "Prune: no layer left to prune after select/exclude; every candidate produces "
                "the model output or was excluded."
            )
        before = {p: (shape_of(m), _shapes(m)) for p, m in model.named_modules()}
        if self.macs is None and self.params is None:
            ratio = self.ratio or 0.0
            self._prune(model, inputs, chosen, ratio)
        else:
            self._prune_to_target(model, inputs, chosen, report)
        for p, m in model.named_modules():
            if p in before and before[p][1] != _shapes(m):
                report.changed(p, "pruned", before[p][0], shape_of(m))

    def _pruner(self, model: nn.Module, inputs: Any, chosen: dict[str, Any], ratio: float) -> Any:
        named = dict(model.named_modules())
        ignored = [m for p, m in named.items() if isinstance(m, ROOT_TYPES) and p not in chosen]
        per_layer = {named[p]: v for p, v in chosen.items() if v is not None}
        imp = {
            "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "random": lambda: tp.importance.RandomImportance(),
        }[self.importance]()

        def forward_fn(m: nn.Module, _: Any) -> Any:
            return inputs.call(m)

        from ..core.inputs import output_tensors

        return tp.pruner.MetaPruner(
            model,
            example_inputs=inputs.as_tuple(),
            importance=imp,
            global_pruning=self.scope == "global",
            pruning_ratio=ratio,
            pruning_ratio_dict=per_layer or None,
            iterative_steps=self.steps,
            ignored_layers=ignored,
            round_to=self.round_to,
            forward_fn=forward_fn,
            output_transform=lambda out: [t for t in output_tensors(out) if t.grad_fn is not None],
        )

    def _prune(self, model: nn.Module, inputs: Any, chosen: dict[str, Any], ratio: float) -> None:
        import warnings

        with preserve_modes(model), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = self._pruner(model, inputs, chosen, ratio)
            for _ in range(self.steps):
                pruner.step()

    def _prune_to_target(
        self, model: nn.Module, inputs: Any, chosen: dict[str, Any], report: Report
    ) -> None:
        from ..profiling.profiler import profile

        metric = "macs" if self.macs is not None else "params"
        target = float(self.macs if self.macs is not None else self.params)  # type: ignore[arg-type]
        base = getattr(profile(model, inputs, memory=False), metric)
        goal = target * base
        lo, hi, best = 0.0, 0.99, None
        for _ in range(12):
            mid = (lo + hi) / 2
            trial = copy.deepcopy(model)
            names = dict(trial.named_modules())
            self._prune(trial, inputs, {p: chosen[p] for p in chosen if p in names}, mid)
            value = getattr(profile(trial, inputs, memory=False), metric)
            if value <= goal:
                best, hi = mid, mid
            else:
                lo = mid
            if best is not None and abs(value - goal) / base < 0.005:
                break
        if best is None:
            best = hi
            report.note(
                f"target {metric}={target} not reachable with the selected layers; pruned at "
                f"ratio {best:.3f}"
            )
        self._prune(model, inputs, chosen, best)
        report.note(f"ratio {best:.3f} reaches {metric} <= {target} of the original")


def _shapes(m: nn.Module) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in m._parameters.values() if t is not None)
