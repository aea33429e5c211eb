"""The profiler's leaf fast path gives exactly the dispatch path's figures, and steps aside
wherever it could not (subclasses, hooks, training mode, gradients, autocast, other modes)."""

import contextlib
import copy
import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.base.inputs import as_inputs
from nnslim.base.snapshot import preserved_state
from nnslim.profiling import counter, formulas
from nnslim.profiling.counter import OpCounter
from nnslim.profiling.leaf_rules import _RULES
from tests.zoo import TinyMLP, gpt2_config

#: the fast path is opt-in (``profile(fast=True)``); here every profile asks for it unless
#: inside dispatch_path_only()
_FAST = [True]


@pytest.fixture(autouse=True)
def fast_by_default(monkeypatch):
    real = nnslim.profile
    monkeypatch.setattr(nnslim, "profile", lambda *a, **k: real(*a, **{"fast": _FAST[0], **k}))


@contextlib.contextmanager
def dispatch_path_only():
    _FAST[0] = False
    try:
        yield
    finally:
        _FAST[0] = True


@contextlib.contextmanager
def leaves_through_formulas():
    """The fast path charges each leaf's operators through the formulas (as it does for an
    operator whose formula was replaced), not through its rule's per-element coefficients."""
    ops = {op for rule in _RULES.values() for op in rule.ops}
    added = ops - formulas.REPLACED
    formulas.REPLACED.update(added)
    try:
        yield
    finally:
        formulas.REPLACED.difference_update(added)


def assert_same(slow, fast):
    assert fast.macs == slow.macs
    assert fast.other_flops == slow.other_flops
    assert fast.unsupported == slow.unsupported
    assert fast.peak_bytes == slow.peak_bytes
    assert fast.static_bytes == slow.static_bytes
    assert fast.backward_macs == slow.backward_macs
    assert fast.backward_peak_bytes == slow.backward_peak_bytes
    assert fast.modules == slow.modules  # per module: macs, other FLOPs, calls, params, bytes


def profile_both(model, example, **kwargs):
    """(dispatch path, fast path) profiles of the same model and inputs; the fast path charging
    through the formulas gives the same figures too."""
    with dispatch_path_only():
        slow = nnslim.profile(model, example, **kwargs)
    with leaves_through_formulas():
        assert_same(slow, nnslim.profile(model, example, **kwargs))
    fast = nnslim.profile(model, example, **kwargs)
    assert_same(slow, fast)
    return slow, fast


def fast_calls(model, example, grad=False):
    """Leaf calls the fast path charged in one profile-like forward."""
    c = OpCounter(model, fast_leaves=True)
    with preserved_state(model), c, torch.set_grad_enabled(grad):
        as_inputs(example).call(model)
    return c.fast_calls


def leaf_calls(profile, model):
    """Calls of modules whose exact type has a rule (from a profile's per-module calls)."""
    return sum(
        profile.modules[path].calls for path, m in model.named_modules() if type(m) in _RULES
    )


# -- models ---------------------------------------------------------------------------------------
class SqueezeExcite(nn.Module):
    def __init__(self, ch, squeeze):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, ch, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class MobileNetLike(nn.Module):
    """Grouped and depthwise convolutions, BatchNorm, SE, every activation and pooling rule."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.Hardswish(),
        )
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.se = SqueezeExcite(16, 8)
        self.grouped = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=2, dilation=2, groups=4),
            nn.BatchNorm2d(32),
            nn.ReLU6(inplace=True),
            nn.Conv2d(32, 32, 1),
            nn.SiLU(),
            nn.Hardswish(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.avgpool = nn.AvgPool2d(2, count_include_pad=False)
        self.grid = nn.AdaptiveAvgPool2d((2, None))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.LazyLinear(24),
            nn.GELU(approximate="tanh"),
            nn.Dropout(0.2),
            nn.Linear(24, 10),
            nn.Sigmoid(),
            nn.Tanh(),
        )

    def forward(self, x):
        x = self.stem(x)
        x = x + self.dw(x)
        x = self.se(x)
        x = self.grouped(x)
        x = self.avgpool(self.maxpool(x))
        return self.head(self.grid(x))


class Seq1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, stride=2, padding=1)
        self.b1 = nn.BatchNorm1d(8)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), groups=2)
        self.b3 = nn.BatchNorm3d(4, momentum=None)
        self.lin = nn.Linear(10, 6, bias=False)

    def forward(self, x1, x3):
        a = self.b1(self.c1(x1))  # (2, 8, 5)
        b = self.b3(self.c3(x3))  # (2, 4, 3, 5, 5)
        return self.lin(a.flatten(1)[:, :10]).sum() + b.sum()


class DoubledConv(nn.Conv2d):
    """A Conv2d subclass with its own forward: must not take the fast path."""

    def forward(self, x):
        return super().forward(x * 2)


# -- same figures -----------------------------------------------------------------------------
def test_mobilenet_like_every_rule_same_figures_and_fast():
    torch.manual_seed(0)
    model = MobileNetLike()
    x = torch.randn(2, 3, 32, 32)
    model(x)  # build the lazy layer
    slow, _ = profile_both(model, x)
    assert fast_calls(model, x) == leaf_calls(slow, model) > 20
    assert slow.unsupported == {}
    _, fast_no_memory = profile_both(model, x, memory=False)
    assert fast_no_memory.peak_bytes is None


def test_channels_last_input_same_figures():
    torch.manual_seed(0)
    model = MobileNetLike()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    model(x)
    profile_both(model, x)


def test_conv1d_conv3d_batchnorm1d_3d_same_figures():
    model = Seq1d3d()
    example = (torch.randn(2, 4, 10), torch.randn(2, 2, 3, 5, 5))
    slow, _ = profile_both(model, example)
    assert fast_calls(model, example) == leaf_calls(slow, model) == 5


@pytest.mark.parametrize(
    "shape",
    [(8, 16), (2, 3, 16), (2, 2, 3, 16), (16,)],
    ids=["2d", "3d", "4d", "1d-unbatched"],
)
def test_mlp_same_figures(shape):
    model = TinyMLP()
    x = torch.randn(*shape)
    slow, _ = profile_both(model, x)
    assert leaf_calls(slow, model) == 3 + 2  # three Linear calls, the one ReLU called twice
    # a 1-D input runs another operator sequence in nn.Linear: only the ReLUs are fast
    assert fast_calls(model, x) == (2 if len(shape) == 1 else 5)


def test_non_contiguous_linear_input_takes_the_dispatch_path():
    lin = nn.Linear(16, 8)
    x = torch.randn(2, 16, 3).transpose(1, 2)  # copied and bias-added separately by torch
    profile_both(lin, x)
    assert fast_calls(lin, x) == 0


def test_linear_without_bias_3d():
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(2, 5, 16)
    slow, _ = profile_both(lin, x)
    assert slow.macs == 2 * 5 * 16 * 8
    assert fast_calls(lin, x) == 1


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "resnet18"])
def test_torchvision_models_same_figures(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 96, 96)
    slow, _ = profile_both(model, x)
    assert fast_calls(model, x) == leaf_calls(slow, model) > 50


def test_backward_profile_same_figures():
    torch.manual_seed(0)
    model = MobileNetLike()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    slow, _ = profile_both(model, x, backward=True)
    assert slow.backward_macs > 0
    assert fast_calls(model, x, grad=True) == 0  # a forward under grad keeps every op


def test_quantized_and_masked_modules_same_figures():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    x = torch.randn(4, 64)
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(model, x)
    slow, _ = profile_both(model, x)
    assert fast_calls(model, x) == 4  # masked nn.Linear: still an nn.Linear forward
    nnslim.Quantize(scheme="int8").apply(model, x)
    slow, _ = profile_both(model, x)
    assert fast_calls(model, x) == 2  # the ReLUs; nnslim's Int8Linear keeps the dispatch path


@given(
    rows=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    normalized=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    affine=st.sampled_from(["both", "weight", "none"]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_layer_norm_fast_path_equals_dispatch_path(rows, normalized, affine, dtype):
    ln = nn.LayerNorm(normalized, elementwise_affine=affine != "none", bias=affine == "both")
    ln = ln.to(dtype)
    x = torch.randn(*rows, *normalized, dtype=dtype)
    slow, _ = profile_both(ln, x)
    assert slow.other_flops == 5 * x.numel()
    assert fast_calls(ln, x) == 1


class PreNormBlock(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_transformer_blocks_same_figures():
    torch.manual_seed(0)
    block = PreNormBlock()
    x = torch.randn(2, 7, 32)
    slow, _ = profile_both(block, x)
    assert fast_calls(block, x) == 5  # attention keeps the dispatch path
    # torch's encoder layer takes its fused kernel in eval mode: no leaf calls at all
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=True)
    profile_both(layer, x)


def test_gpt2_same_figures():
    transformers = pytest.importorskip("transformers")
    cfg = gpt2_config()
    model = transformers.GPT2LMHeadModel(cfg).eval()
    example = {"input_ids": torch.randint(0, 300, (1, 16))}
    slow, _ = profile_both(model, example)
    assert fast_calls(model, example) == leaf_calls(slow, model) > 0


# -- where the fast path steps aside ---------------------------------------------------------
def test_subclass_overriding_forward_is_counted_by_dispatch():
    model = nn.Sequential(DoubledConv(4, 8, 3), nn.ReLU())
    x = torch.randn(1, 4, 6, 6)
    slow, fast = profile_both(model, x)
    assert fast.modules["0"].macs == 8 * 16 * 4 * 9
    assert fast.modules["0"].other_flops == 4 * 36 + 8 * 16  # the doubling, then the bias
    assert fast_calls(model, x) == 1  # the ReLU only


def test_module_pre_hook_computing_the_weight_is_counted():
    conv = nn.Conv2d(4, 8, 3)
    from torch.nn.utils import prune

    prune.random_unstructured(conv, "weight", amount=0.5)  # weight = orig * mask
    x = torch.randn(1, 4, 6, 6)
    slow, _ = profile_both(conv, x)
    assert slow.other_flops == conv.weight.numel() + 8 * 16  # the mask product, the bias
    assert fast_calls(conv, x) == 0


def test_global_hooks_run_outside_the_fast_path():
    # module hooks, global or not, run around the wrapped forward, never inside the paused
    # region: the leaves stay fast, and what the hook computes is counted (to the caller)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(1, 3, 6, 6)

    def total(m, args, out):
        out.sum()  # computes, and returns None: the output stays

    handle = torch.nn.modules.module.register_module_forward_hook(total)
    try:
        slow, fast = profile_both(model, x)
        assert fast_calls(model, x) == 2
    finally:
        handle.remove()
    out = 4 * 4 * 4
    assert fast.other_flops == out + out + 3 * out  # bias, ReLU, a sum after each of 3 modules
    assert fast.modules["0"].other_flops == out and fast.modules["1"].other_flops == out


def test_module_hooks_are_charged_to_their_module():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    model[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model[0].register_forward_hook(lambda m, args, out: out + 1)
    x = torch.randn(3, 8)
    slow, fast = profile_both(model, x)
    assert fast.modules["0"].macs == 3 * 8 * 8
    assert fast.modules["0"].other_flops == 3 * 8 + 3 * 8 + 3 * 8  # doubling, bias, + 1
    assert fast.modules["1"].other_flops == 3 * 8
    assert fast_calls(model, x) == 1  # the ReLU; the hooked Linear keeps the dispatch path


def test_forward_set_on_the_instance_is_counted_by_dispatch_and_kept():
    conv = nn.Conv2d(4, 8, 3)

    def doubled(x):
        return nn.Conv2d.forward(conv, x * 2)

    conv.forward = doubled
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(1, 4, 6, 6)
    slow, fast = profile_both(model, x)
    assert fast.modules["0"].other_flops == 4 * 36 + 8 * 16  # the doubling, then the bias
    assert fast_calls(model, x) == 1  # the ReLU
    assert conv.__dict__["forward"] is doubled
    assert "forward" not in model[1].__dict__ and "forward" not in model.__dict__


def test_forwards_are_unwrapped_after_a_failure():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match="failed on example_inputs"):
        nnslim.profile(model, torch.randn(1, 5, 6, 6))
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch._C._len_torch_dispatch_stack() == 0


def test_forward_called_directly_is_charged_to_its_module():
    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return self.lin.forward(x)  # not through __call__: hooks would not see it

    slow, fast = profile_both(Direct(), torch.randn(2, 8))
    assert fast.modules["lin"].macs == 2 * 8 * 4 and fast.modules["lin"].calls == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_submodule_is_counted():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.inner(x))

    model = Outer()
    scripted_forward = model.inner.__dict__.get("forward")
    slow, fast = profile_both(model, torch.randn(3, 8))
    assert fast.macs == 3 * 8 * 8 + 3 * 8 * 2
    assert fast.modules["inner"].macs == 3 * 8 * 8 and fast.modules["inner"].calls == 1
    assert all("forward" not in m.__dict__ for m in (model, model.head))
    assert model.inner.__dict__.get("forward") is scripted_forward
    assert torch.equal(model(torch.ones(1, 8)), model.head(model.inner(torch.ones(1, 8))))


def test_replaced_formula_is_used_by_the_fast_path():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 6, 6)
    old = formulas._FORMULAS[torch.ops.aten.convolution]
    try:
        nnslim.register_formula(torch.ops.aten.convolution)(lambda args, kwargs, out: (7, 0))
        slow, fast = profile_both(conv, x)
        assert fast.macs == 7 and fast_calls(conv, x) == 1
    finally:
        formulas.register_formula(torch.ops.aten.convolution)(old)
        formulas.REPLACED.discard(torch.ops.aten.convolution)
    assert nnslim.profile(conv, x).macs == 4 * 16 * 27


def test_changed_element_costs_reach_both_paths():
    model = nn.Sequential(nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    saved = dict(formulas.ELEMENT_COSTS)
    try:
        formulas.ELEMENT_COSTS.update(layer_norm=7, pointwise=3)
        slow, fast = profile_both(model, x)
        assert fast.other_flops == 7 * 16 + 3 * 16 + 2 * 4  # norm, ReLU, bias
    finally:
        formulas.ELEMENT_COSTS.update(saved)


def test_every_rule_names_the_operators_it_charges():
    cases = [
        (nn.Conv2d(4, 8, 3), torch.randn(1, 4, 6, 6)),
        (nn.Conv1d(4, 8, 3, bias=False), torch.randn(2, 4, 9)),
        (nn.Linear(8, 4), torch.randn(3, 8)),
        (nn.Linear(8, 4, bias=False), torch.randn(2, 3, 8)),
        (nn.Conv3d(2, 4, (1, 3, 3), groups=2), torch.randn(1, 2, 2, 4, 4)),
        (nn.BatchNorm1d(4).eval(), torch.randn(2, 4)),
        (nn.BatchNorm2d(4).eval(), torch.randn(2, 4, 3, 3)),
        (nn.BatchNorm3d(4, momentum=None).eval(), torch.randn(2, 4, 1, 2, 2)),
        (nn.ReLU(inplace=True), torch.randn(4)),
        (nn.ReLU6(), torch.randn(4)),
        (nn.Hardswish(), torch.randn(4)),
        (nn.Hardsigmoid(inplace=True), torch.randn(4)),
        (nn.SiLU(), torch.randn(4)),
        (nn.Sigmoid(), torch.randn(4)),
        (nn.Tanh(), torch.randn(4)),
        (nn.GELU(approximate="tanh"), torch.randn(4)),
        (nn.MaxPool2d(2), torch.randn(1, 2, 4, 4)),
        (nn.AvgPool2d(2), torch.randn(1, 2, 4, 4)),
        (nn.AdaptiveAvgPool2d(1), torch.randn(1, 2, 4, 4)),
        (nn.AdaptiveAvgPool2d((2, None)), torch.randn(1, 2, 4, 4)),
        (nn.LayerNorm(4), torch.randn(3, 4)),
    ]
    assert {type(m) for m, _ in cases} == set(_RULES)
    for module, x in cases:
        rule = _RULES[type(module)]
        with torch.no_grad():
            out = module(x.clone())
        for func, _, _, _ in rule.calls(module, x, out):
            assert func.overloadpacket in rule.ops, (type(module).__name__, func)


def test_training_mode_batchnorm_and_dropout_keep_the_dispatch_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.ReLU())
    model.train()
    x = torch.randn(2, 3, 6, 6)
    results = []
    for fast in (False, True):
        c = OpCounter(model, fast_leaves=fast)
        with c, torch.no_grad():
            c.start_memory(list(model.parameters()) + list(model.buffers()) + [x])
            model(x)
        results.append(c)
    slow, fast = results
    assert fast.fast_calls == 2  # the conv and the ReLU
    assert dict(fast.tallies) == dict(slow.tallies)
    assert fast.memory.peak == slow.memory.peak
    assert fast.tallies["1"].other_flops == 5 * 2 * 4 * 16 + 1  # batch statistics, step count


def test_batchnorm_without_running_stats_keeps_the_dispatch_path():
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    x = torch.randn(2, 4, 5, 5)
    slow, _ = profile_both(bn, x)
    assert slow.other_flops >= 5 * x.numel()  # batch statistics in eval mode too
    assert fast_calls(bn, x) == 0


@pytest.mark.parametrize(
    "module, x",
    [
        pytest.param(
            nn.Conv2d(4, 8, 4, padding="same"),
            torch.randn(1, 4, 7, 7),
            marks=pytest.mark.filterwarnings("ignore:Using padding='same'"),
        ),
        (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), torch.randn(1, 4, 7, 7)),
        (nn.Conv2d(4, 8, 3), torch.randn(4, 7, 7)),  # unbatched
        (nn.MaxPool2d(2, return_indices=True), torch.randn(1, 4, 6, 6)),
        (nn.ReLU(), torch.randint(0, 5, (3, 4))),  # integer input
    ],
    ids=["same-padding", "reflect-padding", "unbatched", "return-indices", "integer"],
)
def test_other_operator_sequences_keep_the_dispatch_path(module, x):
    profile_both(module, x)
    assert fast_calls(module, x) == 0


def test_autocast_keeps_the_dispatch_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))
    x = torch.randn(2, 3, 10, 10)
    # one autocast region per profile: autocast caches the weights it casts until it exits,
    # so a second profile in the same region would not see (nor count the memory of) the casts
    with torch.autocast("cpu", dtype=torch.bfloat16), dispatch_path_only():
        slow = nnslim.profile(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = nnslim.profile(model, x)
    assert_same(slow, fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_calls(model, x) == 0
    assert slow.macs == (2 * 4 * 8 * 8) * 3 * 9 + 2 * 256 * 5


def test_an_outer_dispatch_mode_still_sees_every_operator():
    from torch.utils.flop_counter import FlopCounterMode

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))
    x = torch.randn(2, 3, 10, 10)
    totals = []
    for switch in (dispatch_path_only(), contextlib.nullcontext()):
        with switch, FlopCounterMode(display=False) as outer:
            p = nnslim.profile(model, x)
        totals.append((outer.get_total_flops(), p.macs))
    assert totals[0] == totals[1]
    assert totals[0][0] == 2 * totals[0][1]


def test_an_inner_dispatch_mode_keeps_the_dispatch_path():
    from torch.utils.flop_counter import FlopCounterMode

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            with FlopCounterMode(display=False):
                return self.conv(x)

    model = Inner()
    x = torch.randn(1, 3, 6, 6)
    profile_both(model, x)
    assert fast_calls(model, x) == 0


def test_a_failing_leaf_restores_the_mode_stack():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match="failed on example_inputs"):
        nnslim.profile(model, torch.randn(1, 5, 6, 6))  # wrong channel count
    assert torch._C._len_torch_dispatch_stack() == 0
    profile_both(model, torch.randn(1, 4, 6, 6))


def test_meta_tensors_keep_the_dispatch_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).to("meta")
    x = torch.randn(1, 3, 6, 6, device="meta")
    slow, _ = profile_both(model, x)
    assert slow.macs == 16 * 4 * 3 * 9
    assert fast_calls(model, x) == 0


# -- properties ---------------------------------------------------------------------------------
@given(
    dims=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4]),
    per_group=st.sampled_from([1, 2, 3]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    extra=st.integers(0, 4),
    bias=st.booleans(),
    batch=st.integers(1, 2),
)
def test_conv_fast_path_equals_dispatch_path(
    dims, groups, per_group, kernel, stride, padding, dilation, extra, bias, batch
):
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    cin = groups * per_group
    conv = conv_cls(cin, 2 * groups, kernel, stride, padding, dilation, groups, bias)
    size = dilation * (kernel - 1) + 1 + extra
    x = torch.randn(batch, cin, *([size] * dims))
    slow, fast = profile_both(conv, x)
    out_len = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    assert fast.macs == batch * 2 * groups * out_len**dims * per_group * kernel**dims
    assert fast_calls(conv, x) == 1


@given(
    kind=st.sampled_from(["max", "avg", "adaptive"]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 1),
    ceil_mode=st.booleans(),
    size=st.integers(3, 8),
    target=st.sampled_from([1, 2, 3, None]),
)
def test_pool_fast_path_equals_dispatch_path(
    kind, kernel, stride, padding, ceil_mode, size, target
):
    if padding * 2 > kernel:
        padding = 0  # torch requires pad <= kernel / 2
    if kind == "max":
        pool = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    elif kind == "avg":
        pool = nn.AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    else:
        pool = nn.AdaptiveAvgPool2d((target, 1))
    x = torch.randn(2, 3, size, size)
    profile_both(pool, x)
    assert fast_calls(pool, x) == 1


# -- the wrapped forwards (review of the forward-wrapping change) -------------------------------
class Introspecting(nn.Module):
    """Reads its child's forward the way Hugging Face generate reads self.forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.seen = None

    def forward(self, x):
        f = self.lin.forward
        self.seen = (list(inspect.signature(f).parameters), f.__name__, f.__self__ is self.lin)
        return self.lin(x)


def test_a_wrapped_forward_keeps_its_signature_and_names():
    model = Introspecting()
    profile_both(model, torch.randn(2, 8))
    assert model.seen == (["input"], "forward", True)


@pytest.mark.parametrize("memory", [True, False])
def test_a_copy_made_during_the_forward_runs_its_own_weights(memory):
    class Copying(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.copy = None

        def forward(self, x):
            self.copy = copy.deepcopy(self.lin)
            nn.init.zeros_(self.copy.weight)
            nn.init.zeros_(self.copy.bias)
            return self.copy(x)

    model = Copying()
    out = nnslim.profile(model, torch.randn(2, 4), memory=memory)
    assert out.macs == 2 * 4 * 4
    assert "forward" not in model.copy.__dict__ or not isinstance(
        model.copy.__dict__["forward"], counter._Forward
    )
    assert torch.equal(model.copy(torch.ones(1, 4)), torch.zeros(1, 4))


def test_modules_under_data_parallel_are_not_wrapped():
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            seen.append("forward" in self.__dict__)
            return super().forward(x)

    model = nn.DataParallel(nn.Sequential(Probe(8, 4), nn.ReLU()))  # no GPUs: runs in place
    p = nnslim.profile(model, torch.randn(2, 8))
    assert p.macs == 2 * 8 * 4 and seen == [False]


def test_counts_ended_out_of_order_leave_no_wrappers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    first, second = OpCounter(model, fast_leaves=True), OpCounter(model, fast_leaves=True)
    first._install()
    second._install()  # wraps the first's wrappers (another thread's count of the same model)
    kept = model[0].forward  # code that keeps a wrapper past its count
    first._uninstall()
    second._uninstall()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert torch.equal(kept(torch.ones(1, 4)), model[0](torch.ones(1, 4)))  # passes through
    assert not first.tallies and not second.tallies


def test_weight_moved_to_a_buffer_takes_the_dispatch_path():
    lin = nn.Linear(8, 4)
    w = lin.weight.detach().clone()
    del lin.weight
    lin.register_buffer("weight", w)
    unused = nn.Linear(8, 4)
    del unused.weight
    unused.register_buffer("weight", torch.zeros(4, 8))
    model = nn.ModuleDict({"lin": lin, "unused": unused})

    class Use(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m["lin"](x)

    slow, fast = profile_both(Use(), torch.randn(2, 8))
    assert fast.macs == 2 * 8 * 4 and fast_calls(Use(), torch.randn(2, 8)) == 0


def test_forward_as_a_property_is_still_counted():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        @property
        def forward(self):
            return self.lin.forward

    model = nn.Sequential(Switch(), nn.ReLU())
    slow, fast = profile_both(model, torch.randn(2, 8))
    assert fast.modules["0"].calls == 1 and fast.modules["0"].macs == 2 * 8 * 4


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("cls", [nn.MaxPool2d, nn.AvgPool2d])
def test_pool_with_a_one_value_kernel_tuple(cls, unbatched):
    pool = cls((3,), stride=1)
    x = torch.randn(2, 6, 6) if unbatched else torch.randn(1, 2, 6, 6)
    slow, fast = profile_both(pool, x)
    assert fast.other_flops == 2 * 4 * 4 * 9  # a 3x3 window per output


def test_the_fast_path_is_opt_in():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    assert fast_calls(model, x) == 2
    c = OpCounter(model)
    with preserved_state(model), c, torch.no_grad():
        model(x)
    assert c.fast_calls == 0  # the default counts every operator through the dispatcher
