"""Which layers transforms replace: subclasses of the standard layers, and why others are kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnslim
from nnslim.base.modules import (
    is_conv2d,
    is_hf_conv1d,
    is_linear,
    layer_skip_reason,
    linear_weight,
    out_width,
    unreplaceable,
    weight_rows,
)


class TimmLinear(nn.Linear):
    """timm's ``Linear``: a subclass that keeps nn.Linear's forward (adds a method)."""

    def extra(self):
        return 1


class ScaledLinear(nn.Linear):
    """A subclass that computes something else: it must not be replaced."""

    def forward(self, x):
        return 2 * F.linear(x, self.weight, self.bias)


class SameConv(nn.Conv2d):
    """timm's ``Conv2dSame``-style override of the convolution itself."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias, self.stride, 0)


def test_subclass_that_keeps_the_forward_is_a_linear():
    assert is_linear(TimmLinear(4, 4)) and is_linear(nn.Linear(4, 4))
    assert not is_linear(ScaledLinear(4, 4))
    assert is_conv2d(nn.Conv2d(3, 3, 3)) and not is_conv2d(SameConv(3, 3, 3))
    assert "overrides its forward" in layer_skip_reason(ScaledLinear(4, 4))
    assert layer_skip_reason(nn.ReLU()) is None


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SameConv(3, 8, 3)
        self.body = TimmLinear(8, 16)
        self.odd = ScaledLinear(16, 16)
        self.head = TimmLinear(16, 4)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.head(torch.relu(self.odd(torch.relu(self.body(x)))))


@pytest.mark.parametrize(
    "transform, kinds",
    [
        (nnslim.Quantize(scheme="int8-dynamic"), {"body": "Int8DynamicLinear"}),
        (nnslim.Quantize(scheme="int8"), {"body": "Int8Linear", "head": "Int8Linear"}),
        (nnslim.Factorize(rank=2), {"body": "FactorizedLinear", "head": "FactorizedLinear"}),
        (nnslim.ShareWeights(clusters=4), {"body": "PalettizedLinear", "head": "PalettizedLinear"}),
    ],
    ids=["int8-dynamic", "int8", "factorize", "share"],
)
def test_transforms_take_subclasses_and_list_what_they_leave(transform, kinds):
    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(2, 3, 8, 8)
    report = transform.apply(model, x)
    for path, kind in kinds.items():
        assert type(model.get_submodule(path)).__name__ == kind, path
    skips = {s.path: s.reason for s in report.skips}
    assert "overrides its forward" in skips["odd"]
    assert "overrides its forward" in skips["conv"]
    assert isinstance(model.odd, ScaledLinear) and isinstance(model.conv, SameConv)


def test_multihead_attention_projection_is_listed_not_replaced():
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)).eval()
    left = unreplaceable(model)
    assert "nn.MultiheadAttention reads" in left["0.self_attn.out_proj"]
    report = nnslim.Quantize(scheme="int8").apply(model, torch.randn(1, 5, 16))
    assert "0.self_attn.out_proj" in {s.path for s in report.skips}
    assert type(model[0].linear1).__name__ == "Int8Linear"


def test_nothing_to_quantize_says_why():
    model = nn.Sequential(ScaledLinear(4, 4)).eval()
    with pytest.raises(ValueError, match="has no nn.Linear, Hugging Face Conv1D or nn.Conv2d"):
        nnslim.Quantize(scheme="int8-dynamic").apply(model, torch.randn(1, 4))


def test_convolutions_only_model_is_a_no_op_that_says_why_int8_dynamic_has_nothing():
    """Every candidate is skipped with its reason, as a single layer that cannot take the scheme
    is; the report says why nothing changed (an explicit request still raises)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).eval()
    report = nnslim.Quantize(scheme="int8-dynamic").apply(model, torch.randn(1, 3, 8, 8))
    assert not report.all_changes() and type(model[0]) is torch.nn.Conv2d
    assert [(s.path, s.reason) for s in report.skips] == [
        ("0", "Conv2d has no int8-dynamic kernel (int8 storage only)")
    ]
    assert any("Quantize changed nothing" in n for n in report.notes)
    with pytest.raises(ValueError, match="is a Conv2d; convolutions support only int8"):
        nnslim.Quantize(scheme="int8-dynamic", select=["0"]).apply(model, torch.randn(1, 3, 8, 8))


def test_a_subclass_overriding_forward_with_the_same_function_is_a_layer():
    import torch.nn.functional as F

    from nnslim.base.modules import is_conv2d, is_linear

    class TimmLinear(nn.Linear):  # timm.layers.Linear / FalconLinear
        def forward(self, x):
            return x @ self.weight.T + self.bias

    class SameConv(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    class Scaled(nn.Linear):  # extra state: never assumed equal, even while it is
        def __init__(self, *a):
            super().__init__(*a)
            self.gain = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return super().forward(x) * self.gain

    assert is_linear(TimmLinear(5, 3)) and layer_skip_reason(TimmLinear(5, 3)) is None
    assert is_conv2d(SameConv(3, 4, 3, padding=1))
    assert not is_linear(Scaled(5, 3)) and "another function" in layer_skip_reason(Scaled(5, 3))
    m = nn.Sequential(TimmLinear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    ref = m(x)
    report = nnslim.Quantize(scheme="int8-dynamic").apply(m, x)
    assert "0" in {c.path for c in report.changes}
    assert (m(x) - ref).abs().max() < 0.1 * ref.abs().max()


def test_one_answer_to_which_way_a_linear_like_weight_is_stored():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(6, 4)  # nf=6, nx=4
    lin, conv = nn.Linear(4, 6), nn.Conv2d(4, 6, 3)
    assert is_hf_conv1d(conv1d) and not is_hf_conv1d(lin)
    assert out_width(conv1d) == out_width(lin) == out_width(conv) == 6
    assert out_width(nn.LayerNorm(6)) is None
    assert linear_weight(conv1d).shape == linear_weight(lin).shape == (6, 4)
    assert torch.equal(weight_rows(conv1d.weight, conv1d), conv1d.weight.t())
    assert weight_rows(conv.weight, conv).shape == (6, 36)
    # the same function: y = x W^T + b with W (out, in)
    x = torch.randn(2, 4)
    assert torch.allclose(conv1d(x), F.linear(x, linear_weight(conv1d), conv1d.bias))
