import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.quantized import Int8Conv2d, Int8Linear, quantize_per_channel
from nnslim.testing import model_state
from nnslim.testing.checks import _assert_same_state
from tests.models import TinyCNN


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
    assert ("fc", "not selected") in [(s.path, s.reason) for s in report.skips]


def test_embeddings_are_skipped_and_listed():
    m = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    report = nnslim.Quantize().apply(m, torch.tensor([[1, 2]]))
    assert isinstance(m[0], nn.Embedding)
    assert ("0", "embeddings stay in float") in [(s.path, s.reason) for s in report.skips]


def test_bad_scheme():
    with pytest.raises(ValueError, match="unknown value 'int3'; supported: 'int8'"):
        nnslim.Quantize(scheme="int3")


def test_nan_weights_name_the_module(cnn):
    with torch.no_grad():
        cnn.conv2.weight[0, 0, 0, 0] = float("nan")
    before = model_state(cnn)
    with pytest.raises(ValueError, match=r"module conv2 \(Conv2d 8->16 k3x3\) has NaN or Inf"):
        nnslim.Quantize().apply(cnn)
    _assert_same_state(before, model_state(cnn), "after NaN error")
