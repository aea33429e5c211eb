"""The conformance kit: standard checks that every Transform must pass, yours included.

In the spirit of scikit-learn's ``parametrize_with_checks``::

    from nnslim.testing import TransformCase, parametrize_with_checks

    CASES = [TransformCase(MyTransform(k=2), make_model, torch.randn(2, 8))]

    @parametrize_with_checks(CASES)
    def test_conformance(case, check):
        check(case)

Each check raises ``AssertionError`` with a message that says what went wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn

from ..base.inputs import as_inputs, output_tensors, task_tensors
from ..core.report import Report
from ..core.transform import Transform
from ..io.save import load, save
from ..record.edits import RECORD_ATTR

__all__ = [
    "ALL_CHECKS",
    "TransformCase",
    "assert_same_state",
    "check_atomic_failure",
    "check_forward_shape",
    "check_json_roundtrip",
    "check_report_complete",
    "check_save_load",
    "check_split_gentler",
    "check_transform",
    "model_state",
    "parametrize_with_checks",
]


@dataclass
class TransformCase:
    """A transform, a way to build a fresh model, and the inputs to run it on.

    Attributes:
        transform: the transform under test.
        make_model: builds a fresh model (called several times; seed inside for determinism).
        example_inputs: inputs for ``apply`` and for comparing outputs.
        calibration: optional calibration batches.
        atol: tolerance for comparing outputs after save/load.
        id: a name for test ids (default: the transform's class name).
    """

    transform: Transform
    make_model: Callable[[], nn.Module]
    example_inputs: Any
    calibration: Any = None
    atol: float = 1e-6
    id: str | None = None

    def __str__(self) -> str:
        return self.id or type(self.transform).__name__

    def fresh(self) -> nn.Module:
        model = self.make_model()
        model.eval()
        return model

    def apply(self, model: nn.Module) -> Report:
        return self.transform.apply(model, self.example_inputs, calibration=self.calibration)

    def outputs(self, model: nn.Module, result: bool = False) -> list[torch.Tensor]:
        """The model's output tensors on the example inputs; ``result=True``: those of its
        result only (:func:`nnslim.base.inputs.task_tensors`: not a Hugging Face model's inner
        states beside its logits)."""
        inputs = as_inputs(self.example_inputs)
        assert inputs is not None
        pick = task_tensors if result else output_tensors
        with torch.no_grad():
            return [t.detach().clone() for t in pick(inputs.call(model))]


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything :func:`check_atomic_failure` compares: structure, tensors, attributes."""
    modules = {}
    for path, m in model.named_modules(remove_duplicate=False):
        attrs = {
            k: repr(v)
            for k, v in m.__dict__.items()
            if not isinstance(v, (dict, nn.Module, torch.Tensor, set)) and k != RECORD_ATTR
        }
        cfg = m.__dict__.get("config")
        if cfg is not None and hasattr(cfg, "to_dict"):
            attrs["config"] = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        tensors = {
            name: (
                id(t),
                tuple(t.shape),
                t.dtype,
                t.detach().clone() if t.device.type != "meta" else None,
            )
            for name, t in list(m._parameters.items()) + list(m._buffers.items())
            if t is not None
        }
        modules[path] = (id(m), type(m), m.training, attrs, tensors, list(m._modules))
    return modules


def assert_same_state(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    """Assert two :func:`model_state` snapshots are the same: the same module objects, modes,
    plain attributes, configs and tensors (values and identity); ``what`` names the moment
    in the message."""
    assert list(before) == list(after), (
        f"{what}: module paths differ: lost {sorted(set(before) - set(after))[:5]}, "
        f"gained {sorted(set(after) - set(before))[:5]}"
    )
    for path, b in before.items():
        a = after[path]
        name = path or "(root)"
        assert a[0] == b[0], f"{what}: module {name} is a different object"
        assert a[1] is b[1], f"{what}: module {name} changed type {b[1]} -> {a[1]}"
        assert a[2] == b[2], f"{what}: module {name} changed train/eval mode"
        assert a[3] == b[3], f"{what}: attributes of {name} changed: {_dict_diff(b[3], a[3])}"
        assert a[5] == b[5], f"{what}: children of {name} changed"
        assert list(a[4]) == list(b[4]), f"{what}: tensors of {name} changed names"
        for t, (bid, bshape, bdtype, bval) in b[4].items():
            aid, ashape, adtype, aval = a[4][t]
            assert aid == bid, f"{what}: {name}.{t} is a different tensor object"
            assert (ashape, adtype) == (bshape, bdtype), (
                f"{what}: {name}.{t} changed from {bshape} {bdtype} to {ashape} {adtype}"
            )
            if bval is not None:
                assert _same_values(aval, bval), f"{what}: values of {name}.{t} changed"


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    if a.is_floating_point() and a.shape == b.shape:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return False


def _dict_diff(b: dict[str, Any], a: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in keys if a.get(k) != b.get(k))[
        :300
    ]


# -- the checks ---------------------------------------------------------------------------------
def check_json_roundtrip(case: TransformCase) -> None:
    """``to_dict -> JSON -> from_dict`` gives an equal transform with the same JSON."""
    t = case.transform
    text = json.dumps(t.to_dict())
    back = Transform.from_dict(json.loads(text))
    assert type(back) is type(t), f"round trip gave {type(back).__name__}, not {type(t).__name__}"
    assert back == t, f"round trip changed the transform: {t!r} -> {back!r}"
    assert json.dumps(back.to_dict()) == text, "round trip changed the JSON"


def check_atomic_failure(case: TransformCase) -> None:
    """A failure inside ``apply`` (early, or after all edits) leaves the model exactly as it was."""
    cls = type(case.transform)
    original_run = cls._run  # _apply and its edit record (a Compose: each part's)

    def late_failure(self: Transform, model: nn.Module, *args: Any) -> list[Any]:
        original_run(self, model, *args)
        raise _Injected("injected failure after the transform finished its edits")

    def early_failure(self: Report, *args: Any, **kwargs: Any) -> None:
        raise _Injected("injected failure at the first reported change")

    for label, patch in (
        ("late failure", mock.patch.object(cls, "_run", late_failure)),
        ("failure at first change", mock.patch.object(Report, "changed", early_failure)),
    ):
        model = case.fresh()
        before = model_state(model)
        with patch:
            try:
                case.apply(model)
            except _Injected:
                pass
            else:
                if label == "late failure":
                    raise AssertionError("the injected failure did not propagate out of apply")
        assert_same_state(before, model_state(model), f"after a {label}")


class _Injected(Exception):
    pass


def check_forward_shape(case: TransformCase) -> None:
    """After ``apply`` the forward still runs and every output of the model's result keeps
    its shape (a Hugging Face model's inner states beside its logits may narrow)."""
    model = case.fresh()
    before = case.outputs(model, result=True)
    case.apply(model)
    after = case.outputs(model, result=True)
    assert [t.shape for t in after] == [t.shape for t in before], (
        f"output shapes changed: {[tuple(t.shape) for t in before]} -> "
        f"{[tuple(t.shape) for t in after]}"
    )
    for t in after:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), "the transformed model outputs NaN or Inf"


def check_save_load(case: TransformCase) -> None:
    """``save`` then ``load`` into a fresh base reproduces the transformed model's outputs."""
    model = case.fresh()
    case.apply(model)
    expected = case.outputs(model)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save(model, path)
        restored = load(path, case.fresh())
    restored.eval()
    got = case.outputs(restored)
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.shape == e.shape, f"output {i}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        assert torch.allclose(g.float(), e.float(), atol=case.atol, rtol=0), (
            f"output {i} differs after save/load by {(g.float() - e.float()).abs().max():.3g}"
        )
    assert str(restored) == str(model), "the reloaded model has another structure"


def check_report_complete(case: TransformCase) -> None:
    """The report names every module the transform changed; every skip has a reason."""
    model = case.fresh()
    report = case.apply(model)
    record = model.__dict__.get(RECORD_ATTR, {})
    ops = record.get("entries", [{}])[-1].get("ops", [])
    touched = report.touched
    for op in ops:
        path = op["path"]
        covered = any(
            path == t or path.startswith(t + ".") or t.startswith(path + ".") or t == ""
            for t in touched
        )
        assert covered, (
            f"module {path!r} was changed ({op['op']}) but the report does not list it; "
            f"call report.changed({path!r}, ...) in _apply"
        )
    for s in report.all_skips():
        assert s.reason.strip(), f"skip of {s.path!r} has no reason"
    json.dumps(report.to_dict(), default=str)
    assert str(report)


def check_split_gentler(case: TransformCase) -> None:
    """The compress loop's protocol: ``split(3)`` is a non-empty list of transforms whose
    steps, applied in order, keep the forward running with the same result shapes;
    ``gentler()`` is ``None`` or a different transform of the same kind that applies too."""
    t = case.transform
    parts = t.split(3)
    assert isinstance(parts, list) and parts, f"{type(t).__name__}.split(3) returned {parts!r}"
    for part in parts:
        assert isinstance(part, Transform), f"split(3) holds {type(part).__name__}"
        assert Transform.from_json(part.to_json()) == part, f"{part} does not round-trip"
    model = case.fresh()
    before = case.outputs(model, result=True)
    for part in parts:
        part.apply(model, case.example_inputs, calibration=case.calibration)
    after = case.outputs(model, result=True)
    assert [x.shape for x in after] == [x.shape for x in before], "the split steps broke shapes"
    g = t.gentler()
    if g is None:
        return
    assert type(g) is type(t), f"gentler() of {type(t).__name__} is a {type(g).__name__}"
    assert g != t, "gentler() returned the same transform (the loop would retry it unchanged)"
    model = case.fresh()
    g.apply(model, case.example_inputs, calibration=case.calibration)
    assert [x.shape for x in case.outputs(model, result=True)] == [x.shape for x in before]


ALL_CHECKS: tuple[Callable[[TransformCase], None], ...] = (
    check_json_roundtrip,
    check_atomic_failure,
    check_forward_shape,
    check_save_load,
    check_report_complete,
    check_split_gentler,
)


def check_transform(case: TransformCase) -> None:
    """Run every check on one case (outside pytest)."""
    for check in ALL_CHECKS:
        check(case)


def parametrize_with_checks(cases: Sequence[TransformCase]) -> Any:
    """A ``pytest.mark.parametrize`` over every (case, check) pair, with readable ids."""
    import pytest

    params = [(case, check) for case in cases for check in ALL_CHECKS]
    ids = [f"{case}-{check.__name__}" for case, check in params]
    return pytest.mark.parametrize("case, check", params, ids=ids)
