"""Checks for configuration values, with errors that say what was received and what to do."""

from __future__ import annotations

from typing import Any

__all__ = ["all_finite", "check_choice", "check_fraction", "check_int", "check_type"]


def _owner(owner: str, name: str) -> str:
    return f"{owner}({name}=...)" if owner else name


def check_type(
    owner: str, name: str, value: Any, types: type | tuple[type, ...], hint: str = ""
) -> None:
    """Raise ``TypeError`` unless ``value`` is an instance of ``types``."""
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        names = (
            " or ".join(t.__name__ for t in types) if isinstance(types, tuple) else types.__name__
        )
        raise TypeError(
            f"{_owner(owner, name)}: expected {names}, got {type(value).__name__} ({value!r:.60})."
            + (f" {hint}" if hint else "")
        )


def check_fraction(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = 1.0,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    hint: str = "",
) -> float:
    """Check a number in a range (by default ``[0, 1)``) and return it as a float."""
    check_type(owner, name, value, (int, float))
    v = float(value)
    lo_ok = v >= low if low_inclusive else v > low
    hi_ok = v <= high if high_inclusive else v < high
    if not (lo_ok and hi_ok) or v != v:
        lb = "[" if low_inclusive else "("
        hb = "]" if high_inclusive else ")"
        raise ValueError(
            f"{_owner(owner, name)}: expected a number in {lb}{low}, {high}{hb}, got {value!r}."
            + (f" {hint}" if hint else "")
        )
    return v


def check_int(
    owner: str,
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    hint: str = "",
) -> int:
    """Check an integer in ``[low, high]``."""
    check_type(owner, name, value, int)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(
            f"{_owner(owner, name)}: expected an integer in {rng}, got {value!r}."
            + (f" {hint}" if hint else "")
        )
    return int(value)


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> Any:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"{_owner(owner, name)}: unknown value {value!r}; supported: "
            f"{', '.join(repr(c) for c in choices)}.{hint}"
        )
    return value


def all_finite(t: Any) -> bool:
    """Whether a tensor holds no NaN or Inf (one reduction: ``max |t|`` propagates both)."""
    if t.numel() == 0:
        return True
    return (
        bool(t.isfinite().all())
        if not t.is_floating_point()
        else bool(t.detach().abs().amax().isfinite())
    )
