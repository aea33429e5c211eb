import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.testing import assert_same_state, model_state
from tests.zoo import TinyCNN, TinyMLP


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
            "unknown value 'l3'; supported: 'l1', 'l2', 'taylor', 'wanda', 'sparsegpt', 'random'",
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
    assert_same_state(before, model_state(cnn), "after bad select")


def test_needs_example_inputs(cnn):
    with pytest.raises(ValueError, match="Prune needs example_inputs to trace"):
        nnslim.Prune(ratio=0.5).apply(cnn)


def test_a_model_with_only_output_layers_is_a_no_op_that_says_why():
    """Nothing to prune without select/exclude: the model is left as it was and the report
    says why (the way Quantize skips a layer it cannot take), not an error aborting a Compose."""
    m = nn.Sequential(nn.Linear(4, 3))
    before = model_state(m)
    report = nnslim.Prune(ratio=0.5).apply(m, torch.randn(1, 4))
    assert not report.all_changes()
    assert [(s.path, s.reason) for s in report.skips] == [
        ("0", "produces the model output (its channels are the output's)")
    ]
    assert any("Prune changed nothing" in n for n in report.notes)
    assert_same_state(before, model_state(m), "after a no-op")


def test_a_model_with_nothing_to_sparsify_is_a_no_op_that_says_why():
    m = nn.Sequential(nn.Linear(4, 3))
    before = model_state(m)
    report = nnslim.Prune(ratio=0.5, structure="unstructured").apply(m, torch.randn(1, 4))
    assert not report.all_changes()
    assert [(s.path, s.reason) for s in report.skips] == [("0", "produces the model output")]
    assert any("Prune changed nothing" in n for n in report.notes)
    assert_same_state(before, model_state(m), "after a no-op")
    with pytest.raises(ValueError, match="no layer left to sparsify after select/exclude"):
        nnslim.Prune(ratio=0.5, structure="unstructured", exclude=["0"]).apply(m, torch.randn(1, 4))


def test_select_or_exclude_that_leaves_nothing_is_an_error():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="no layer left to prune after select/exclude"):
        nnslim.Prune(ratio=0.5, exclude=["0"]).apply(m, torch.randn(1, 4))


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


class _NoBiasGroupNorm(nn.GroupNorm):
    """A GroupNorm with a scale and no shift (timm's PoolFormerV2 norms): torch-pruning 1.6
    prunes ``bias`` unconditionally and raises on the ``None``."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.group_norm(x, 1, self.weight, None, self.eps)


def test_a_group_torch_pruning_cannot_shrink_is_kept_and_the_rest_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        _NoBiasGroupNorm(16),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    reasons = {s.path: s.reason for s in report.skips}
    assert reasons["0"].startswith("torch-pruning cannot shrink its channel group (AttributeError")
    assert model[0].out_channels == 16 and model[1].weight.shape == (16,)
    assert model[2].out_channels == 8  # the next group was pruned
    assert model(x).shape == (2, 4)


def test_a_linear_subclass_returning_a_tuple_stays_out_of_the_graph():
    """A mixture-of-experts router that subclasses nn.Linear and returns (logits, weights)
    (PhiMoE, Llama 4): torch-pruning read ``.shape`` off its output and failed the model."""

    class Router(nn.Linear):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.softmax(-1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.router = nn.Linear(8, 32), nn.Linear(32, 8), Router(8, 2)

        def forward(self, x):
            _, w = self.router(x)
            return self.down(torch.relu(self.up(x))) * w[..., :1]

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 8)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert model.up.out_features == 16 and model.down.in_features == 16
    assert model.router.weight.shape == (2, 8)
    assert {c.path for c in report.changes} == {"up", "down"}
    assert model(x).shape == (3, 8)


class _Blur(nn.Module):
    """timm's BlurPool2d: one fixed kernel repeated per channel, the count in ``channels``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        k = torch.tensor([1.0, 2.0, 1.0])
        filt = (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).clone()
        self.register_buffer("filt", filt, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.filt, stride=2, padding=1, groups=self.channels)


def test_an_anti_aliasing_filter_follows_the_pruned_width_exactly(tmp_path):
    """TResNet and the timm ``aa`` ResNets blur with a fixed per-channel kernel: the filter and
    its channel count follow the width (the kernel is the same for every channel: exact)."""
    torch.manual_seed(0)

    def make():
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            _Blur(16),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            _Blur(16),
            nn.Conv2d(16, 8, 1),
        ).eval()

    model = make()
    x = torch.randn(2, 3, 16, 16)
    ref = copy.deepcopy(model)
    nnslim.Prune(ratio=0.5).apply(model, x)
    assert model[2].channels == 8 and model[2].filt.shape == (8, 1, 3, 3)
    assert model[5].channels == 8 and model[5].filt.shape == (8, 1, 3, 3)
    # the blur of a kept channel is unchanged: rebuild by hand from the kept rows of conv 0
    keep = [
        i
        for i in range(16)
        if any(torch.equal(model[0].weight[j], ref[0].weight[i]) for j in range(8))
    ]
    assert len(keep) == 8
    blurred = ref[2](ref[1](ref[0](x)))[:, keep]
    assert torch.allclose(model[2](model[1](model[0](x))), blurred, atol=1e-6)
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", make())
    assert "2.filt" not in back.state_dict()  # still not persistent: the file carries it
    assert torch.equal(back(x), model(x))


def test_sparsity_masks_a_tied_weight_once_or_not_at_all():
    from torch import nn

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.out(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    m = Tied()
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(m, x)
    assert m.a.weight is m.b.weight and float((m.a.weight == 0).float().mean()) == 0.5
    m = Tied()
    with pytest.raises(ValueError, match="a: its weight is tied to b, which is not sparsified"):
        nnslim.Prune(ratio=0.5, structure="unstructured", select=["a"]).apply(m, x)
    assert m.a.weight is m.b.weight and not (m.a.weight == 0).any()  # left as it was
    report = nnslim.Prune(ratio=0.5, structure="unstructured", select=["a", "out"]).apply(m, x)
    assert "tied to b" in {s.path: s.reason for s in report.skips}["a"]
    assert m.a.weight is m.b.weight and not (m.a.weight == 0).any()


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_a_macs_target_is_met_within_one_percent_in_few_trials(monkeypatch, target):
    import torchvision

    import nnslim.transforms.prune as prune

    calls = []
    real = prune._prune_model
    monkeypatch.setattr(prune, "_prune_model", lambda *a: calls.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    report = nnslim.Prune(macs=target).apply(model, torch.randn(1, 3, 32, 32))
    ratio = report.after.macs / report.before.macs
    # within 1%, or as close as the channel counts allow (one channel of 64 is a 1.6% step)
    assert target - 0.02 <= ratio <= target
    # bisection took 5-10 trial prunes; the interpolating search needs a few (then the final)
    assert len(calls) <= 6, calls
