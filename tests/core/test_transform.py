import dataclasses
import json
from typing import Any

import pytest
import torch
from torch import nn

import nnslim
from nnslim.testing import model_state
from tests.zoo import TinyCNN, TinyMLP


@dataclasses.dataclass(frozen=True)
class ScaleBias(nnslim.Transform):
    """A user transform: multiply the bias of selected Linear layers by ``factor``."""

    factor: float = 0.5
    select: Any = nn.Linear

    def _apply(self, model, ctx, report):
        for path, _ in self.resolve(
            model,
            self.select,
            eligible=[(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)],
        ):
            m = model.get_submodule(path)
            m.bias = nn.Parameter(m.bias.detach() * self.factor)
            report.changed(path, "scaled bias", factor=self.factor)


@dataclasses.dataclass(frozen=True)
class InPlaceBreaker(nnslim.Transform):
    """Writes into weights in place, then fails."""

    def _apply(self, model, ctx, report):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0)
        model.fc1 = nn.Identity()
        raise RuntimeError("boom")


def test_transform_is_frozen_config():
    t = nnslim.Prune(ratio=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.ratio = 0.5
    assert t == nnslim.Prune(ratio=0.3)


def test_user_transform_applies_and_reports(mlp):
    bias = mlp.fc1.bias.detach().clone()
    report = ScaleBias(factor=0.25).apply(mlp, torch.randn(2, 16))
    assert torch.equal(mlp.fc1.bias, bias * 0.25)
    assert report.touched == ["fc1", "fc2", "fc3"]
    assert report.before.params == report.after.params
    assert "scaled bias" in str(report)


def test_user_transform_json_round_trip_uses_qualified_name():
    t = ScaleBias(factor=0.1, select=["fc1", "re:fc[23]"])
    d = t.to_dict()
    assert d["_type"] == "tests.core.test_transform.ScaleBias"
    back = nnslim.Transform.from_json(json.dumps(d))
    assert back == t


def test_type_selector_round_trips_through_json():
    t = ScaleBias(select=nn.Linear)
    d = json.loads(t.to_json())
    assert d["_data"]["select"] == {"_class": "torch.nn.modules.linear.Linear"}
    assert nnslim.Transform.from_dict(d).select is nn.Linear


def test_from_dict_rejects_unknown_type_and_fields():
    with pytest.raises(ValueError, match="unknown type 'Nope'.*known types"):
        nnslim.Transform.from_dict({"_type": "Nope", "_version": 1, "_data": {}})
    with pytest.raises(ValueError, match=r"unknown fields \['rati'\]"):
        nnslim.Transform.from_dict({"_type": "Prune", "_version": 1, "_data": {"rati": 0.1}})
    with pytest.raises(ValueError, match="version 99"):
        nnslim.Transform.from_dict({"_type": "Prune", "_version": 99, "_data": {}})


def test_from_dict_refuses_classes_outside_allowlist():
    d = ScaleBias().to_dict()
    d["_data"]["select"] = {"_class": "os.system"}
    with pytest.raises(ValueError, match="not in the allowlist"):
        nnslim.Transform.from_dict(d)


@pytest.mark.parametrize(
    "path",
    [
        "transformers.utils.import_utils.subprocess.Popen",  # an allowlisted module's import
        "nnslim.cli.argparse.ArgumentParser",
        "torch.nn.functional.F",
        "nnslim.Prune",  # a class of nnslim, but not a module
        "torch.nn.Linear",  # a re-export: only the defining path is an exact name
    ],
)
def test_allowlist_takes_exact_module_class_names_only(path):
    from nnslim.base.serialize import lookup_class

    with pytest.raises(ValueError, match="not in the allowlist|does not name a class"):
        lookup_class(path)
    assert lookup_class("torch.nn.modules.linear.Linear") is torch.nn.Linear


def test_undecorated_subclass_gets_clear_error(mlp):
    class Plain(nnslim.Transform):
        def _apply(self, model, ctx, report):
            pass

    with pytest.raises(TypeError, match=r"dataclass\(frozen=True\)"):
        Plain().apply(mlp)


def test_apply_rejects_non_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got list"):
        ScaleBias().apply([1, 2])


def test_apply_rejects_bad_inputs(mlp):
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        ScaleBias().apply(mlp, 3.0)


def test_forward_failure_on_inputs_is_clear_and_model_untouched(mlp):
    before = model_state(mlp)
    with pytest.raises(ValueError, match=r"TinyMLP.forward failed on example_inputs.*\(2, 7\)"):
        ScaleBias().apply(mlp, torch.randn(2, 7))
    from nnslim.testing import assert_same_state

    assert_same_state(before, model_state(mlp), "after a bad input")


def test_failure_restores_in_place_writes(mlp):
    before = model_state(mlp)
    with pytest.raises(RuntimeError, match="boom"):
        InPlaceBreaker().apply(mlp)
    from nnslim.testing import assert_same_state

    assert_same_state(before, model_state(mlp), "after an in-place failure")


def test_compose_nests_and_round_trips():
    inner = nnslim.Compose([nnslim.Prune(ratio=0.2), nnslim.Quantize()])
    outer = nnslim.Compose([inner, ScaleBias()])
    back = nnslim.Transform.from_json(outer.to_json())
    assert back == outer
    assert isinstance(back.transforms[0], nnslim.Compose)


def test_compose_reports_each_step_with_profiles(cnn):
    x = torch.randn(1, 3, 16, 16)
    report = nnslim.Compose([nnslim.Prune(ratio=0.5), nnslim.Quantize()]).apply(cnn, x)
    assert [s.transform for s in report.steps] == ["Prune", "Quantize"]
    assert report.steps[0].after is report.steps[1].before
    assert report.after.macs < report.before.macs
    assert report.after.param_bytes < report.steps[0].after.param_bytes
    assert "Prune" in str(report) and "Quantize" in str(report)


def test_compose_failure_in_second_step_undoes_the_first(cnn):
    before = model_state(cnn)
    t = nnslim.Compose([nnslim.Prune(ratio=0.5), InPlaceBreaker()])
    with pytest.raises(RuntimeError, match="boom"):
        t.apply(cnn, torch.randn(1, 3, 16, 16))
    from nnslim.testing import assert_same_state

    assert_same_state(before, model_state(cnn), "after a failed composition")


def test_compose_rejects_bad_items():
    with pytest.raises(TypeError, match="item 1 is a int"):
        nnslim.Compose([nnslim.Quantize(), 3])
    with pytest.raises(ValueError, match="at least one"):
        nnslim.Compose([])
    with pytest.raises(TypeError, match="expected a list of transforms"):
        nnslim.Compose(nnslim.Quantize())


def test_calibration_first_batch_serves_as_example(cnn):
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])) for _ in range(2)]
    report = nnslim.Prune(ratio=0.25).apply(cnn, calibration=loader)
    assert report.before is not None and report.after.macs < report.before.macs


def test_calibration_must_be_iterable_of_batches(mlp):
    with pytest.raises(TypeError, match="got a single Tensor"):
        ScaleBias().apply(mlp, calibration=torch.randn(2, 16))
    with pytest.raises(ValueError, match="yielded no batch"):
        ScaleBias().apply(mlp, calibration=[])


def test_report_to_dict_is_json(cnn):
    report = nnslim.Prune(ratio=0.5).apply(cnn, torch.randn(1, 3, 8, 8))
    d = json.loads(report.to_json())
    assert d["transform"] == "Prune"
    assert {c["path"] for c in d["changes"]} >= {"conv1", "bn1", "conv2"}
    assert d["skips"] == [
        {"path": "fc", "reason": "produces the model output (its channels are the output's)"}
    ]
    assert d["after"]["macs"] < d["before"]["macs"]


def test_nested_mlp_and_cnn_fixtures_are_distinct():
    assert isinstance(TinyMLP(), nn.Module) and isinstance(TinyCNN(), nn.Module)


def test_the_base_transform_knows_no_subclass_and_the_context_no_composition():
    import dataclasses
    import inspect

    src = inspect.getsource(nnslim.Transform)
    assert "isinstance(self, Compose)" not in src and "isinstance(t, Compose)" not in src
    assert [f.name for f in dataclasses.fields(nnslim.Context)] == ["inputs", "calibration"]
