"""Every built-in transform, and a user-written one, passes the conformance kit."""

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

import nnslim
from nnslim.testing import (
    TransformCase,
    check_atomic_failure,
    check_report_complete,
    check_save_load,
    check_split_gentler,
    parametrize_with_checks,
)
from tests.zoo import TinyCNN, TinyMLP


def make_cnn():
    torch.manual_seed(0)
    return TinyCNN()


def make_mlp():
    torch.manual_seed(0)
    return TinyMLP()


@dataclasses.dataclass(frozen=True)
class DropHalfBias(nnslim.Transform):
    """The docs' example of a user transform."""

    factor: float = 0.5
    select: Any = nn.Linear

    def _apply(self, model, ctx, report):
        eligible = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        for path, _ in self.resolve(model, self.select, eligible=eligible):
            m = model.get_submodule(path)
            m.bias = nn.Parameter(m.bias.detach() * self.factor)
            report.changed(path, "scaled bias", factor=self.factor)


CNN_X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
MLP_X = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))

CASES = [
    TransformCase(nnslim.Prune(ratio=0.5), make_cnn, CNN_X, id="prune-cnn"),
    TransformCase(nnslim.Prune(macs=0.6, importance="l1"), make_mlp, MLP_X, id="prune-mlp-macs"),
    TransformCase(nnslim.Quantize(), make_cnn, CNN_X, id="quantize-cnn"),
    TransformCase(
        nnslim.Compose([nnslim.Prune(ratio=0.25), nnslim.Quantize()]), make_cnn, CNN_X, id="compose"
    ),
    TransformCase(DropHalfBias(), make_mlp, MLP_X, id="user-transform"),
    TransformCase(
        nnslim.Quantize(scheme="int8-dynamic"), make_mlp, MLP_X, id="quantize-int8-dynamic"
    ),
    TransformCase(
        nnslim.Quantize(scheme="int4", group_size=32, select=["fc2"]),
        make_mlp,
        MLP_X,
        id="quantize-int4",
    ),
    TransformCase(
        nnslim.Quantize(scheme="int8", method="gptq"),
        make_mlp,
        MLP_X,
        calibration=[torch.randn(8, 16) for _ in range(2)],
        id="quantize-gptq",
    ),
    TransformCase(nnslim.Quantize(qat=True), make_mlp, MLP_X, id="quantize-qat"),
    TransformCase(
        nnslim.Prune(ratio=0.5, structure="unstructured"), make_mlp, MLP_X, id="prune-unstructured"
    ),
    TransformCase(
        nnslim.Prune(structure="2:4", pack=True), make_mlp, MLP_X, id="prune-2of4-packed"
    ),
    TransformCase(
        nnslim.Factorize(rank=4, select=["fc1", "fc2"]), make_mlp, MLP_X, id="factorize-rank"
    ),
    TransformCase(
        nnslim.Factorize(ratio=0.5, select=["fc1", "fc2"]),
        make_mlp,
        MLP_X,
        calibration=[torch.randn(8, 16) for _ in range(2)],
        id="factorize-aware",
    ),
    TransformCase(
        nnslim.Factorize(ratio=0.5, select=["conv2"]), make_cnn, CNN_X, id="factorize-tucker"
    ),
]


@parametrize_with_checks(CASES)
def test_conformance(case, check):
    check(case)


# -- the kit catches broken transforms -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Unreported(nnslim.Transform):
    def _apply(self, model, ctx, report):
        model.fc1 = nn.Linear(16, 32)


@dataclasses.dataclass(frozen=True)
class LiesAboutCopies(nnslim.Transform):
    _copy_on_snapshot = False

    def _apply(self, model, ctx, report):
        with torch.no_grad():
            model.fc1.weight.mul_(2)
        report.changed("fc1", "doubled")


@dataclasses.dataclass(frozen=True)
class ForgetsAttr(nnslim.Transform):
    def _apply(self, model, ctx, report):
        model.fc1.out_features = 99  # not a real change; load can replay it but outputs match
        model.fc2.weight = nn.Parameter(torch.zeros(32, 32))
        report.changed("fc1", "odd")
        report.changed("fc2", "zeroed")


def test_kit_catches_unreported_change():
    with pytest.raises(AssertionError, match="module 'fc1' was changed .* does not list it"):
        check_report_complete(TransformCase(Unreported(), make_mlp, MLP_X))


def test_kit_catches_in_place_writes_without_copy():
    with pytest.raises(RuntimeError, match="modified in place"):
        check_atomic_failure(TransformCase(LiesAboutCopies(), make_mlp, MLP_X))


def test_kit_save_load_passes_for_recorded_attribute_changes():
    check_save_load(TransformCase(ForgetsAttr(), make_mlp, MLP_X))


@dataclasses.dataclass(frozen=True)
class GentlerIsItself(DropHalfBias):
    def gentler(self):
        return self


@dataclasses.dataclass(frozen=True)
class SplitsIntoNothing(DropHalfBias):
    def split(self, steps):
        return []


def test_kit_catches_a_gentler_form_that_changes_nothing():
    with pytest.raises(AssertionError, match="the same transform"):
        check_split_gentler(TransformCase(GentlerIsItself(), make_mlp, MLP_X))


def test_kit_catches_an_empty_split():
    with pytest.raises(AssertionError, match=r"split\(3\) returned \[\]"):
        check_split_gentler(TransformCase(SplitsIntoNothing(), make_mlp, MLP_X))
