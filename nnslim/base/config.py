"""Registered configuration objects: frozen dataclasses with a versioned JSON form.

:class:`Config` is the base of :class:`~nnslim.Transform` and of the small option objects that
transforms take (importances, ...). Subclasses register themselves by name, so that JSON can
name them and :meth:`Config.from_dict` can rebuild them from an allowlist, never by importing
arbitrary code.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, TypeVar

from .serialize import TYPE_REGISTRY, decode_tagged, encode_tagged

__all__ = ["Config", "type_name"]

C = TypeVar("C", bound="Config")


def type_name(cls: type) -> str:
    """The JSON name of a registered class: the bare name inside nnslim, qualified outside."""
    if cls.__module__.startswith("nnslim."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


class Config:
    """Mixin for frozen-dataclass configuration that round-trips through JSON."""

    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TYPE_REGISTRY[type_name(cls)] = cls

    def to_dict(self) -> dict[str, Any]:
        """``{"_type", "_version", "_data"}``: the JSON form."""
        check_is_frozen_dataclass(type(self))
        return encode_tagged(self, type_name(type(self)))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild an object from :meth:`to_dict` output.

        Raises:
            ValueError: unknown type, newer version, unknown fields.
            TypeError: if the data is not a dict, or names a type that is not a ``cls``.
        """
        if not isinstance(data, dict):
            raise TypeError(f"from_dict expects a dict, got {type(data).__name__}.")
        obj = decode_tagged(data)
        if not isinstance(obj, cls):
            raise TypeError(f"JSON describes a {type(obj).__name__}, not a {cls.__name__}.")
        return obj

    def to_json(self, **kwargs: Any) -> str:
        """The JSON string form (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def check_is_frozen_dataclass(cls: type) -> None:
    """Raise ``TypeError`` unless ``cls`` itself is decorated as a frozen dataclass."""
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(
            f"{cls.__name__} must be decorated with `@dataclasses.dataclass(frozen=True)`: it "
            f"holds only configuration, as frozen dataclass fields."
        )
