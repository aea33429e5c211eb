import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.quantized import Int8Conv2d, Int8Linear, quantize_per_channel
from nnslim.testing import assert_same_state, model_state
from tests.zoo import TinyCNN


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).norm() / b.float().norm())


@given(k=st.sampled_from([8, 16, 24, 64, 12, 60, 65]), n=st.integers(1, 40), m=st.integers(1, 9))
def test_int8_linear_error_bounded_on_every_width(k, n, m):
    # widths that are not multiples of 8 take the dequantize path (the int8 kernel mis-computes)
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    q = Int8Linear.from_float(lin)
    x = torch.randn(m, k)
    # bf16 activations: a few outputs may be off by ~1%; large layers stay under 1% (below)
    assert rel_err(q(x), lin(x)) < 0.03


def test_int8_linear_error_under_one_percent_on_gaussian_weights():
    lin = nn.Linear(512, 256)
    q = Int8Linear.from_float(lin)
    with torch.no_grad():
        x = torch.randn(32, 512)
        assert rel_err(q(x), lin(x)) < 0.01


def test_int8_linear_3d_input_and_dtype():
    lin = nn.Linear(64, 32)
    q = Int8Linear.from_float(lin)
    x = torch.randn(2, 5, 64)
    y = q(x)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float32


def test_quantize_per_channel_round_trip():
    w = torch.randn(16, 32)
    q, s = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.allclose(q.float() * s[:, None], w, atol=float(s.max()) / 2 + 1e-7)
    zero = torch.zeros(3, 4)
    q, s = quantize_per_channel(zero)
    assert torch.equal(q, torch.zeros_like(q, dtype=torch.int8)) and torch.equal(s, torch.ones(3))


def test_int8_conv_matches_dequantized_float_conv():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    q = Int8Conv2d.from_float(conv)
    x = torch.randn(1, 4, 7, 7)
    ref = nn.functional.conv2d(x, q.dequantize(), conv.bias, 1, 1, 1, 2)
    assert torch.equal(q(x), ref)
    assert rel_err(q(x), conv(x)) < 0.01


def test_quantize_model_shrinks_weights_4x(cnn):
    x = torch.randn(2, 3, 8, 8)
    ref = cnn(x)
    report = nnslim.Quantize().apply(cnn, x)
    assert isinstance(cnn.conv1, Int8Conv2d) and isinstance(cnn.fc, Int8Linear)
    layers = [m for m in TinyCNN().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = sum(m.weight.numel() for m in layers)
    scales = sum(m.weight.shape[0] for m in layers)
    # 1 byte per weight instead of 4, plus one fp32 scale per output channel
    assert report.after.param_bytes == report.before.param_bytes - 3 * weights + 4 * scales
    assert rel_err(cnn(x), ref) < 0.02
    assert report.touched == ["conv1", "conv2", "fc"]


def test_quantize_select_and_exclude(cnn):
    report = nnslim.Quantize(exclude="fc").apply(cnn, torch.randn(1, 3, 8, 8))
    assert isinstance(cnn.fc, nn.Linear)
    assert ("fc", "excluded") in [(s.path, s.reason) for s in report.skips]


def test_embeddings_are_skipped_and_listed():
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    report = nnslim.Quantize().apply(m, torch.tensor([[1, 2]]))
    assert isinstance(m[0], nn.Embedding)
    assert ("0", "embeddings stay in float (select it by name to quantize it)") in [
        (s.path, s.reason) for s in report.skips
    ]


def test_bad_scheme():
    with pytest.raises(ValueError, match="unknown value 'int3'; supported: 'int8'"):
        nnslim.Quantize(scheme="int3")


def test_nan_weights_name_the_module(cnn):
    with torch.no_grad():
        cnn.conv2.weight[0, 0, 0, 0] = float("nan")
    before = model_state(cnn)
    with pytest.raises(ValueError, match=r"module conv2 \(Conv2d 8->16 k3x3\) has NaN or Inf"):
        nnslim.Quantize().apply(cnn)
    assert_same_state(before, model_state(cnn), "after NaN error")


# -- schemes ---------------------------------------------------------------------------------------
from nnslim.modules.quantized import (
    Int4Linear,
    Int8DynamicLinear,
    pack_int4,
    quantize_groupwise,
    unpack_int4,
)


@given(k=st.sampled_from([32, 64, 128]), n=st.integers(1, 40), m=st.integers(1, 6))
def test_int4_matches_its_dequantized_weight(k, n, m):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    q = Int4Linear.from_float(lin, group_size=32)
    x = torch.randn(m, k)
    with torch.no_grad():
        ref = nn.functional.linear(x, q.dequantize(), lin.bias)
        assert rel_err(q(x), ref) < 0.01  # bf16 activations only


def test_int4_error_and_size_on_gaussian_weights():
    torch.manual_seed(0)
    lin = nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.normal_()
    q = Int4Linear.from_float(lin, group_size=128)
    x = torch.randn(16, 512)
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < 0.12
    p = nnslim.profile(q, x)
    fp32 = nnslim.profile(lin, x)
    weight_bytes = p.param_bytes - 256 * 4  # minus the fp32 bias
    assert (
        weight_bytes == 512 * 256 // 2 + 2 * 2 * 256 * 4
    )  # nibbles + bf16 scale and min per group
    assert (fp32.param_bytes - 256 * 4) / weight_bytes > 7


@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    shift=st.sampled_from([0.0, 2.0, -2.0]),
)
def test_int4_integer_zero_points_hold_the_codes_exactly(rows, groups, seed, shift):
    """zero_point="integer": each group's minimum is -zp * scale for an integer zp in
    [0, 15] (the range widened to include 0, so all-positive or all-negative groups too), the
    layer dequantizes to exactly (q - zp) * scale, and rounds no worse than half a step."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 32 * groups, generator=g) + shift
    lin = nn.Linear(w.shape[1], rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = Int4Linear.from_float(lin, group_size=32, zero_point="integer")
    assert q.mins.dtype == torch.float32 and q.zero_point == "integer"
    zp = q.zero_points()
    assert zp is not None and int(zp.max()) <= 15
    codes = unpack_int4(q.qweight).float().reshape(rows, groups, 32)
    scale = q.scales.float()
    exact = ((codes - zp.float()[..., None]) * scale[..., None]).reshape(rows, -1)
    assert torch.equal(q.dequantize(), exact)
    step = scale.repeat_interleave(32, dim=1)
    err = (q.dequantize() - w).abs()
    inside = (codes > 0) & (codes < 15)  # the ends take up to a step: zp is rounded
    assert (err[inside.reshape(rows, -1)] <= step[inside.reshape(rows, -1)] / 2 + 1e-6).all()
    assert (err <= 1.05 * step).all()
    # the float grid's layers have no integer zero points (in general), and saying they do
    # is refused
    assert Int4Linear.from_float(lin, group_size=32).zero_points() is None or shift == 0.0
    c, s_, mn = quantize_groupwise(w, 32)
    with pytest.raises(ValueError, match="not -zp \\* scale"):
        Int4Linear.from_codes(lin, c, s_, mn + 0.3 * s_, 32, zero_point="integer")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_with_integer_zero_points_saves_and_loads_exactly(tmp_path, method):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(64, 64)
    ref = base(x).detach()
    m = copy.deepcopy(base)
    report = nnslim.Quantize(
        scheme="int4", group_size=32, method=method, zero_point="integer"
    ).apply(m, calibration=[x])
    assert all(c.details["zero_point"] == "integer" for c in report.changes)
    assert all(m[i].zero_points() is not None for i in (0, 2))
    with torch.no_grad():
        float_grid = copy.deepcopy(base)
        nnslim.Quantize(scheme="int4", group_size=32, method=method).apply(
            float_grid, calibration=[x]
        )
        # the integer grid costs little against the float minimum
        assert rel_err(m(x), ref) < 1.3 * rel_err(float_grid(x), ref) + 0.01
    nnslim.save(m, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", copy.deepcopy(base))
    assert back[0].mins.dtype == torch.float32
    mine, theirs = m.state_dict(), back.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    with pytest.raises(ValueError, match="zero_point='integer' is for post-training"):
        nnslim.Quantize(scheme="int4", qat=True, zero_point="integer")
    with pytest.raises(ValueError, match="zero_point"):
        nnslim.Quantize(scheme="int4", zero_point="int")


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (5, 8))
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    codes, scale, mn = quantize_groupwise(torch.randn(4, 64), 32)
    assert codes.min() >= 0 and codes.max() <= 15 and scale.shape == (4, 2)


def test_int8_dynamic_error_bounded():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    q = Int8DynamicLinear.from_float(lin)
    x = torch.randn(8, 256)
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < 0.03  # 7-bit activations on CPUs without VNNI


def test_schemes_replace_modules_and_report_bits():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    report = nnslim.Quantize(
        scheme="int8", group_size=32, select={"0": "int4", "2": "int8-dynamic"}
    ).apply(m, torch.randn(2, 64))
    assert [type(x).__name__ for x in m if not isinstance(x, nn.ReLU)] == [
        "Int4Linear",
        "Int8DynamicLinear",
        "Linear",
    ]
    bits = {c.path: c.details["bits"] for c in report.changes}
    assert bits == {"0": 4, "2": 8}


@pytest.mark.parametrize(
    "width, wanted, group, padded",
    [
        (256, 128, 128, None),
        (64, 128, 64, None),
        (48, 128, 64, 64),
        (80, 128, 32, 96),
        (440, 128, 64, 448),
        (16, 32, 32, 32),
        (96, 64, 32, None),
    ],
)
def test_int4_group_size_fits_each_layer(width, wanted, group, padded):
    # the requested group size is a default, not a demand every layer must meet
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(width, 24), nn.ReLU(), nn.Linear(24, 8))
    x = torch.randn(5, width)
    ref = m(x)
    report = nnslim.Quantize(scheme="int4", group_size=wanted).apply(m, x)
    change = {c.path: c for c in report.changes}["0"]
    assert m[0].group_size == change.details["group_size"] == group
    assert change.details.get("padded_to") == padded
    assert m[0].in_features == width and m[0].padded_in_features == (padded or width)
    assert m[0].weight.shape == (24, width)
    # the layer computes what its de-quantized weight computes
    y = m[0](x)
    assert torch.allclose(y, F.linear(x, m[0].weight, m[0].bias), atol=0.05, rtol=0.02)
    assert (m(x) - ref).norm() / ref.norm() < 0.2


def test_int4_gptq_on_a_padded_width_matches_its_rtn_grid_or_beats_it():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(80, 32))
    calib = [torch.randn(16, 80) for _ in range(4)]
    x = torch.cat(calib)
    errs = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(base)
        nnslim.Quantize(scheme="int4", method=method).apply(m, calibration=calib)
        assert m[0].group_size == 32 and m[0].padded_in_features == 96
        with torch.no_grad():
            errs[method] = float((m(x) - base(x)).pow(2).mean())
    assert errs["gptq"] <= errs["rtn"]


def test_int4_qat_on_a_padded_width_converts_to_the_same_function():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(80, 16))
    nnslim.Quantize(scheme="int4", qat=True).apply(m)
    x = torch.randn(4, 80)
    fake = m(x)
    nnslim.convert(m)
    assert type(m[0]).__name__ == "Int4Linear" and m[0].group_size == 32
    assert torch.allclose(m(x), fake, atol=0.05, rtol=0.02)


def test_int4_group_size_must_be_an_allowed_one():
    with pytest.raises(ValueError, match="supported: 32, 64, 128"):
        nnslim.Quantize(scheme="int4", group_size=48)


def test_conv_has_only_int8_storage():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    report = nnslim.Quantize(scheme="int4", group_size=32).apply(m, torch.randn(1, 3, 8, 8))
    assert ("0", "Conv2d has no int4 kernel (int8 storage only)") in [
        (s.path, s.reason) for s in report.skips
    ]
    assert type(m[2]).__name__ == "Int4Linear"
    with pytest.raises(ValueError, match="conv2 .* is a Conv2d; convolutions support only int8"):
        nnslim.Quantize(scheme="int4", select={"conv2": "int4"}).apply(
            TinyCNN(), torch.randn(1, 3, 8, 8)
        )


# -- calibration ----------------------------------------------------------------------------------
def correlated_inputs(n, k, seed=0):
    """Inputs that live near a k/4-dimensional subspace (the same for every seed)."""
    mix = torch.randn(k // 4, k, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k // 4, generator=g) @ mix + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_gptq_beats_round_to_nearest_on_layer_output(scheme, act_order):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(128, 64))
    calib = [correlated_inputs(256, 128, s) for s in range(2)]
    test = correlated_inputs(256, 128, 9)
    with torch.no_grad():
        ref = base(test)
    errs = {}
    codes = {}
    for method in ("rtn", "gptq"):
        m = nn.Sequential(nn.Linear(128, 64))
        m.load_state_dict(base.state_dict())
        t = nnslim.Quantize(scheme=scheme, group_size=32, method=method, act_order=act_order)
        t.apply(m, calibration=calib)
        codes[method] = m[0].qweight.clone()
        with torch.no_grad():
            errs[method] = rel_err(m(test), ref)
    assert errs["gptq"] < 0.8 * errs["rtn"], errs
    other = nn.Sequential(nn.Linear(128, 64))
    other.load_state_dict(base.state_dict())
    nnslim.Quantize(scheme=scheme, group_size=32, method="gptq", act_order=not act_order).apply(
        other, calibration=calib
    )
    assert not torch.equal(other[0].qweight, codes["gptq"])  # the order changes the result


@given(
    rows=st.integers(1, 8),
    group=st.sampled_from([4, 16, 32]),
    seed=st.integers(0, 2**16),
    shrink=st.sampled_from([0.1, 0.2, 0.5]),
)
def test_clipped_int4_grid_never_rounds_worse_than_min_max(rows, group, seed, shrink):
    from nnslim.transforms.gptq import rtn_int4_grid

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, group, generator=g) ** 3  # heavy tails
    imp = torch.rand(group, generator=g) + 0.1
    s0, mn0, q0 = rtn_int4_grid(w)
    # min/max, rounded to bf16 as Int4Linear stores them (so the codes fit the stored grid)
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    assert torch.equal(mn0, bf16(w.amin(1)))
    assert torch.equal(s0, bf16(((w.amax(1) - w.amin(1)) / 15).clamp_min(1e-8)))
    s1, mn1, q1 = rtn_int4_grid(w, imp, shrink=shrink)
    assert (s1 <= s0 + 1e-7).all()  # narrower or equal, never wider

    def err(q):
        return ((q(w.T)[1].T - w) ** 2 * imp).sum(1)

    assert (err(q1) <= err(q0) * (1 + 1e-5) + 1e-9).all()


def test_gptq_clipping_lowers_the_output_error_with_heavy_tails():
    from nnslim.transforms.gptq import gptq

    torch.manual_seed(0)
    x = torch.randn(2048, 256) @ (torch.randn(256, 256) * 0.1 + torch.eye(256))
    x[:, :4] *= 10
    w = torch.distributions.StudentT(4).sample((256, 256)) * 0.02
    ref = x @ w.T
    errs = []
    for clip in (0.0, 0.2):
        codes, s, mn = gptq(w, x.T @ x, bits=4, group_size=64, clip=clip)
        wq = (codes.float().reshape(256, -1, 64) * s[..., None] + mn[..., None]).reshape(256, 256)
        errs.append(float((x @ wq.T - ref).norm() / ref.norm()))
    assert errs[1] < 0.97 * errs[0], errs


def test_smoothquant_helps_with_outlier_channels():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 32))
    scale = torch.ones(64)
    scale[:4] = 50.0  # outlier input channels
    calib = [torch.randn(64, 64) * scale for _ in range(2)]
    test = torch.randn(64, 64) * scale
    with torch.no_grad():
        ref = base(test)
    errs = {}
    for smooth in (None, 0.5):
        m = nn.Sequential(nn.Linear(64, 32))
        m.load_state_dict(base.state_dict())
        nnslim.Quantize(scheme="int8-dynamic", smooth=smooth).apply(m, calibration=calib)
        with torch.no_grad():
            errs[smooth] = rel_err(m(test), ref)
    assert errs[0.5] < 0.7 * errs[None], errs


def test_awq_auto_no_worse_than_rtn_int4():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(128, 64))
    scale = torch.ones(128)
    scale[:8] = 20.0
    calib = [torch.randn(128, 128) * scale for _ in range(2)]
    test = torch.randn(128, 128) * scale
    with torch.no_grad():
        ref = base(test)
    errs = {}
    for smooth in (None, "auto"):
        m = nn.Sequential(nn.Linear(128, 64))
        m.load_state_dict(base.state_dict())
        report = nnslim.Quantize(scheme="int4", group_size=32, smooth=smooth).apply(
            m, calibration=calib
        )
        with torch.no_grad():
            errs[smooth] = rel_err(m(test), ref)
    assert errs["auto"] <= errs[None] * 1.001, errs
    assert "smooth_alpha" in report.changes[0].details


def test_calibration_methods_need_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        nnslim.Quantize(method="gptq").apply(nn.Sequential(nn.Linear(8, 8)), torch.randn(1, 8))


def test_bad_smooth_and_qat_combinations():
    with pytest.raises(ValueError, match=r"smooth=...\): expected a number in \[0.0, 1.0\]"):
        nnslim.Quantize(scheme="int8-dynamic", smooth=1.5)
    with pytest.raises(ValueError, match="do not combine it with gptq"):
        nnslim.Quantize(qat=True, method="gptq")


# -- QAT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4", "int8-dynamic"])
def test_qat_trains_then_converts_to_the_same_function(scheme):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(16, 64)
    y = torch.randint(0, 4, (16,))
    nnslim.Quantize(scheme=scheme, group_size=32, qat=True, select=["0", "2"]).apply(m, x)
    assert type(m[0]).__name__ == "FakeQuantLinear"
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w0 = m[0].weight.detach().clone()
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0  # straight-through
    opt.step()
    assert not torch.equal(m[0].weight, w0)
    with torch.no_grad():
        fake = m(x)
    report = nnslim.convert(m, x)
    assert [c.path for c in report.changes] == ["0", "2"]
    with torch.no_grad():
        assert rel_err(m(x), fake) < 0.03  # same grid; kernels use bf16/7-bit activations


def test_convert_without_fake_quant_modules():
    with pytest.raises(ValueError, match="no fake-quant modules"):
        nnslim.convert(nn.Sequential(nn.Linear(4, 4)))


def test_packed_layouts_are_dropped_when_moved():
    """Moving a quantized layer (``.to("meta")`` while streaming) frees its packed kernel copy
    (kept per weight tensor: the old tensor and its packed copy go together)."""
    import gc
    import weakref

    from nnslim.modules import kernels, quantized

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 64)
    for cls in (quantized.Int4Linear, quantized.Int8DynamicLinear):
        m = cls.from_float(lin, 32) if cls is quantized.Int4Linear else cls.from_float(lin)
        y = m(x)
        assert kernels._packed_of(m.qweight) is not None
        old, old_id = weakref.ref(m.qweight), id(m.qweight)
        m.to("meta")
        gc.collect()
        assert old() is None and old_id not in kernels._PACKED
        m.to_empty(device="cpu")  # and a later forward packs the new tensors
        assert m(x).shape == y.shape
        assert kernels._packed_of(m.qweight) is not None
