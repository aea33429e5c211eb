import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.testing import model_state
from nnslim.testing.checks import _assert_same_state
from tests.models import TinyCNN, TinyMLP


def test_prune_ratio_removes_channels_for_real(cnn):
    x = torch.randn(2, 3, 16, 16)
    report = nnslim.Prune(ratio=0.5).apply(cnn, x)
    assert cnn.conv1.out_channels == 4 and cnn.bn1.num_features == 4
    assert cnn.conv2.in_channels == 4 and cnn.conv2.out_channels == 8
    assert cnn.fc.in_features == 8 and cnn.fc.out_features == 5  # output kept
    assert cnn(x).shape == (2, 5)
    assert report.after.macs < 0.3 * report.before.macs
    assert [s.path for s in report.skips] == ["fc"]


def test_prune_macs_target_is_met(cnn):
    x = torch.randn(1, 3, 16, 16)
    report = nnslim.Prune(macs=0.5).apply(cnn, x)
    ratio = report.after.macs / report.before.macs
    assert 0.4 <= ratio <= 0.5


def test_prune_params_target_is_met(mlp):
    x = torch.randn(2, 16)
    report = nnslim.Prune(params=0.6).apply(mlp, x)
    assert report.after.params <= 0.6 * report.before.params


def test_per_module_ratios_through_select():
    m = TinyMLP(hidden=32)
    nnslim.Prune(select={"fc1": 0.5, "fc2": 0.25}).apply(m, torch.randn(2, 16))
    assert m.fc1.out_features == 16
    assert m.fc2.out_features == 24


def test_round_to_keeps_multiples():
    m = TinyMLP(hidden=40)
    nnslim.Prune(ratio=0.3, round_to=8).apply(m, torch.randn(2, 16))
    assert m.fc1.out_features % 8 == 0 and m.fc2.out_features % 8 == 0


@given(
    d_in=st.integers(2, 12),
    hidden=st.integers(4, 24),
    d_out=st.integers(1, 5),
    frac=st.floats(0.1, 0.6),
    seed=st.integers(0, 10_000),
)
def test_zero_importance_channels_removed_exactly_mlp(d_in, hidden, d_out, frac, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out)).eval()
    n_zero = max(1, int(hidden * frac))
    dead = torch.randperm(hidden)[:n_zero]
    with torch.no_grad():
        m[0].weight[dead] = 0
        m[0].bias[dead] = 0
        m[2].weight[:, dead] = 0
    x = torch.randn(3, d_in)
    ref = m(x)
    nnslim.Prune(ratio=n_zero / hidden).apply(m, x)
    assert m[0].out_features == hidden - n_zero
    assert torch.equal(m(x), ref) or torch.allclose(m(x), ref, atol=1e-6, rtol=0)


@given(
    width=st.integers(2, 12),
    frac=st.floats(0.1, 0.6),
    hw=st.integers(4, 8),
    seed=st.integers(0, 10_000),
)
def test_zero_importance_channels_removed_exactly_cnn(width, frac, hw, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 4, 3, padding=1),
    ).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    n_zero = max(1, int(width * frac))
    dead = torch.randperm(width)[:n_zero]
    with torch.no_grad():
        m[0].weight[dead] = 0
        m[0].bias[dead] = 0
        m[1].weight[dead] = 0
        m[1].bias[dead] = 0
        m[3].weight[:, dead] = 0
    x = torch.randn(2, 3, hw, hw)
    ref = m(x)
    nnslim.Prune(ratio=n_zero / width).apply(m, x)
    assert m[0].out_channels == width - n_zero
    assert torch.allclose(m(x), ref, atol=1e-6, rtol=0)


def test_residual_and_concat_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 6, 1)
            self.c = nn.Conv2d(8, 6, 1)
            self.head = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = x + torch.relu(self.a(x))  # residual couples stem and a
            y = torch.cat([self.b(x), self.c(x)], 1)
            return self.head(y).mean((2, 3))

    m = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    nnslim.Prune(ratio=0.5).apply(m, x)
    assert m.stem.out_channels == m.a.out_channels == m.a.in_channels == 4
    assert m.head.in_channels == m.b.out_channels + m.c.out_channels == 6
    assert m(x).shape == (1, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, r"ratio=...\): expected a number in \[0.0, 1.0\), got 1.0"),
        ({"ratio": -0.1}, r"expected a number in \[0.0, 1.0\)"),
        ({"ratio": 0.5, "macs": 0.5}, "exactly one of ratio=, macs=, params="),
        ({}, "exactly one of"),
        ({"macs": 0.0}, r"expected a number in \(0.0, 1.0\]"),
        (
            {"ratio": 0.2, "importance": "l3"},
            "unknown value 'l3'; supported: 'l1', 'l2', 'taylor', 'wanda', 'random'",
        ),
        ({"ratio": 0.2, "select": {"fc1": 2.0}}, r"select\['fc1'\]"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nnslim.Prune(**kwargs)


def test_bad_types():
    with pytest.raises(TypeError, match=r"Prune\(ratio=...\): expected int or float, got str"):
        nnslim.Prune(ratio="0.5")


def test_select_matching_nothing_leaves_model_untouched(cnn):
    before = model_state(cnn)
    with pytest.raises(ValueError, match="no module named 'conv9'"):
        nnslim.Prune(ratio=0.5, select="conv9").apply(cnn, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="matches no module"):
        nnslim.Prune(ratio=0.5, select="re:attn.*").apply(cnn, torch.randn(1, 3, 8, 8))
    _assert_same_state(before, model_state(cnn), "after bad select")


def test_needs_example_inputs(cnn):
    with pytest.raises(ValueError, match="Prune needs example_inputs to trace"):
        nnslim.Prune(ratio=0.5).apply(cnn)


def test_only_output_layers_selected_is_an_error():
    m = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="no layer left to prune"):
        nnslim.Prune(ratio=0.5).apply(m, torch.randn(1, 4))


def test_untraceable_forward_is_clear():
    with pytest.raises(ValueError, match="TinyCNN.forward failed"):
        nnslim.Prune(ratio=0.5).apply(TinyCNN(), torch.randn(1, 4, 8, 8))


def test_iterative_steps_reach_the_same_sizes():
    a, b = TinyMLP(hidden=32), TinyMLP(hidden=32)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 16)
    nnslim.Prune(ratio=0.5).apply(a, x)
    report = nnslim.Prune(ratio=0.5, steps=4).apply(b, x)
    assert (
        (a.fc1.out_features, a.fc2.out_features)
        == (b.fc1.out_features, b.fc2.out_features)
        == (16, 16)
    )
    assert report.after.params == nnslim.profile(a, x).params
