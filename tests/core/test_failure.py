import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnslim
from nnslim.base.inputs import as_inputs
from nnslim.core.failure import culprits, failing_module


class ReadsParameterTable(nn.Module):
    """A parent whose forward reads its child's parameter table (code written for nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(x, self.fc._parameters["weight"]))


def test_failing_module_is_the_innermost_running_module():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    where, error = failing_module(model, as_inputs(torch.randn(1, 8)))
    assert where == "1.1"
    assert error.startswith("RuntimeError: mat1 and mat2")
    assert failing_module(nn.Linear(8, 8), as_inputs(torch.randn(1, 8))) is None


def test_failing_module_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(4, 2)).train()
    before = model[0].running_mean.clone()
    assert failing_module(model, as_inputs(torch.randn(3, 8))) is not None
    assert torch.equal(model[0].running_mean, before)
    assert model.training


@pytest.mark.parametrize(
    ("where", "changed", "expected"),
    [
        ("a.b", ["a.b", "a.c"], ["a.b"]),  # the module itself
        ("a", ["a.b", "a.c", "d"], ["a.b", "a.c"]),  # a parent reading its children
        ("a.b.c", ["a", "a.b", "d"], ["a.b"]),  # the nearest changed ancestor
        ("x", ["a"], []),
        ("", ["a", "b"], ["a", "b"]),  # the model's own forward
    ],
)
def test_culprits(where, changed, expected):
    assert culprits(where, changed) == expected


def test_a_forward_broken_by_a_replacement_names_the_module_and_the_exclude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), ReadsParameterTable())
    x = torch.randn(2, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"fails in 1 \(ReadsParameterTable\): KeyError") as e:
        nnslim.Quantize(scheme="int8").apply(model, x)
    assert "exclude=['1.fc', '1.out']" in str(e.value)
    assert type(model[1].fc) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # the exclude the message gives works
    report = nnslim.Quantize(scheme="int8", exclude=["1.fc"]).apply(model, x)
    assert [c.path for c in report.changes] == ["0", "1.out"]


def test_an_error_without_a_message_is_named_by_its_type():
    """FSMT's attention raises a bare ``assert``: the failure still names the module (it raised
    an IndexError from inside nnslim)."""

    class Bare(nn.Module):
        def forward(self, x):
            raise AssertionError

    model = nn.Sequential(nn.Linear(2, 2), Bare())
    assert failing_module(model, as_inputs(torch.randn(1, 2))) == ("1", "AssertionError: ")
