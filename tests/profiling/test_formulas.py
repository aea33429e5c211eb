"""Operator formulas checked against a hand count."""

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
