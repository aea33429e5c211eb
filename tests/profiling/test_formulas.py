"""Operator formulas checked against a hand count and torch's FLOP counter."""

import pytest
import torch
from torch import nn

import nnslim


class _Experts(nn.Module):
    """Rows routed to one of 3 expert matrices through ``torch._grouped_mm`` (as transformers'
    mixture-of-experts banks run)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 16))  # [groups, in, out]

    def forward(self, x):
        offs = torch.tensor([2, 5, 7], dtype=torch.int32)  # rows 0-1, 2-4, 5-6
        return torch._grouped_mm(x, self.w, offs=offs)


def test_grouped_mm_counts_each_row_against_one_group():
    x = torch.randn(7, 8)
    p = nnslim.profile(_Experts(), x)
    assert "aten._grouped_mm" not in p.unsupported
    assert p.macs == 7 * 8 * 16


class _Mixed(nn.Module):
    """A grouped, a strided-dilated and a transposed convolution, linear layers on 2-D and 3-D
    inputs and a batched product: the matrix operators torch's FLOP table has on CPU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, output_padding=1, groups=2)
        self.fc = nn.Linear(6, 16)

    def forward(self, x):
        y = self.up(self.conv(x))  # (1, 6, H, W)
        t = self.fc(y.flatten(2).transpose(1, 2))  # (1, HW, 16)
        s = torch.bmm(t, t.transpose(1, 2))
        return self.fc(y.flatten(1)[:, :6]).sum() + s.sum()


def test_matrix_macs_are_torch_flop_counter_halved():
    """MACs of matrix work come from torch's FLOP formulas: the same count FlopCounterMode
    reports, halved (FLOPs = 2 x MACs), forward and backward alike except the convolution
    weight gradient (next test)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, x = _Mixed().eval(), torch.randn(1, 4, 9, 11)
    with FlopCounterMode(display=False) as fc:
        model(x)
    assert nnslim.profile(model, x).macs == fc.get_total_flops() // 2


def test_cpu_attention_counted_where_flop_counter_mode_misses_it():
    """CPU attention runs ``_scaled_dot_product_flash_attention_for_cpu``, which torch's FLOP
    table lacks (FlopCounterMode counts 0); nnslim counts QK^T and PV as for the CUDA kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 9, 8), torch.randn(2, 4, 9, 8)
    attn = nn.functional.scaled_dot_product_attention
    with FlopCounterMode(display=False) as fc:
        attn(q, k, v)
    assert fc.get_total_flops() == 0  # if torch counts it now, compare with its count instead
    macs = nnslim.profile(_Fn(attn), (q, k, v)).macs
    assert macs == 2 * 4 * 7 * 9 * (8 + 8)


@pytest.mark.parametrize(
    "q, k, v",
    [((2, 4, 7, 8), (2, 4, 9, 8), (2, 4, 9, 16)), ((1, 8, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4))],
    ids=["value-width", "gqa"],
)
def test_attention_formula_counts_what_torch_counts(q, k, v):
    """nnslim's attention formula (its own: torch's calls through a pytree wrapper that leaves
    reference cycles) gives torch's count, grouped-query attention included."""
    from torch.utils.flop_counter import sdpa_flop_count

    from nnslim.profiling.formulas import _attn_cost

    t = [torch.empty(s, device="meta") for s in (q, k, v)]
    assert _attn_cost(*t)[0] == sdpa_flop_count(q, k, v) // 2


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def test_grouped_conv_weight_gradient_counted_once():
    """torch 2.14's ``convolution_backward`` formula counts a grouped convolution's weight
    gradient ``groups`` times over; nnslim counts it as the forward's work. If this fails
    because torch agrees now, delegate ``convolution_backward`` to torch's table too."""
    from torch.utils.flop_counter import flop_registry

    from nnslim.profiling.formulas import cost_of

    aten = torch.ops.aten
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 2, 3, 3)  # groups=4
    out = torch.empty(2, 8, 4, 4)
    args = (out, x, w, [8], [1, 1], [0, 0], [1, 1], False, [0, 0], 4, [False, True, False])
    forward = out.numel() * 2 * 9  # each output sums in/groups x k x k products
    assert cost_of(aten.convolution_backward.default, args, {}, None) == (forward, 0)
    grads = (None, torch.empty_like(w), None)
    torch_macs = flop_registry[aten.convolution_backward](*args, out_val=grads) // 2
    assert torch_macs == 4 * forward
