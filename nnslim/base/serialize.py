"""JSON encoding for configuration values, with classes looked up in an allowlist.

Transforms and module records are stored as JSON, never pickled. Values are plain JSON
(numbers, strings, lists, dicts with string keys) plus three tagged forms:

* ``{"_class": "torch.nn.modules.linear.Linear"}``: an ``nn.Module`` subclass. Only classes in
  allowlisted packages (``torch.nn``, ``torchvision``, ``transformers``, ``nnslim``) or
  registered with :func:`register_class` are imported back.
* ``{"_type": "Prune", "_version": 1, "_data": {...}}``: a registered Transform or config.
* ``{"_tuple": [...]}``: a tuple, so that tuples stay tuples.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any

__all__ = ["ALLOWED_PREFIXES", "decode_value", "encode_value", "register_class"]

ALLOWED_PREFIXES: tuple[str, ...] = ("torch.nn.", "torchvision.", "transformers.", "nnslim.")
_EXTRA_CLASSES: dict[str, type] = {}
#: Registered dataclasses that may appear tagged with ``_type`` (Transforms and their configs).
TYPE_REGISTRY: dict[str, type] = {}


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_class(cls: type) -> type:
    """Allow ``cls`` (an ``nn.Module`` subclass outside the allowlisted packages) in JSON.

    Usable as a decorator. Needed only for your own module types used as ``select`` keys or
    created by your own transforms and saved with :func:`nnslim.save`.
    """
    _EXTRA_CLASSES[class_path(cls)] = cls
    return cls


def lookup_class(path: str) -> type:
    """Import an allowlisted class from its dotted path.

    Raises:
        ValueError: if the path is outside the allowlist or does not name a class.
    """
    if path in _EXTRA_CLASSES:
        return _EXTRA_CLASSES[path]
    if not path.startswith(ALLOWED_PREFIXES):
        raise ValueError(
            f"class {path!r} is not in the allowlist ({', '.join(ALLOWED_PREFIXES)}); register it "
            f"with `nnslim.register_class(YourModule)` before loading."
        )
    obj: Any = None
    # nested qualnames (Outer.Inner): walk back until a module imports
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            obj = None
        break
    if not isinstance(obj, type):
        raise ValueError(f"{path!r} does not name a class in an installed package.")
    # exact names only: an allowlisted module's imports (transformers...subprocess.Popen,
    # nnslim.cli.argparse.ArgumentParser) are other packages' classes, not allowlisted ones
    if class_path(obj) != path or not issubclass(obj, _module_base()):
        raise ValueError(
            f"class {path!r} is not in the allowlist: only nn.Module classes defined in "
            f"{', '.join(ALLOWED_PREFIXES)} (by their own module path) or registered with "
            f"`nnslim.register_class` are imported back."
        )
    return obj


def _module_base() -> type:
    from torch import nn

    return nn.Module


def encode_value(value: Any) -> Any:
    """Encode a configuration value as JSON-compatible data.

    Raises:
        TypeError: for values that have no JSON form (functions, tensors, arbitrary objects).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"cannot store the non-finite number {value} in JSON")
        return value
    if isinstance(value, type):
        return {"_class": class_path(value)}
    if isinstance(value, tuple):
        return {"_tuple": [encode_value(v) for v in value]}
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"dict keys must be strings to store as JSON, got {bad!r}")
        return {k: encode_value(v) for k, v in value.items()}
    to_dict = getattr(value, "to_dict", None)
    if dataclasses.is_dataclass(value) and callable(to_dict):
        return to_dict()
    raise TypeError(
        f"cannot store a value of type {type(value).__name__} ({value!r:.60}) as JSON; "
        f"configuration must be numbers, strings, lists, dicts, module types or transforms."
    )


def decode_value(data: Any) -> Any:
    """Inverse of :func:`encode_value`."""
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if isinstance(data, dict):
        if "_class" in data and len(data) == 1:
            return lookup_class(data["_class"])
        if "_tuple" in data and len(data) == 1:
            return tuple(decode_value(v) for v in data["_tuple"])
        if "_type" in data:
            return decode_tagged(data)
        return {k: decode_value(v) for k, v in data.items()}
    return data


def decode_tagged(data: dict[str, Any]) -> Any:
    """Rebuild a registered Transform/config from ``{"_type", "_version", "_data"}``.

    Raises:
        ValueError: for unknown types, newer versions, or unknown fields.
    """
    name = data.get("_type")
    if name not in TYPE_REGISTRY:
        known = ", ".join(sorted(TYPE_REGISTRY))
        raise ValueError(
            f"unknown type {name!r} in JSON; known types: {known}. A transform of your own "
            f"must be imported (so that it registers) before `from_dict`."
        )
    cls = TYPE_REGISTRY[name]
    version = data.get("_version", 1)
    current = getattr(cls, "VERSION", 1)
    if not isinstance(version, int) or version > current:
        raise ValueError(
            f"{name} JSON has version {version!r} but this nnslim reads up to {current}; "
            f"upgrade nnslim."
        )
    raw = data.get("_data", {})
    if not isinstance(raw, dict):
        raise ValueError(f"{name} JSON: '_data' must be an object, got {type(raw).__name__}")
    upgrade = getattr(cls, "_upgrade", None)
    if upgrade is not None and version < current:
        raw = upgrade(dict(raw), version)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(
            f"{name} JSON has unknown fields {unknown}; expected some of {sorted(fields)}"
        )
    return cls(**{k: decode_value(v) for k, v in raw.items()})


def encode_tagged(obj: Any, name: str) -> dict[str, Any]:
    """``{"_type", "_version", "_data"}`` for a dataclass instance."""
    data = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        encoder = f.metadata.get("encode")
        data[f.name] = encoder(value) if encoder else encode_value(value)
    return {"_type": name, "_version": getattr(type(obj), "VERSION", 1), "_data": data}
