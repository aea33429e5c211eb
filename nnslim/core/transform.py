"""The Transform protocol: configuration objects that change a model in place, atomically."""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, final

from torch import nn

from ..io.record import NotRecordable, describe, diff, fingerprint
from .inputs import Inputs, as_inputs, calibration_batches
from .report import Report
from .serialize import TYPE_REGISTRY, decode_tagged, encode_tagged
from .snapshot import Snapshot

if TYPE_CHECKING:
    from ..profiling.profiler import Profile

__all__ = ["Compose", "Context", "Transform"]

RECORD_ATTR = "_nnslim_record"


@dataclass
class Context:
    """What a transform gets besides the model: example inputs and calibration batches.

    Attributes:
        inputs: the example inputs (``None`` if none were given).
        calibration: calibration batches, each an :class:`~nnslim.core.inputs.Inputs`
            (empty if none were given).
    """

    inputs: Inputs | None
    calibration: list[Inputs] = field(default_factory=list)

    def require_inputs(self, who: str, why: str) -> Inputs:
        """The example inputs, or a ``ValueError`` that says why ``who`` needs them."""
        if self.inputs is None:
            raise ValueError(
                f"{who} needs example_inputs {why}; call `.apply(model, example_inputs)` with a "
                f"batch shaped like the real input."
            )
        return self.inputs

    def require_calibration(self, who: str, why: str) -> list[Inputs]:
        """The calibration batches, or a ``ValueError`` that says why ``who`` needs them."""
        if not self.calibration:
            raise ValueError(
                f"{who} needs calibration data {why}; pass `calibration=[batch, ...]` (an "
                f"iterable of input batches, a DataLoader works) to `.apply`."
            )
        return self.calibration


def _type_name(cls: type) -> str:
    if cls.__module__.startswith("nnslim."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Transform(abc.ABC):
    """Base class of every model transform.

    A Transform is a frozen dataclass that holds only configuration. Subclasses implement
    :meth:`_apply`; :meth:`apply` is the public entry point and must not be overridden: it
    checks the arguments, takes a snapshot, runs :meth:`_apply`, profiles before and after
    (when example inputs are given), records the structural edits for :func:`nnslim.save`, and
    puts the model back exactly as it was if anything raises.

    A transform of your own::

        @dataclasses.dataclass(frozen=True)
        class HalveBias(nnslim.Transform):
            select: Any = torch.nn.Linear

            def _apply(self, model, ctx, report):
                for path, _ in self.resolve(model, self.select):
                    ...
                    report.changed(path, "halved bias")

    Subclasses register themselves by name, so that :meth:`from_dict` can rebuild them (a class
    must be imported before its JSON is read).
    """

    VERSION: ClassVar[int] = 1
    #: Set to ``False`` only if ``_apply`` never writes into existing tensors in place: the
    #: snapshot then skips copying the weights.
    _copy_on_snapshot: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TYPE_REGISTRY[_type_name(cls)] = cls

    # -- the protocol -------------------------------------------------------------------------
    @abc.abstractmethod
    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        """Change ``model`` in place and describe the changes in ``report``.

        Raise ``ValueError``/``TypeError`` for bad input; the model is restored by
        :meth:`apply`.
        """

    @final
    def apply(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        *,
        calibration: Any = None,
    ) -> Report:
        """Transform ``model`` in place and return a :class:`~nnslim.Report`.

        Do not override this; implement :meth:`_apply`.

        Args:
            model: any ``nn.Module``.
            example_inputs: a tensor, a tuple of tensors (positional arguments) or a dict of
                keyword tensors. Needed by transforms that trace the model; when given, the
                report holds profiles before and after.
            calibration: an iterable of input batches (same forms as ``example_inputs``; a
                DataLoader of ``(x, y)`` works) for data-aware transforms. When
                ``example_inputs`` is omitted, the first batch serves as example.

        Returns:
            The report.

        Raises:
            TypeError: if the model or inputs have the wrong type.
            ValueError: for bad configuration or inputs; the model is unchanged.
        """
        _check_is_dataclass(type(self))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.apply: expected an nn.Module, got {type(model).__name__}."
            )
        inputs = as_inputs(example_inputs)
        batches = calibration_batches(model, calibration)
        if inputs is None and batches:
            inputs = batches[0]
        ctx = Context(inputs, batches)
        before_state = describe(model)
        snap = Snapshot(model, copy_tensors=self._needs_copy())
        try:
            report = self._execute(model, ctx)
            try:
                ops: list[dict[str, Any]] | None = diff(before_state, model)
                why = ""
            except NotRecordable as e:
                ops, why = None, str(e)
        except BaseException:
            snap.restore()
            raise
        _append_record(model, self, ops, why, before_state)
        return report

    # -- helpers for subclasses ---------------------------------------------------------------
    def resolve(
        self,
        model: nn.Module,
        select: Any,
        exclude: Any = None,
        *,
        eligible: Any = None,
    ) -> list[tuple[str, Any]]:
        """Resolve ``select``/``exclude`` to ``[(path, value), ...]`` in model order.

        Raises:
            ValueError: unknown names or selectors that match nothing.
        """
        from .select import normalize_selector, resolve

        picked = resolve(
            model,
            normalize_selector(select),
            normalize_selector(exclude, "exclude"),
            eligible=eligible,
            arg=f"{type(self).__name__}(select=...)",
        )
        return list(picked.items())

    def _needs_copy(self) -> bool:
        return self._copy_on_snapshot

    def _execute(self, model: nn.Module, ctx: Context, before: Profile | None = None) -> Report:
        from ..profiling.profiler import profile

        report = Report(_type_name(type(self)), self.to_dict())
        if ctx.inputs is not None:
            report.before = before if before is not None else profile(model, ctx.inputs)
        self._apply(model, ctx, report)
        if ctx.inputs is not None:
            try:
                report.after = profile(model, ctx.inputs)
            except ValueError as e:
                raise RuntimeError(
                    f"{type(self).__name__} left a model whose forward fails: {e.__cause__ or e}"
                    f". The model was restored; please report this with the model and config."
                ) from e
        return report

    # -- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"_type", "_version", "_data"}``: the JSON form of this transform."""
        _check_is_dataclass(type(self))
        return encode_tagged(self, _type_name(type(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transform:
        """Rebuild a transform from :meth:`to_dict` output.

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
    def from_json(cls, text: str) -> Transform:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _check_is_dataclass(cls: type) -> None:
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        raise TypeError(
            f"{cls.__name__} must be decorated with `@dataclasses.dataclass(frozen=True)`: a "
            f"Transform holds only configuration, as frozen dataclass fields."
        )


def _append_record(
    model: nn.Module, t: Transform, ops: list[dict[str, Any]] | None, why: str, before: Any
) -> None:
    old = model.__dict__.get(RECORD_ATTR)
    if old is None:
        old = {"format": 1, "base": fingerprint(before), "entries": [], "unsaveable": ""}
    entry = {"transform": t.to_dict(), "ops": ops or []}
    model.__dict__[RECORD_ATTR] = {
        **old,
        "entries": [*old["entries"], entry],
        "unsaveable": old["unsaveable"] or (f"{_type_name(type(t))}: {why}" if ops is None else ""),
    }


@dataclass(frozen=True, init=False)
class Compose(Transform):
    """Apply transforms in order, as one transform (compositions nest).

    If any step fails, the whole composition is undone.

    Args:
        transforms: the steps.

    Example:
        >>> import nnslim, torch
        >>> t = nnslim.Compose([nnslim.Prune(ratio=0.5), nnslim.Quantize(scheme="int8")])
        >>> type(nnslim.Transform.from_json(t.to_json())).__name__
        'Compose'
    """

    transforms: tuple[Transform, ...] = ()

    def __post_init__(self) -> None:
        ts = self.transforms
        if isinstance(ts, Transform) or not isinstance(ts, (list, tuple)):
            raise TypeError(
                f"Compose(transforms=...): expected a list of transforms, got "
                f"{type(ts).__name__}. Write `Compose([t1, t2])`."
            )
        for i, t in enumerate(ts):
            if not isinstance(t, Transform):
                raise TypeError(
                    f"Compose(transforms=...): item {i} is a {type(t).__name__}, not a Transform."
                )
        if not ts:
            raise ValueError("Compose(transforms=...): needs at least one transform.")
        object.__setattr__(self, "transforms", tuple(ts))

    def __init__(self, transforms: Any = (), /, **kwargs: Any) -> None:  # positional list
        object.__setattr__(self, "transforms", kwargs.pop("transforms", transforms))
        if kwargs:
            raise TypeError(f"Compose got unexpected arguments {sorted(kwargs)}")
        self.__post_init__()

    def _needs_copy(self) -> bool:
        return any(t._needs_copy() for t in self.transforms)

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        prev = report.before
        for t in self.transforms:
            step = t._execute(model, ctx, before=prev)
            report.steps.append(step)
            prev = step.after
