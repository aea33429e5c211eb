"""Transforms leave a model's own state alone: train mode, BatchNorm statistics, counters, and
nothing silently NaN (the reliability issue's high-severity cases)."""

import dataclasses

import pytest
import torch
from torch import nn

import nnslim
from nnslim.base.snapshot import preserved_state
from nnslim.testing import assert_same_state, model_state


class Counting(nn.Module):
    """A CNN in train mode whose forward updates BatchNorm statistics and a counter buffer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(4, 3, 8, 8)


def _fresh_statistics(model):
    for bn in (model.bn1, model.bn2):
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    assert int(model.calls) == 0


def test_failed_transform_on_a_train_mode_model_raises_its_own_error_and_restores_state():
    model = Counting().train()
    before = model_state(model)
    # the first step traces (forwards in train mode would update BatchNorm), the second fails
    bad = nnslim.Compose(
        [nnslim.Prune(ratio=0.3), nnslim.Quantize(scheme="int4", select=["conv1"])]
    )
    with pytest.raises(ValueError, match="conv1 .* is a Conv2d"):
        bad.apply(model, X)
    assert_same_state(before, model_state(model), "after a failed Compose on a train-mode model")
    _fresh_statistics(model)


@pytest.mark.parametrize(
    "transform",
    [
        nnslim.Prune(ratio=0.3),
        nnslim.Prune(macs=0.6),
        nnslim.Factorize(ratio=0.5),
        nnslim.ShareWeights(clusters=16),
        nnslim.Quantize(scheme="int8"),
    ],
    ids=["prune-ratio", "prune-macs", "factorize", "share", "quantize"],
)
def test_successful_transform_leaves_statistics_counters_and_modes(transform):
    model = Counting().train()
    transform.apply(model, X, calibration=[X, X])
    _fresh_statistics(model)
    assert all(m.training for m in model.modules())


def test_preserved_state_puts_back_buffers_written_in_place_and_rebound():
    model = Counting().train()
    calls, mean = model.calls, model.bn1.running_mean
    with preserved_state(model):
        assert not any(m.training for m in model.modules())
        model(X)
        model.bn1.train()
        model(X)  # updates bn1's statistics in place
        model.calls = torch.tensor(7)  # rebinds the buffer
    assert model.calls is calls and int(calls) == 0
    assert model.bn1.running_mean is mean
    _fresh_statistics(model)
    assert all(m.training for m in model.modules())


def test_nan_calibration_batch_is_refused_with_its_index():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    before = model_state(model)
    bad = torch.randn(4, 16)
    bad[1, 3] = float("nan")
    for t in (
        nnslim.Quantize(scheme="int8-dynamic", smooth=0.5),
        nnslim.Quantize(scheme="int4", group_size=32, method="gptq"),
        nnslim.Prune(ratio=0.5, importance="wanda"),
        nnslim.Factorize(ratio=0.5),
    ):
        with pytest.raises(ValueError, match=r"calibration batch 1 holds NaN or Inf"):
            t.apply(model, calibration=[torch.randn(4, 16), bad])
        assert_same_state(before, model_state(model), f"after {t}")


@dataclasses.dataclass(frozen=True)
class Overflow(nnslim.Transform):
    """A transform whose result outputs Inf."""

    def _apply(self, model, ctx, report):
        with torch.no_grad():
            model[0].weight[0, 0] = float("inf")
        report.changed("0", "overflowed")


def test_transform_whose_model_outputs_nan_is_refused_and_undone():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    before = model_state(model)
    with pytest.raises(ValueError, match="outputs NaN or Inf on the example inputs"):
        Overflow().apply(model, torch.randn(2, 4))
    assert_same_state(before, model_state(model), "after a transform that made the output Inf")


def test_model_that_was_already_nan_is_not_blamed_on_the_transform():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.full((2, 4), float("nan"))
    report = nnslim.Quantize(scheme="int8").apply(model, x)
    assert not report.before.output_finite and not report.after.output_finite


@pytest.mark.parametrize(
    "transform",
    [
        lambda: nnslim.Prune(ratio=0.5),
        lambda: nnslim.Prune(structure="2:4"),
        lambda: nnslim.Factorize(ratio=0.5),
        lambda: nnslim.ShareWeights(clusters=4),
    ],
    ids=["prune", "2:4", "factorize", "share"],
)
def test_frozen_parameters_stay_frozen(transform):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    m[0].requires_grad_(False)  # frozen whole: its replacement is frozen too
    m[2].weight.requires_grad_(False)  # frozen in part: the parameter keeps its flag
    transform().apply(m, torch.randn(2, 8))
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    assert not any(v for n, v in flags.items() if n.startswith("0."))
    assert all(v for n, v in flags.items() if n.startswith("4."))
    if "2.weight" in flags:
        assert flags["2.weight"] is False and flags["2.bias"] is True
