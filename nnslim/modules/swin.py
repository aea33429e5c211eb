"""torchvision's Swin attention with a head size of its own, so heads can be pruned.

torchvision's ``shifted_window_attention`` derives the head size from the input width
(``C // num_heads``), which ties the heads to the embedding width. The modules here are
subclasses of torchvision's ``ShiftedWindowAttention``/``ShiftedWindowAttentionV2`` that keep
``head_dim`` as an attribute and run a copy of the function (BSD-3-Clause, from torchvision
0.29) that uses it. With all heads kept they compute exactly what torchvision's modules compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # torchvision is optional
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2
except Exception:  # pragma: no cover
    ShiftedWindowAttention = ShiftedWindowAttentionV2 = None  # type: ignore[assignment,misc]

__all__ = [
    "HeadPrunableSwinAttention",
    "HeadPrunableSwinAttentionV2",
    "convert",
    "shifted_window_attention",
]


def shifted_window_attention(
    input: Tensor,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    relative_position_bias: Tensor,
    window_size: list[int],
    num_heads: int,
    head_dim: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Tensor | None = None,
    proj_bias: Tensor | None = None,
    logit_scale: Tensor | None = None,
    training: bool = True,
) -> Tensor:
    """torchvision's window attention with an explicit ``head_dim`` (see module docstring)."""
    B, H, W, C = input.shape
    inner = num_heads * head_dim
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = shift_size.copy()
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(
        B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length : 2 * length].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(logit_scale, max=math.log(100.0)).exp()
        attn = attn * logit_scale
    else:
        q = q * head_dim**-0.5
        attn = q.matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(
            pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1]
        )
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(
            num_windows, window_size[0] * window_size[1]
        )
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, (-100.0)).masked_fill(attn_mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    C_out = x.shape[-1]
    x = x.view(
        B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C_out
    )
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C_out)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


if ShiftedWindowAttention is not None:

    class HeadPrunableSwinAttention(ShiftedWindowAttention):
        """torchvision ``ShiftedWindowAttention`` with its own ``head_dim``."""

        def forward(self, x: Tensor) -> Tensor:
            return shifted_window_attention(
                x,
                self.qkv.weight,
                self.proj.weight,
                self.get_relative_position_bias(),
                self.window_size,
                self.num_heads,
                self.head_dim,
                shift_size=self.shift_size,
                attention_dropout=self.attention_dropout,
                dropout=self.dropout,
                qkv_bias=self.qkv.bias,
                proj_bias=self.proj.bias,
                training=self.training,
            )

    class HeadPrunableSwinAttentionV2(ShiftedWindowAttentionV2):
        """torchvision ``ShiftedWindowAttentionV2`` with its own ``head_dim``."""

        def forward(self, x: Tensor) -> Tensor:
            return shifted_window_attention(
                x,
                self.qkv.weight,
                self.proj.weight,
                self.get_relative_position_bias(),
                self.window_size,
                self.num_heads,
                self.head_dim,
                shift_size=self.shift_size,
                attention_dropout=self.attention_dropout,
                dropout=self.dropout,
                qkv_bias=self.qkv.bias,
                proj_bias=self.proj.bias,
                logit_scale=self.logit_scale,
                training=self.training,
            )


def convert(module: torch.nn.Module, head_dim: int | None = None) -> torch.nn.Module:
    """A head-prunable twin of a torchvision Swin attention module, sharing its tensors."""
    cls = (
        HeadPrunableSwinAttentionV2
        if isinstance(module, ShiftedWindowAttentionV2)
        else HeadPrunableSwinAttention
    )
    new = cls.__new__(cls)
    new.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    new.head_dim = head_dim or module.qkv.out_features // 3 // module.num_heads
    new.window_size = list(module.window_size)
    new.shift_size = list(module.shift_size)
    return new
