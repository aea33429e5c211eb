"""``nn.MultiheadAttention`` with separate projection modules, so whole heads can be pruned.

``nn.MultiheadAttention`` stores its query/key/value projections as one raw ``in_proj_weight``
and requires ``num_heads * head_dim == embed_dim``: removing a head would change the embedding
width of the whole residual stream. :class:`HeadPrunableMultiheadAttention` computes the same
function with a fused ``qkv`` ``nn.Linear`` (rows: query heads, then key heads, then value heads,
as in ``in_proj_weight``) and an ``out_proj`` ``nn.Linear``, with ``head_dim`` an attribute of
its own, so ``num_heads * head_dim`` may be smaller than ``embed_dim``. The call signature and
outputs are those of ``nn.MultiheadAttention`` (``batch_first``, unbatched inputs, key padding
and attention masks, boolean or float, ``need_weights``, ``average_attn_weights``,
``is_causal``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base.inputs import call_for_analysis
from ..base.modules import set_module
from ..base.snapshot import preserved_state

__all__ = ["HeadPrunableMultiheadAttention", "convertible"]


def convertible(m: nn.Module) -> str | None:
    """Why ``m`` (an ``nn.MultiheadAttention``) cannot be converted, or ``None`` if it can."""
    if not isinstance(m, nn.MultiheadAttention):
        return "not an nn.MultiheadAttention"
    if not m._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v weights)"
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return "add_bias_kv/add_zero_attn are not supported"
    return None


class HeadPrunableMultiheadAttention(nn.Module):
    """Multi-head attention whose heads can be removed (see the module docstring).

    Args:
        embed_dim: input and output width.
        num_heads: heads.
        head_dim: width of each head (``embed_dim // num_heads`` for a fresh module).
        dropout: dropout on the attention weights while training.
        bias: projections with biases.
        batch_first: inputs are ``(batch, seq, feature)``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim) if head_dim is not None else embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(embed_dim, 3 * inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, m: nn.MultiheadAttention) -> HeadPrunableMultiheadAttention:
        """The same function as ``m``, sharing its parameters (no copy)."""
        why = convertible(m)
        if why is not None:
            raise ValueError(f"HeadPrunableMultiheadAttention.from_torch: {why}.")
        with torch.device("meta"):
            new = cls(
                m.embed_dim,
                m.num_heads,
                m.head_dim,
                m.dropout,
                m.in_proj_bias is not None,
                m.batch_first,
            )
        new.qkv.weight = m.in_proj_weight
        new.qkv.bias = m.in_proj_bias
        new.out_proj.weight = m.out_proj.weight
        new.out_proj.bias = m.out_proj.bias
        new.train(m.training)
        return new

    def to_torch(self) -> nn.MultiheadAttention | None:
        """Back to an ``nn.MultiheadAttention`` sharing the parameters (``None`` when heads or
        widths were pruned, which it cannot represent)."""
        inner = self.num_heads * self.head_dim
        if not (inner == self.embed_dim == self.qkv.in_features == self.out_proj.out_features):
            return None
        with torch.device("meta"):
            m = nn.MultiheadAttention(
                self.embed_dim,
                self.num_heads,
                dropout=self.dropout,
                bias=self.qkv.bias is not None,
                batch_first=self.batch_first,
            )
        m.in_proj_weight = self.qkv.weight
        m.in_proj_bias = self.qkv.bias
        m.out_proj.weight = self.out_proj.weight
        m.out_proj.bias = self.out_proj.bias
        m.train(self.training)
        return m

    def nnslim_describe(self) -> str:
        return (
            f"MultiheadAttention {self.qkv.in_features}->{self.out_proj.out_features} "
            f"heads {self.num_heads}x{self.head_dim}"
        )

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        self_attention = query is key and key is value

        def to_nle(t: Tensor) -> Tensor:
            if not batched:
                return t.unsqueeze(0)
            return t if self.batch_first else t.transpose(0, 1)

        q_in, k_in, v_in = to_nle(query), to_nle(key), to_nle(value)
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        h, hd = self.num_heads, self.head_dim
        inner = h * hd
        if self_attention:
            q, k, v = self.qkv(q_in).split(inner, dim=-1)
        elif isinstance(self.qkv, nn.Linear):  # cross-attention: each input meets its rows
            w, b = self.qkv.weight, self.qkv.bias
            q, k, v = (
                F.linear(
                    x,
                    w[i * inner : (i + 1) * inner],
                    None if b is None else b[i * inner : (i + 1) * inner],
                )
                for i, x in enumerate((q_in, k_in, v_in))
            )
        else:  # a replaced projection (quantized...): run it whole on each input
            q, k, v = (
                self.qkv(x)[..., i * inner : (i + 1) * inner]
                for i, x in enumerate((q_in, k_in, v_in))
            )
        n, length = q.shape[0], q.shape[1]
        s = k.shape[1]
        q = q.reshape(n, length, h, hd).transpose(1, 2)
        k = k.reshape(n, s, h, hd).transpose(1, 2)
        v = v.reshape(n, s, h, hd).transpose(1, 2)
        mask = self._merge_masks(attn_mask, key_padding_mask, n, length, s, q.dtype, q.device)
        causal = bool(is_causal) and mask is None
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            if causal:
                keep = torch.ones(length, s, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~keep, float("-inf"))
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(dim=-1)
            if p > 0:
                attn = F.dropout(attn, p)
            out = attn @ v
            weights: Tensor | None = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal
            )
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, inner))
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _merge_masks(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        n: int,
        length: int,
        s: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor | None:
        """One additive float mask ``(N or 1, H or 1, L, S)``; boolean ``True`` masks out."""

        def additive(m: Tensor) -> Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(
                    m, float("-inf")
                )
            return m.to(dtype)

        out = None
        if attn_mask is not None:
            a = additive(attn_mask)
            a = (
                a.reshape(n, self.num_heads, length, s)
                if a.dim() == 3
                else a.reshape(1, 1, length, s)
            )
            out = a
        if key_padding_mask is not None:
            kp = additive(key_padding_mask).reshape(n, 1, 1, s)
            out = kp if out is None else out + kp
        return out


# -- conversions (Prune works on the twin, and turns back what kept its heads) -----------------
def is_head_prunable_mha(m: nn.Module) -> bool:
    return isinstance(m, HeadPrunableMultiheadAttention)


def to_head_prunable(model: nn.Module, inputs: Any) -> list[str]:
    """Replace every convertible ``nn.MultiheadAttention`` used for self-attention (query, key
    and value the same tensor on ``inputs``) by its head-prunable twin (the same function,
    sharing the parameters); returns their paths. Cross-attention modules stay as they are:
    their fused projection would be applied in slices the tracer cannot follow."""
    candidates = {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and convertible(m) is None and path
    }
    if not candidates:
        return []
    self_attention: dict[int, bool] = {}

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        v = args[2] if len(args) > 2 else kwargs.get("value")
        self_attention[id(m)] = self_attention.get(id(m), True) and q is k and k is v

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in candidates.values()]
    try:
        with preserved_state(model), torch.no_grad():
            call_for_analysis(model, inputs)
    finally:
        for h in handles:
            h.remove()
    done = []
    for path, m in candidates.items():
        if self_attention.get(id(m), False):
            set_module(model, path, HeadPrunableMultiheadAttention.from_torch(m))
            done.append(path)
    return done


def back_to_torch(model: nn.Module, paths: list[str]) -> None:
    """Turn the twins at ``paths`` whose heads were all kept back into ``nn.MultiheadAttention``."""
    for path in paths:
        m = model.get_submodule(path)
        if not is_head_prunable_mha(m):
            continue
        m.embed_dim = m.qkv.in_features  # the residual width may have been pruned too
        orig = m.to_torch()
        if orig is not None:
            set_module(model, path, orig)
