"""Module selection: the ``select`` and ``exclude`` arguments every transform shares.

A selector is one of

* a module path (``"layer1.0.conv1"``); an exact path must exist in the model,
* a regular expression prefixed with ``re:`` (``"re:.*\\.mlp\\..*"``), matched against the whole
  path,
* a module type (``torch.nn.Linear``), matching instances of it and its subclasses,
* a list of those, or
* a mapping from those to a per-module value (a ratio, a scheme, a rank...). When several keys
  match one module, the last key in the mapping wins.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..base.serialize import decode_value, encode_value

__all__ = ["Selector", "normalize_selector", "resolve"]

#: What ``select``/``exclude`` accept after normalisation: a tuple of (key, value) pairs,
#: where value is ``None`` for plain selections.
Selector = tuple[tuple[Any, Any], ...]


def _check_key(key: Any, arg: str) -> Any:
    if isinstance(key, str):
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise ValueError(f"{arg}: invalid regular expression {key!r}: {e}.") from None
        return key
    if isinstance(key, type) and issubclass(key, nn.Module):
        return key
    raise TypeError(
        f"{arg}: expected module names (str), 're:' regular expressions or nn.Module types, "
        f"got {key!r} of type {type(key).__name__}."
    )


def normalize_selector(value: Any, arg: str = "select") -> Selector | None:
    """Normalise a ``select``/``exclude`` argument to a tuple of ``(key, value)`` pairs.

    Accepts the JSON form too (a list of ``[key, value]`` pairs or encoded types).

    Raises:
        TypeError: for anything that is not a selector.
    """
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return ((_check_key(value, arg), None),)
    if isinstance(value, Mapping) or isinstance(value, Iterable):
        out = []
        if isinstance(value, Mapping):
            out = [(_check_key(decode_value(k), arg), v) for k, v in value.items()]
        else:
            for item in value:
                if isinstance(item, (tuple, list)) and len(item) == 2 and not isinstance(item, str):
                    out.append((_check_key(decode_value(item[0]), arg), item[1]))
                else:
                    out.append((_check_key(decode_value(item), arg), None))
        if not out:
            if arg == "exclude":
                return None  # excluding nothing
            raise ValueError(
                f"{arg} is empty, which would select nothing; pass None to select every "
                f"eligible module."
            )
        return tuple(out)
    raise TypeError(
        f"{arg}: expected a module name, a 're:' pattern, a module type, a list or a dict of "
        f"them; got {type(value).__name__}."
    )


def encode_selector(sel: Selector | None) -> Any:
    """The JSON form of a normalised selector."""
    if sel is None:
        return None
    return [[encode_value(k), v] for k, v in sel]


def _matches(key: Any, name: str, module: nn.Module) -> bool:
    if isinstance(key, type):
        return isinstance(module, key)
    if key.startswith("re:"):
        return re.fullmatch(key[3:], name) is not None
    return name == key


def resolve(
    model: nn.Module,
    select: Selector | None,
    exclude: Selector | None = None,
    *,
    eligible: Iterable[tuple[str, nn.Module]] | None = None,
    arg: str = "select",
) -> dict[str, Any]:
    """Resolve ``select``/``exclude`` to ``{module path: value}`` over ``eligible`` modules.

    With ``select=None`` every eligible module is selected with value ``None``.

    Raises:
        ValueError: if an exact name does not exist in the model (with close matches), or a
            selector matches no module at all.
    """
    named = dict(model.named_modules())
    candidates = dict(eligible) if eligible is not None else named
    _check_names(named, select, arg)
    _check_names(named, exclude, "exclude")
    out: dict[str, Any] = {}
    if select is None:
        out = {name: None for name in candidates}
    else:
        for key, value in select:
            hits = [n for n, m in candidates.items() if _matches(key, n, m)]
            if not hits:
                hits_any = [n for n, m in named.items() if _matches(key, n, m)]
                why = (
                    f"it matches {hits_any[:3]} but none of them can be handled by this transform"
                    if hits_any
                    else "it matches no module"
                )
                raise ValueError(
                    f"{arg} entry {_show(key)}: {why}. Eligible modules look like "
                    f"{list(candidates)[:5]}; list them with `[n for n, _ in "
                    f"model.named_modules()]`."
                )
            for n in hits:
                out[n] = value
    if exclude is not None:
        for key, _ in exclude:
            for n in list(out):
                if _matches(key, n, named[n]):
                    del out[n]
    return out


def _check_names(named: Mapping[str, nn.Module], sel: Selector | None, arg: str) -> None:
    if sel is None:
        return
    for key, _ in sel:
        if isinstance(key, str) and not key.startswith("re:") and key not in named:
            close = difflib.get_close_matches(key, list(named), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"{arg}: no module named {key!r} in the model.{hint} Use a 're:' prefix for "
                f"regular expressions."
            )


def _show(key: Any) -> str:
    return key.__name__ if isinstance(key, type) else repr(key)


def per_layer_values(select: Any) -> bool:
    """Whether ``select`` maps layers to their own values (``{"fc1": 0.5}``): a transform
    split into steps (:meth:`nnslim.Transform.split`) would not know how to share them out."""
    return any(v is not None for _, v in normalize_selector(select) or [])
