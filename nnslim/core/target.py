"""Budgets: how small a model must get, as a fraction of the original model.

One type for every place that aims at a size: ``Prune(macs=...)``/``Prune(params=...)``,
``Factorize(macs=...)``/``Factorize(params=...)`` and :func:`nnslim.compress`'s ``target=``.
Each says the same things the same way: which metric, which fraction, what a step of a
split run aims at, what a gentler attempt aims at, and whether a measurement meets it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..base.validate import check_fraction

__all__ = ["METRICS", "Target"]

Metric = Literal["macs", "params", "param_bytes", "latency_ms"]
#: what a target can bound, each as :meth:`nnslim.Profile.summary` names it
METRICS: tuple[str, ...] = ("macs", "params", "param_bytes", "latency_ms")
_ALIASES = {"bytes": "param_bytes", "latency": "latency_ms"}


@dataclass(frozen=True)
class Target:
    """At most ``fraction`` of the original model's ``metric``.

    Example::

        Target("macs", 0.5)  # at most half the MACs
    """

    metric: Metric
    fraction: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(
                f"Target: unknown metric {self.metric!r}; supported: {', '.join(METRICS)}."
            )
        check_fraction(
            "Target", self.metric, self.fraction, low_inclusive=False, high_inclusive=True
        )

    # -- reading it from a transform's fields or compress's dict --------------------------------
    @classmethod
    def of(cls, owner: str, **fields: float | None) -> Target | None:
        """The one target among a transform's fields (``macs=``, ``params=``), checked with
        errors naming ``owner``; ``None`` when none is given. Which fields may be combined is
        the transform's to check."""
        given = [(k, v) for k, v in fields.items() if v is not None]
        for k, v in given:
            check_fraction(owner, k, v, low_inclusive=False, high_inclusive=True)
        if len(given) > 1:
            names = ", ".join(f"{k}=" for k, _ in given)
            raise ValueError(f"{owner}: give one target, not {names}.")
        return cls(given[0][0], float(given[0][1])) if given else None  # type: ignore[arg-type]

    @classmethod
    def parse(cls, owner: str, value: Any) -> tuple[Target, ...]:
        """``{"macs": 0.5, "bytes": 0.25}`` (aliases ``bytes``, ``latency``), a
        :class:`Target` or a list of them, as targets all to be met."""
        if isinstance(value, Target):
            return (value,)
        if isinstance(value, (list, tuple)) and value and all(isinstance(t, Target) for t in value):
            return tuple(value)
        if not isinstance(value, Mapping) or not value:
            raise ValueError(
                f"{owner}(target=...): expected a dict like {{'macs': 0.5}}, got {value!r}."
            )
        out = []
        for k, v in value.items():
            metric = _ALIASES.get(k, k)
            if metric not in METRICS:
                raise ValueError(
                    f"{owner}(target=...): unknown key {k!r}; supported: {', '.join(METRICS)}."
                )
            check_fraction(owner, f"target[{k!r}]", v, low_inclusive=False, high_inclusive=True)
            out.append(cls(metric, float(v)))  # type: ignore[arg-type]
        return tuple(out)

    # -- what the compress loop asks --------------------------------------------------------------
    def per_step(self, steps: int) -> Target:
        """The target of each of ``steps`` equal steps, each on the model the last left:
        ``fraction ** (1 / steps)``."""
        return Target(self.metric, self.fraction ** (1 / steps))

    def gentler(self) -> Target:
        """Halfway from this target to the whole model."""
        return Target(self.metric, (1 + self.fraction) / 2)

    def as_field(self) -> dict[str, float]:
        """``{metric: fraction}``, to rebuild a transform: ``replace(t, **target.as_field())``."""
        return {self.metric: self.fraction}

    # -- measuring ------------------------------------------------------------------------------
    def goal(self, original: float) -> float:
        """The largest value that meets the target, given the original model's."""
        return self.fraction * original

    def met(self, value: float | None, original: float | None) -> bool:
        """Whether a measured ``value`` meets the target (an unmeasured one does not)."""
        return value is not None and original is not None and value <= self.goal(original)

    def measure(self, summary: Mapping[str, Any] | Any) -> Any:
        """The metric read from a :class:`~nnslim.Profile` or its ``summary()`` dict."""
        if isinstance(summary, Mapping):
            return summary.get(self.metric)
        return getattr(summary, self.metric)
