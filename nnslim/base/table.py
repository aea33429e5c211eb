"""Plain-text tables (no dependency), used by every report and benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "human"]


def human(x: float | int | None, unit: str = "") -> str:
    """``1234567 -> '1.23M'``; ``None -> '-'``."""
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:  # NaN
        return "nan"
    ax = abs(x)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    if isinstance(x, float) and not float(x).is_integer():
        return f"{x:.3g}{unit}"
    return f"{int(x)}{unit}"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """Format rows as an aligned text table; numbers are right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def line(items: Sequence[str]) -> str:
        parts = [
            it.rjust(widths[i]) if numeric[i] else it.ljust(widths[i]) for i, it in enumerate(items)
        ]
        return "  ".join(parts).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(list(headers)))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)
