"""Reports: what a transform did, module by module, and the profile before and after."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..base.table import format_table

if TYPE_CHECKING:
    from ..profiling.profiler import Profile

__all__ = ["Change", "Report", "Skip"]


@dataclass
class Change:
    """One module a transform changed."""

    path: str
    action: str
    before: str = ""
    after: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skip:
    """One module a transform considered and left alone, with the reason."""

    path: str
    reason: str


@dataclass
class Report:
    """What a transform did.

    Transforms fill it through :meth:`changed` and :meth:`skipped`; :meth:`nnslim.Transform.apply`
    adds the profiles. ``str(report)`` is a readable table, :meth:`to_dict` a JSON-ready dict.

    Attributes:
        transform: the transform's name.
        config: the transform's JSON form.
        changes: modules changed, in order.
        skips: modules left alone, with reasons.
        steps: reports of the parts of a :class:`nnslim.Compose`.
        before: profile before the transform (when example inputs were given).
        after: profile after.
        notes: free-form remarks (a target not reached, a fallback taken...).
    """

    transform: str
    config: dict[str, Any] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    steps: list[Report] = field(default_factory=list)
    before: Profile | None = None
    after: Profile | None = None
    notes: list[str] = field(default_factory=list)

    def changed(
        self, path: str, action: str, before: str = "", after: str = "", **details: Any
    ) -> None:
        """Record that the module at ``path`` was changed."""
        self.changes.append(Change(path, action, before, after, dict(details)))

    def skipped(self, path: str, reason: str) -> None:
        """Record that the module at ``path`` was left alone, and why."""
        self.skips.append(Skip(path, reason))

    def note(self, text: str) -> None:
        """Add a remark that belongs to the whole transform."""
        self.notes.append(text)

    def why_unchanged(self) -> str:
        """One line saying why a transform that changed no module changed none."""
        if not self.skips:
            return f"{self.transform} changed nothing: it found no module it applies to."
        counts: dict[str, int] = {}
        for s in self.skips:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
        why = "; ".join(f"{n} x {reason!r}" for reason, n in top)
        more = f" and {len(counts) - 3} other reasons" if len(counts) > 3 else ""
        return f"{self.transform} changed nothing: every candidate was left alone ({why}{more})."

    # -- queries ------------------------------------------------------------------------------
    def all_changes(self) -> list[Change]:
        """Changes of this report and of all nested steps."""
        out = list(self.changes)
        for s in self.steps:
            out.extend(s.all_changes())
        return out

    def all_skips(self) -> list[Skip]:
        """Skips of this report and of all nested steps."""
        out = list(self.skips)
        for s in self.steps:
            out.extend(s.all_skips())
        return out

    @property
    def touched(self) -> list[str]:
        """Paths of every changed module (nested steps included)."""
        return [c.path for c in self.all_changes()]

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        return {
            "transform": self.transform,
            "config": self.config,
            "changes": [
                {
                    "path": c.path,
                    "action": c.action,
                    "before": c.before,
                    "after": c.after,
                    "details": c.details,
                }
                for c in self.changes
            ],
            "skips": [{"path": s.path, "reason": s.reason} for s in self.skips],
            "steps": [s.to_dict() for s in self.steps],
            "before": self.before.summary() if self.before is not None else None,
            "after": self.after.summary() if self.after is not None else None,
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs: Any) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def table(self, max_rows: int = 40) -> str:
        """A readable summary: profile before/after, then changed and skipped modules."""
        parts = [
            f"{self.transform}: {len(self.all_changes())} modules changed, "
            f"{len(self.all_skips())} left alone"
        ]
        if self.before is not None and self.after is not None:
            parts.append(self.before.compare(self.after).table())
        for step in self.steps:
            parts.append("  " + step.table(max_rows).replace("\n", "\n  "))
        if self.changes:
            rows = []
            for c in self.changes[:max_rows]:
                det = ", ".join(f"{k}={_short(v)}" for k, v in c.details.items())
                rows.append([c.path or "(root)", c.action, c.before, c.after, det])
            if len(self.changes) > max_rows:
                rows.append([f"... {len(self.changes) - max_rows} more", "", "", "", ""])
            parts.append(format_table(["module", "action", "before", "after", "details"], rows))
        if self.skips:
            rows = [[s.path or "(root)", s.reason] for s in self.skips[:max_rows]]
            if len(self.skips) > max_rows:
                rows.append([f"... {len(self.skips) - max_rows} more", ""])
            parts.append(format_table(["left alone", "reason"], rows))
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
