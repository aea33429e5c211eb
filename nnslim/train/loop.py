"""``nnslim.compress``: compress a step, measure, stop when the requirement is met, else adjust
and repeat."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..base.inputs import as_inputs
from ..base.modules import copy_model
from ..base.table import format_table, human
from ..base.validate import check_fraction, check_int
from ..core.target import Target
from ..core.transform import Compose, Transform, check_transform_items
from ..profiling.profiler import profile
from ..transforms.auto import Auto

__all__ = ["CompressionResult", "compress", "schedule"]


def schedule(t: Transform, steps: int) -> list[Transform]:
    """``t`` split into up to ``steps`` smaller transforms that together do what it does:
    :meth:`Transform.split <nnslim.Transform.split>`, checked.

    ``Prune`` with a ratio removes ``1 - (1 - r)^(1/steps)`` per step (the same fraction of what
    is left), with a MACs/params target ``t^(1/steps)`` of the current model per step, and
    unstructured sparsity grows linearly; ``Factorize`` with ``ratio``/``params``/``macs``
    keeps ``x^(1/steps)`` per step (each step truncates the already factorized layers to a lower
    rank); ``ShareWeights`` halves its clusters each step down to ``clusters`` (16 in 3 steps:
    64, 32, 16; each step clusters the layers' current values again); ``Compose`` is split part
    by part; other transforms (Quantize, a fixed rank or energy, your own unless it overrides
    ``split``) are one step.
    """
    parts = t.split(steps)
    if (
        not isinstance(parts, (list, tuple))
        or not parts
        or not all(isinstance(p, Transform) for p in parts)
    ):
        raise TypeError(
            f"{type(t).__name__}.split({steps}) returned {parts!r:.80}; it must return a "
            f"non-empty list of transforms (the default is [self])."
        )
    return list(parts)


def _gentler(t: Transform) -> Transform | None:
    """:meth:`Transform.gentler <nnslim.Transform.gentler>`, checked."""
    g = t.gentler()
    if g is not None and not isinstance(g, Transform):
        raise TypeError(
            f"{type(t).__name__}.gentler() returned {type(g).__name__}; it must return a "
            f"Transform or None."
        )
    return g


@dataclass
class CompressionResult:
    """What :func:`compress` found.

    Attributes:
        model: the most compressed model whose metric stayed within the tolerance (a copy:
            the model given to :func:`compress` is left as it was).
        history: one row per step: transform, metric, MACs, params, bytes, latency, whether it
            was kept.
        baseline: the original model's row.
        reached: whether the target was reached within the tolerance.
        notes: steps that did not apply to the model (and why).
        plan: with :class:`~nnslim.Auto`: the kept round's setting per layer.
        front: with :class:`~nnslim.Auto`: the estimated Pareto front (budget, predicted
            cost and loss, plan; :meth:`AutoTable.front <nnslim.AutoTable.front>`).
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    reached: bool = False
    notes: list[str] = field(default_factory=list)
    plan: dict[str, str] = field(default_factory=dict)
    front: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        rows = [self._row("original", self.baseline)]
        for h in self.history:
            rows.append(self._row(h["transform"], h))
        verdict = "target reached" if self.reached else "target not reached"
        return format_table(
            ["step", "metric", "MACs", "params", "weight bytes", "latency ms", "kept"],
            rows,
            title=verdict,
        )

    def _row(self, name: str, h: dict[str, Any]) -> list[Any]:
        lat = h.get("latency_ms")
        return [
            name,
            f"{h['metric']:.4g}",
            human(h["macs"]),
            human(h["params"]),
            human(h["param_bytes"], "B"),
            "-" if lat is None else f"{lat:.3f}",
            "yes" if h.get("kept", True) else "no",
        ]

    def __str__(self) -> str:
        return "\n".join([self.table(), *(f"note: {n}" for n in self.notes)])

    def plot(self, path: str | None = None, size: str = "params") -> Any:
        """Metric against size (``"params"``, ``"macs"``, ``"param_bytes"``); needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(
                "CompressionResult.plot needs matplotlib: pip install matplotlib"
            ) from e
        points = [self.baseline, *self.history]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p[size] for p in points], [p["metric"] for p in points], "o-")
        for p in points:
            if not p.get("kept", True):
                ax.plot(p[size], p["metric"], "rx")
        ax.set_xlabel(size)
        ax.set_ylabel("metric")
        ax.invert_xaxis()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def compress(
    model: nn.Module,
    transforms: Transform | Sequence[Transform],
    *,
    evaluate: Callable[[nn.Module], float],
    target: dict[str, float] | Target | Sequence[Target] | None = None,
    tolerance: float,
    example_inputs: Any,
    trainer: Any = None,
    train_data: Iterable[Any] | None = None,
    steps: int = 5,
    calibration: Any = None,
    rounds: int = 3,
) -> CompressionResult:
    """Compress in small steps until ``target`` is reached or the metric drops too far.

    Each step applies the next piece of :func:`schedule` (``transforms`` split in ``steps``),
    fine-tunes with ``trainer`` on ``train_data`` when given, evaluates and profiles. A step
    that drops the metric by more than ``tolerance`` is undone and retried once, gentler
    (:meth:`Transform.gentler <nnslim.Transform.gentler>`: half the pruning; a factorization
    keeping halfway to everything; twice the clusters; int8 instead of int4); if that also
    fails, or the step has no gentler form, the loop stops. A transform of your own joins the
    loop through the same two methods, ``split`` and ``gentler``. It stops with success once every
    ``target`` (fractions of the original: ``macs``, ``params``, ``param_bytes`` (or
    ``bytes``), ``latency_ms`` (or ``latency``)) is met.

    Args:
        model: the model (left as it was: each step works on a copy; the result holds the
            best one).
        transforms: a transform or a list (applied in order).
        evaluate: ``model -> metric`` (higher is better), e.g. validation accuracy.
        target: e.g. ``{"macs": 0.5}``: at most half the original MACs; or a
            :class:`~nnslim.Target` (or a list of them), the type ``Prune(macs=...)`` and
            ``Factorize(params=...)`` aim with.
        tolerance: the largest drop of the metric accepted, ``>= 0``.
        example_inputs: inputs for profiling and for transforms that trace.
        trainer: a :class:`~nnslim.Trainer` to fine-tune after each step.
        train_data: batches for the trainer.
        steps: how finely to split each transform.
        calibration: calibration batches for data-aware transforms.
        rounds: with an :class:`~nnslim.Auto`, how many plans to try (see below).

    With an :class:`~nnslim.Auto` (``transforms=nnslim.Auto(target=..., ...)``; ``target``
    defaults to the Auto's), the loop is the search's: the per-layer table is measured once;
    each round allocates the budget, applies the plan to a copy, fine-tunes it if a trainer is
    given, and evaluates it. A round that loses more than ``tolerance`` is taken apart: its
    changed layers, in up to four groups of equal estimated loss, are each put back in turn
    and evaluated, and each group's estimates are multiplied by what putting it back
    recovered over what the estimate said (the estimate's overall scale taken from the
    round); the next round allocates with the corrected estimates. It stops at the first
    round within the tolerance, or when a round's plan repeats one already tried, or after
    ``rounds``. Every round is a row of ``history`` (its plan, predicted cost and loss,
    measured cost and metric); ``plan`` is the kept round's, ``front`` the estimated Pareto
    front over budgets. No round within the tolerance: ``model`` is the original (a copy)
    and ``reached`` false.

    Returns:
        A :class:`CompressionResult`.

    Raises:
        ValueError: for a negative tolerance, an unknown target, or a trainer without data.
    """
    if not callable(evaluate):
        raise TypeError("compress(evaluate=...): expected a callable model -> metric.")
    check_fraction("compress", "tolerance", tolerance, low=0.0, high=float("inf"))
    check_int("compress", "steps", steps, low=1)
    check_int("compress", "rounds", rounds, low=1)
    auto = transforms if isinstance(transforms, Auto) else None
    if auto is not None and auto.target is None:
        raise ValueError("compress(Auto(...)): give the Auto its budget (target=...).")
    if auto is not None and target is None:
        target = auto.target
    if target is None:
        raise ValueError("compress(target=...): give the target, e.g. {'macs': 0.5}.")
    targets = Target.parse("compress", target)
    if trainer is not None and train_data is None:
        raise ValueError("compress: a trainer needs train_data=.")
    pieces = _pieces(transforms, steps)
    inputs = as_inputs(example_inputs)
    latency = any(t.metric == "latency_ms" for t in targets)
    # an Auto timing its budget in an engine is measured there too
    runtime = auto.runtime if auto is not None else "eager"

    def measure(m: nn.Module, metric: float, name: str) -> dict[str, Any]:
        p = profile(m, inputs, latency=latency and runtime == "eager", memory=False)
        s = p.summary()
        if latency and runtime == "onnxruntime":
            from ..io.export import onnxruntime_latency

            s["latency_ms"] = onnxruntime_latency(m, inputs).median_ms
        return {
            "transform": name,
            "metric": metric,
            "macs": s["macs"],
            "params": s["params"],
            "param_bytes": s["param_bytes"],
            "latency_ms": s["latency_ms"],
        }

    base_metric = float(evaluate(model))
    if not math.isfinite(base_metric):
        raise ValueError(
            f"compress: evaluate(model) returned {base_metric} for the model as given; it must "
            f"return a finite metric (higher is better). Nothing was changed."
        )
    baseline = measure(model, base_metric, "original")
    result = CompressionResult(model=copy_model(model), baseline=baseline)

    def reached(row: dict[str, Any]) -> bool:
        return all(t.met(t.measure(row), t.measure(baseline)) for t in targets)

    if reached(baseline):
        result.reached = True
        return result
    if auto is not None:
        _auto_rounds(
            model, auto, result, evaluate, tolerance, example_inputs, calibration,
            trainer, train_data, measure, rounds,
        )  # fmt: skip
        result.reached = result.reached and reached(result.history[-1])
        return result
    best = result.model
    now = start = baseline  # the measurements of ``best``, and of where a transform started
    for piece, optional, aim in pieces:
        attempt = piece
        if aim is not None:
            start = now if aim.k == 1 else start
            aimed = aim.piece(piece, start, now)
            if aimed is None:
                result.notes.append(
                    f"{_name(piece)} skipped: step {aim.k} of {aim.n}'s point is reached already"
                )
                continue
            attempt = aimed
        for retry in range(2):
            candidate = copy_model(best)
            try:
                attempt.apply(candidate, example_inputs, calibration=calibration)
            except ValueError as e:
                if retry == 0 and not optional:
                    raise
                result.notes.append(f"{_name(attempt)} skipped: {e}")
                if retry == 0:
                    break  # an intermediate step: go on with the next
                # the gentler step does not apply to this model (e.g. ShareWeights with twice
                # the clusters on layers the previous step already shared that finely)
                result.model = best
                return result
            if trainer is not None:
                trainer.fit(candidate, train_data)
            metric = float(evaluate(candidate))
            row = measure(candidate, metric, _name(attempt))
            row["kept"] = base_metric - metric <= tolerance
            result.history.append(row)
            if row["kept"]:
                best, now = candidate, row
                break
            smaller = _gentler(attempt)
            if smaller is None or retry == 1:
                result.model = best
                return result
            attempt = smaller
        if result.history and reached(result.history[-1]) and result.history[-1]["kept"]:
            result.reached = True
            break
    result.model = best
    return result


def _auto_rounds(
    model: nn.Module,
    auto: Auto,
    result: CompressionResult,
    evaluate: Callable[[nn.Module], float],
    tolerance: float,
    example_inputs: Any,
    calibration: Any,
    trainer: Any,
    train_data: Any,
    measure: Callable[[nn.Module, float, str], dict[str, Any]],
    rounds: int,
) -> None:
    """:func:`compress` with an :class:`Auto`: plan, apply, evaluate, correct, again."""
    table = auto.table(model, calibration, example_inputs)
    fraction = auto._target.fraction
    result.front = table.front()
    base_metric = result.baseline["metric"]
    scale: dict[str, float] = {}
    tried: list[dict[str, str]] = []

    def run(plan: dict[str, str], fine_tune: bool) -> tuple[nn.Module, float]:
        candidate = copy_model(model)
        dataclasses.replace(auto, target=None, plan=plan).apply(
            candidate, example_inputs, calibration=calibration
        )
        if fine_tune and trainer is not None:
            trainer.fit(candidate, train_data)
        return candidate, float(evaluate(candidate))

    for r in range(rounds):
        plan = table.allocate(fraction, scale)
        if plan in tried:
            result.notes.append(
                f"Auto: round {r + 1} would repeat an earlier plan: with the corrected "
                f"estimates the same plan is still the least loss (or the only one) that fits "
                f"the budget; stopped. A larger budget or other candidates give it room."
            )
            break
        tried.append(plan)
        candidate, metric = run(plan, True)
        row = measure(candidate, metric, f"Auto round {r + 1}")
        estimated = {p: table.loss_of({p: n}) * scale.get(p, 1.0) for p, n in plan.items()}
        row.update(
            plan=plan,
            predicted_cost=table.cost_of(plan) / table.total,
            predicted_loss=sum(estimated.values()),
            kept=base_metric - metric <= tolerance,
        )
        result.history.append(row)
        if row["kept"]:
            result.model, result.plan, result.reached = candidate, plan, True
            return
        if r == rounds - 1:
            break
        drop = base_metric - metric
        total = sum(estimated.values())
        if total <= 0:
            break
        per_unit = drop / total  # the metric each unit of estimated loss costs, this round
        for group in _groups(estimated, 4):
            _, without = run({p: n for p, n in plan.items() if p not in group}, False)
            recovered = without - metric
            said = per_unit * sum(estimated[p] for p in group)
            factor = min(16.0, max(1 / 16, recovered / said)) if said > 0 else 1.0
            for p in group:
                scale[p] = scale.get(p, 1.0) * factor
    result.notes.append(
        f"Auto: no round kept the metric within {tolerance:g} of {base_metric:.4g}; the model "
        f"is left as it was (each round's plan is in the history)."
    )


def _groups(estimated: dict[str, float], n: int) -> list[list[str]]:
    """The layers, largest estimate first, cut into at most ``n`` runs of about equal total."""
    order = sorted(estimated, key=lambda p: -estimated[p])
    total = sum(estimated.values()) or 1.0
    groups: list[list[str]] = [[]]
    acc = 0.0
    for p in order:
        if acc >= total * len(groups) / n and len(groups) < n:
            groups.append([])
        groups[-1].append(p)
        acc += estimated[p]
    return [g for g in groups if g]


def _pieces(transforms: Any, steps: int) -> list[tuple[Transform, bool, _Aim | None]]:
    """The steps of the loop, each transform split in ``steps`` (:func:`schedule`), with
    whether the piece may be skipped where it does not apply: every piece but the last of its
    transform's split (ShareWeights' first, finest step on layers with fewer weights per
    codebook)."""
    if isinstance(transforms, Transform):
        transforms = [transforms]
    if not isinstance(transforms, (list, tuple)) or not transforms:
        raise TypeError(
            f"compress(transforms=...): expected a Transform or a non-empty list of them, got "
            f"{type(transforms).__name__} ({transforms!r:.40})."
        )
    check_transform_items("compress", transforms)
    pieces: list[tuple[Transform, bool, _Aim | None]] = []
    for t in transforms:
        # a Compose is split part by part (schedule): each part aimed on its own
        flat = isinstance(t, Compose) and type(t).split is Compose.split
        parts = list(t.transforms) if flat else [t]
        splits = [(p, schedule(p, steps)) for p in parts]
        left = sum(len(split) for _, split in splits)  # pieces of ``t`` still to add
        for p, split in splits:
            whole = _target_of(p) if len(split) > 1 else None
            for i, s in enumerate(split):
                left -= 1
                aim = _Aim(whole, i + 1, len(split)) if whole is not None else None
                pieces.append((s, left > 0, aim))
    return pieces


def _target_of(t: Transform) -> Target | None:
    """A transform's MACs/params target (``Prune(macs=...)``, ``Factorize(params=...)``)."""
    try:
        whole = getattr(t, "_target", None)
    except ValueError:  # a transform whose target is not set (Auto with a plan)
        return None
    return whole if isinstance(whole, Target) else None


@dataclasses.dataclass(frozen=True)
class _Aim:
    """Piece ``k`` of ``n`` of a transform with a MACs/params target: each piece's own target
    (``fraction ** (1 / n)`` of the model it is given) would compound the channel rounding of
    every step (three steps to 0.5 of the MACs reached 0.45); the loop re-aims each piece from
    where the model is at ``target.fraction`` of where it was before the first piece, in the
    ``n - k + 1`` steps left."""

    target: Target
    k: int
    n: int

    def piece(self, t: Transform, start: dict[str, Any], now: dict[str, Any]) -> Transform | None:
        """``t`` aimed from ``now`` (a row of measurements): the geometric path from there to
        the target in the steps left (after a gentler step the rest share what it left), or
        ``None`` when the model is at the target already."""
        want = self.target.fraction * self.target.measure(start)
        have = self.target.measure(now)
        if have <= want:
            return None
        step = (want / have) ** (1 / (self.n - self.k + 1))
        return dataclasses.replace(t, **Target(self.target.metric, step).as_field())


def _name(t: Transform) -> str:
    fields = {
        f.name: getattr(t, f.name) for f in dataclasses.fields(t) if getattr(t, f.name) != f.default
    }
    inner = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v!r}" for k, v in fields.items()
    )
    return f"{type(t).__name__}({inner})"
