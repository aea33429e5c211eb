"""Replaced layers answer what the layer they replace answers, and take any input layout."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.factorized import FactorizedConv2d, FactorizedLinear
from nnslim.modules.quantized import Int4Linear, Int8Conv2d, Int8DynamicLinear, Int8Linear
from nnslim.modules.shared import PalettizedConv2d, PalettizedLinear


def _linear_variants(lin):
    return {
        "int8": Int8Linear.from_float(lin),
        "int8-dynamic": Int8DynamicLinear.from_float(lin),
        "int4": Int4Linear.from_float(lin, 32),
        "palettized": PalettizedLinear.from_float(lin, clusters=16),
    }


def _factorized_linear(lin, rank):
    f = FactorizedLinear(lin.in_features, lin.out_features, rank, bias=lin.bias is not None)
    u, s, vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    with torch.no_grad():
        f.first.weight.copy_(vh[:rank] * s[:rank, None])
        f.second.weight.copy_(u[:, :rank])
        if lin.bias is not None:
            f.second.bias.copy_(lin.bias)
    return f


@pytest.mark.parametrize("kind", ["int8", "int8-dynamic", "int4", "palettized", "factorized"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_replacements_answer_like_nn_linear(kind, bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=bias)
    new = _factorized_linear(lin, 8) if kind == "factorized" else _linear_variants(lin)[kind]
    assert (new.in_features, new.out_features) == (64, 24)
    w = new.weight
    assert w.shape == (24, 64) and w.dtype == torch.float32 and w.device == lin.weight.device
    # palettized layers train their codebook through the weight; the others hold no float one
    assert w.requires_grad == (kind == "palettized")
    assert (new.bias is None) == (not bias)
    # the weight it reports is the one it computes with
    x = torch.randn(3, 64)
    tol = 1e-5 if kind in ("palettized", "factorized") else 0.05  # the others compute in bf16
    assert torch.allclose(new(x), F.linear(x, w, new.bias), atol=tol, rtol=tol)
    # a write into the reported weight does not reach the layer (it is rebuilt on access)
    with torch.no_grad():
        w.zero_()
    assert new.weight.abs().sum() > 0
    # the state is the layer's own tensors: no dense weight is stored
    assert "weight" not in new.state_dict()


@pytest.mark.parametrize("kind", ["int8", "int8-dynamic", "int4", "palettized"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype_moves_the_reported_weight_and_runs(kind, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    new = _linear_variants(lin)[kind].to(dtype)
    assert new.weight.dtype == dtype
    x = torch.randn(3, 64)
    y = new(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.allclose(y.float(), new.float()(x), atol=0.1, rtol=0.05)
    assert new.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["int8", "int8-dynamic", "int4"])
def test_a_dtype_cast_keeps_the_stored_scales_exact(kind):
    """``.half()`` converted bf16 int4 scales (and fp32 int8 ones) to fp16, whose range ends
    near 6e-8: tiny scales underflowed to zero and a cast back lost bits. The scales, minima
    and smoothing factors keep their dtype; the layer computes in the new one."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight[:4] *= 1e-7  # rows whose scale is below fp16's smallest subnormal
    new = _linear_variants(lin)[kind]
    before = {k: v.clone() for k, v in new.state_dict().items()}
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        cast(new)
        for name in ("scale", "scales", "mins"):
            if name in before:
                got = new.state_dict()[name]
                assert got.dtype == before[name].dtype and torch.equal(got, before[name])
    assert new.weight.dtype == torch.float32
    assert (new.weight[:4].abs().amax(1) > 0).all()  # the tiny rows are not wiped out


def test_int8_conv_and_palettized_and_factorized_conv_answer_like_nn_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    x = torch.randn(2, 8, 9, 9)
    for new in (Int8Conv2d.from_float(conv), PalettizedConv2d.from_float(conv, clusters=16)):
        assert (new.in_channels, new.out_channels, new.kernel_size) == (8, 12, (3, 3))
        assert new.weight.shape == conv.weight.shape and new.bias is not None
        ref = F.conv2d(x, new.weight, new.bias, new.stride, new.padding)
        assert torch.allclose(new(x), ref, atol=1e-5)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1))
    nnslim.Factorize(ratio=0.6).apply(model, x)
    f = model[0]
    assert isinstance(f, FactorizedConv2d)
    assert (f.in_channels, f.out_channels, f.kernel_size, f.stride, f.padding) == (
        8,
        12,
        (3, 3),
        (2, 2),
        (1, 1),
    )
    assert f.weight.shape == (12, 8, 3, 3)
    ref = F.conv2d(x, f.weight, f.bias, f.stride, f.padding, f.dilation)
    assert torch.allclose(f(x), ref, atol=1e-4)


def test_factorized_sizes_follow_pruned_factors():
    f = FactorizedLinear(32, 16, 8)
    f.second = nn.Linear(8, 10)
    assert (f.out_features, f.rank, f.weight.shape) == (10, 8, (10, 32))


LAYOUTS = ["plain", "transposed", "strided", "3d", "4d"]


def _input(layout, rows, width, scale=1.0):
    g = torch.Generator().manual_seed(rows * 31 + width)
    if layout == "plain":
        x = torch.randn(rows, width, generator=g)
    elif layout == "transposed":
        x = torch.randn(width, rows, generator=g).t()
    elif layout == "strided":
        x = torch.randn(rows, 2 * width, generator=g)[:, ::2]
    elif layout == "3d":
        x = torch.randn(2, width, rows, generator=g).transpose(1, 2)
    else:
        x = torch.randn(2, 2, rows, width, generator=g)
    return x * scale


@given(
    width=st.sampled_from([16, 48, 64, 80, 128]),
    out=st.sampled_from([1, 7, 16, 33]),
    rows=st.integers(1, 5),
    layout=st.sampled_from(LAYOUTS),
    kind=st.sampled_from(["int8", "int8-dynamic", "int4"]),
)
def test_quantized_linears_take_any_input_layout(width, out, rows, layout, kind):
    torch.manual_seed(width + out)
    lin = nn.Linear(width, out)
    new = _linear_variants(lin)[kind]
    x = _input(layout, rows, width)
    y = new(x)
    ref = F.linear(x, new.weight, new.bias)
    assert y.shape == ref.shape
    tol = 0.05 * float(ref.detach().abs().max()) + 0.05
    assert float((y - ref).abs().max()) <= tol


@pytest.mark.parametrize("scale", [1e-8, 1e-20, 1e-30])
def test_int8_dynamic_keeps_tiny_activations(scale):
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    new = Int8DynamicLinear.from_float(lin)
    x = torch.randn(4, 32) * scale
    y = new(x)
    ref = F.linear(x, new.weight)
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    y, ref = y.double() / scale, ref.double() / scale  # their norms would underflow in fp32
    assert float((y - ref).norm() / ref.norm()) < 0.05
