"""The Transform protocol: configuration objects that change a model in place, atomically."""

from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, final

from torch import nn

from ..base.config import Config, check_is_frozen_dataclass, type_name
from ..base.inputs import Inputs, as_inputs, calibration_batches, check_finite
from ..base.modules import shared_parameters
from ..base.snapshot import Snapshot, rollback_enabled
from ..record.edits import RECORD_ATTR, NotRecordable, describe, diff, fingerprint
from .failure import culprits, failing_module
from .report import Report

if TYPE_CHECKING:
    from ..profiling.profiler import Profile

__all__ = ["Compose", "Context", "Transform"]


@dataclass
class Context:
    """What a transform gets besides the model: example inputs and calibration batches.

    Attributes:
        inputs: the example inputs (``None`` if none were given).
        calibration: calibration batches, each an :class:`~nnslim.base.inputs.Inputs`
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


@dataclass(frozen=True)
class Transform(Config, abc.ABC):
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

    #: Set to ``False`` only if ``_apply`` never writes into existing tensors in place: the
    #: snapshot then skips copying the weights.
    _copy_on_snapshot: ClassVar[bool] = True
    #: Said when the model's forward fails after the transform.
    _forward_failure_hint: ClassVar[str] = "Please report this with the model and config."

    # -- the protocol -------------------------------------------------------------------------
    @abc.abstractmethod
    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        """Change ``model`` in place and describe the changes in ``report``.

        Raise ``ValueError``/``TypeError`` for bad input; the model is restored by
        :meth:`apply`.
        """

    # -- the compress loop's protocol (nnslim.compress) -----------------------------------------
    def split(self, steps: int) -> list[Transform]:
        """This transform as up to ``steps`` smaller ones that, applied in order, do what it
        does (:func:`nnslim.compress` applies them one at a time, measuring after each).

        The default is one step, the transform itself; override it where a transform has a
        size to share out (a ratio, a target)."""
        return [self]

    def gentler(self) -> Transform | None:
        """The same step, gentler: what :func:`nnslim.compress` retries when this step cost
        too much of the metric. ``None`` (the default): no gentler form; the loop stops."""
        return None

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
        check_is_frozen_dataclass(type(self))
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.apply: expected an nn.Module, got {type(model).__name__}."
            )
        meta = next(
            (
                n
                for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
                if t.device.type == "meta"
            ),
            None,
        )
        if meta is not None:
            raise ValueError(
                f"{type(self).__name__}.apply: {meta} is on the meta device (no values to "
                f"transform); load the weights first (nnslim.compress_checkpoint streams a "
                f"checkpoint larger than memory, Prune.plan plans on a meta model)."
            )
        inputs = as_inputs(example_inputs)
        batches = calibration_batches(model, calibration)
        check_finite(batches)
        if inputs is None and batches:
            inputs = batches[0]
        ctx = Context(inputs, batches)
        before_state = describe(model)
        grads = _grad_flags(model)
        ties = _tied_params(model)
        snap = Snapshot(model, copy_tensors=self._needs_copy()) if rollback_enabled() else None
        try:
            report, entries = self._execute(model, ctx, state=before_state)
            _keep_frozen(model, grads)
            for note in _untied(model, ties):
                report.note(note)
        except BaseException:
            if snap is not None:
                snap.restore()
            raise
        _append_record(model, entries, before_state)
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

    def _execute(
        self,
        model: nn.Module,
        ctx: Context,
        before: Profile | None = None,
        state: dict[str, Any] | None = None,
    ) -> tuple[Report, list[Any]]:
        """Run the transform with its profiles and checks: ``(report, edit records)``, one
        record per step (``state``: :func:`describe` of the model before, if taken)."""
        from ..profiling.profiler import profile

        report = Report(type_name(type(self)), self.to_dict())
        state = describe(model) if state is None else state
        if ctx.inputs is not None and before is None:
            before = profile(model, ctx.inputs)
        report.before = before
        records = self._run(model, ctx, report, state)
        if ctx.inputs is not None:
            try:
                report.after = profile(model, ctx.inputs)
            except ValueError as e:
                raise self._forward_failed(model, ctx.inputs, report, e) from e
            if before is not None and before.output_finite and not report.after.output_finite:
                raise ValueError(
                    f"{type(self).__name__} left a model that outputs NaN or Inf on the example "
                    f"inputs, where it was finite before; the model was restored. Check the "
                    f"model's weights and calibration data for extreme values, or exclude the "
                    f"layers that overflow (the report of a run with `select=` on fewer layers "
                    f"shows which)."
                )
        return report, records

    def _run(
        self, model: nn.Module, ctx: Context, report: Report, state: dict[str, Any]
    ) -> list[Any]:
        """Apply the transform as one step: its edit records (one)."""
        self._apply(model, ctx, report)
        if not report.changes:
            report.note(report.why_unchanged())
        return [_record_step(self, state, model)]

    def _forward_failed(
        self, model: nn.Module, inputs: Inputs, report: Report, e: Exception
    ) -> RuntimeError:
        """The error for a model whose forward fails after the transform: where it failed,
        the changed modules that broke it, and the ``exclude=`` that leaves them alone."""
        name = type(self).__name__
        found = failing_module(model, inputs)
        where, error = found if found is not None else ("", str(e.__cause__ or e))
        bad = culprits(where, [c.path for c in report.all_changes()])
        if not bad:
            return RuntimeError(
                f"{name} left a model whose forward fails"
                f"{f' in {where}' if where else ''}: {error}. The model was restored. "
                f"{self._forward_failure_hint}"
            )
        cls = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        return RuntimeError(
            f"{name} left a model whose forward fails in {where or 'the model'} ({cls}): "
            f"{error}. The change to {shown} broke it (the code around it reads something the "
            f"new module does not have); the model was restored. Leave them as they were with "
            f"exclude={bad[:5]!r}."
        )


def check_transform_items(owner: str, transforms: Any) -> None:
    """Refuse an item of ``owner(transforms=...)`` that is not a :class:`Transform`."""
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise TypeError(
                f"{owner}(transforms=...): item {i} is a {type(t).__name__}, not a Transform."
            )


def _grad_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}


def _tied_params(model: nn.Module) -> list[list[str]]:
    """Paths (``module.name``) of every parameter several modules share, one per
    ``(module, name)``."""
    out = []
    for group in shared_parameters(model):
        first: dict[tuple[int, str], str] = {}
        for m, n, full in group:
            first.setdefault((id(m), n), full)
        out.append(list(first.values()))
    return out


def _untied(model: nn.Module, ties: list[list[str]]) -> list[str]:
    """A note per tie the transform broke (a replaced layer holds its own copy of the weight)."""
    notes = []
    for group in ties:
        held = {}
        buffers: list[set[int]] = []
        for full in group:
            mod, _, name = full.rpartition(".")
            try:
                m = model.get_submodule(mod) if mod else model
            except AttributeError:
                continue
            t = m._parameters.get(name)
            held[full] = (id(m), id(t) if t is not None else None)
            buffers.append({id(b) for b in m._buffers.values() if b is not None})
        mods = {v[0] for v in held.values()}
        params = {v[1] for v in held.values()}
        # replaced by modules that share their stored tensors (a quantized LM head and the
        # embedding lookup over its codes): still one weight
        kept = params == {None} and bool(buffers) and bool(set.intersection(*buffers))
        if len(mods) > 1 and (len(params) > 1 or None in params) and not kept:
            replaced = [k for k, v in held.items() if v[1] is None] or list(held)
            notes.append(
                f"{', '.join(group)} were one shared parameter; the replacement of "
                f"{', '.join(k.rpartition('.')[0] or k for k in replaced)} holds its own copy "
                f"now (the tie is gone: each is stored, and training updates them apart)"
            )
    return notes


def _keep_frozen(model: nn.Module, before: dict[str, bool]) -> None:
    """Frozen parameters stay frozen: a parameter a transform rebuilt under its old name takes
    its old flag, and the parameters of a module that was frozen whole (every parameter under
    its path) and was replaced (a factorized or palettized layer) are frozen too."""
    prefixes: dict[str, bool] = {}
    for name, flag in before.items():
        owner = name.rpartition(".")[0]
        prefixes[owner] = prefixes.get(owner, True) and not flag
    frozen_modules = {p for p, all_frozen in prefixes.items() if all_frozen}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if name in before:
            if not before[name]:
                p.requires_grad_(False)
            continue
        owner = name.rpartition(".")[0]
        while owner:
            if owner in frozen_modules:
                p.requires_grad_(False)
                break
            owner = owner.rpartition(".")[0]


def _record_step(t: Transform, before: Any, model: nn.Module) -> tuple[Transform, Any, str]:
    """``(transform, ops or None, why not recordable)`` for one step."""
    try:
        return t, diff(before, model), ""
    except NotRecordable as e:
        return t, None, str(e)


def _append_record(model: nn.Module, steps: list[tuple[Transform, Any, str]], before: Any) -> None:
    old = model.__dict__.get(RECORD_ATTR)
    if old is None:
        old = {"format": 1, "base": fingerprint(before), "entries": [], "unsaveable": ""}
        base_config = before[""].extra.get("hf_config") if "" in before else None
        if base_config is not None:
            old["hf_base_config"] = base_config
    entries = list(old["entries"])
    unsaveable = old["unsaveable"]
    for t, ops, why in steps:
        entries.append({"transform": t.to_dict(), "ops": ops or []})
        if ops is None and not unsaveable:
            unsaveable = f"{type_name(type(t))}: {why}"
    model.__dict__[RECORD_ATTR] = {
        **old,
        "entries": entries,
        "unsaveable": unsaveable,
        "result": fingerprint(describe(model)),  # what replaying must give: save checks it
    }
    if "hf_base_config" in old:
        from ..io.hf import guard_plain_save

        guard_plain_save(model)


@final
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
        check_transform_items("Compose", ts)
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

    def split(self, steps: int) -> list[Transform]:
        """Each part split on its own, in order."""
        return [s for part in self.transforms for s in part.split(steps)]

    def _run(
        self, model: nn.Module, ctx: Context, report: Report, state: dict[str, Any]
    ) -> list[Any]:
        """Each part in order, each recorded on its own (a later part may change what an
        earlier one moved)."""
        records: list[Any] = []
        prev = report.before
        for t in self.transforms:
            step, done = t._execute(model, ctx, before=prev)
            records.extend(done)
            report.steps.append(step)
            prev = step.after
        return records

    def _apply(self, model: nn.Module, ctx: Context, report: Report) -> None:
        self._run(model, ctx, report, describe(model))
