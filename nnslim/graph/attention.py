"""Attention heads: find them, score them, remove whole heads, update attributes and configs.

torch-pruning, given no head information, keeps rows scattered across heads, and it does not
update attributes such as ``num_heads`` or Hugging Face config fields. nnslim handles attention
itself: :func:`find_attention` recognises attention modules by their projections (separate
``q/k/v`` + output projection, as in Llama, BERT, ViT, Whisper, or one fused projection in
one of three row layouts: ``blocks`` ``[q | k | v]`` as in GPT-2's ``c_attn``, Phi-3's
``qkv_proj`` and timm's ``Attention``; ``heads`` ``[q0 k0 v0 | q1 k1 v1 | ...]`` as in GPT-NeoX and
Falcon; ``groups`` ``[q.. k v]`` per key/value head as in Falcon's new decoder architecture),
:meth:`AttentionSpec.prune_heads` removes whole heads from every projection (with GQA, the same
number of query heads inside each key/value group, so groups stay consistent) and updates the
module's head attributes. The projections are then kept out of channel pruning.

A fused layout cannot be read from the weights, so fused projections are recognised by the
attention class (:data:`FUSED`), or, for a class nnslim does not know, checked on the model
itself (:func:`probe_fused_layouts`: swapping two heads within a layout must leave the output as
it was, and swapping only the output projection's columns must not); others are listed with
their reason, never guessed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..base.modules import out_width, set_module
from ..modules.masks import cut_mask
from ..modules.mha import convertible, is_head_prunable_mha
from .tp_compat import CONV1D_PRUNER, conv1d_type

__all__ = ["AttentionSpec", "find_attention"]

_Q = ("q_proj", "query", "q", "wq", "q_lin")
_K = ("k_proj", "key", "k", "wk", "k_lin")
_V = ("v_proj", "value", "v", "wv", "v_lin")
_O = ("o_proj", "out_proj", "dense", "wo", "Wo", "out_lin", "c_proj", "o")
_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size")


def _child(m: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        c = m._modules.get(n)
        if c is not None and _is_proj(c):
            return n, c
    return None


def _is_proj(m: nn.Module) -> bool:
    c = conv1d_type()
    return isinstance(m, nn.Linear) or (c is not None and isinstance(m, c))


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]


def _attr(m: nn.Module, names: tuple[str, ...]) -> int | None:
    for n in names:
        v = m.__dict__.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass
class AttentionSpec:
    """One attention module and the projections that carry its heads.

    Attributes:
        path: the attention module's path.
        module: the attention module (whose head attributes get updated).
        q, k, v: paths of the query/key/value projections (``None`` when fused).
        qkv: path of a fused projection (GPT-2's ``c_attn``), else ``None``.
        layout: the fused projection's row layout (``"blocks"``, ``"heads"`` or ``"groups"``).
        o: path of the output projection.
        heads: query heads; kv_heads: key/value heads (``< heads`` for GQA); head_dim.
    """

    path: str
    module: nn.Module
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    layout: str = "blocks"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def projections(self) -> list[str]:
        return [p for p in (self.q, self.k, self.v, self.qkv, self.o) if p is not None]

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    # -- scores ---------------------------------------------------------------------------------
    def head_scores(self, model: nn.Module, elem: Any) -> torch.Tensor:
        """Importance of each query head: its rows of q (and k, v without GQA) and columns of o.

        ``elem(module) -> element scores shaped like module.weight``.
        """
        hd, h = self.head_dim, self.heads
        score = torch.zeros(h)

        def rows(path: str, offset: int = 0, n: int = h) -> torch.Tensor:
            m = model.get_submodule(path)
            s = elem(m)
            s = s.t() if not isinstance(m, nn.Linear) else s  # Conv1D (in, out) -> (out, in)
            block = s[offset : offset + n * hd].reshape(n, hd, -1)
            return block.sum(dim=(1, 2)).float().cpu()

        def cols(path: str) -> torch.Tensor:
            m = model.get_submodule(path)
            s = elem(m)
            s = s if not isinstance(m, nn.Linear) else s.t()  # -> (in, out)
            return s[: h * hd].reshape(h, hd, -1).sum(dim=(1, 2)).float().cpu()

        if self.qkv is not None:
            m = model.get_submodule(self.qkv)
            s = elem(m)
            s = s.t() if not isinstance(m, nn.Linear) else s
            per_row = s.reshape(s.shape[0], -1).sum(dim=1).float().cpu()
            for i in range(h):
                score[i] += per_row[self.fused_rows([i])].sum()
        else:
            score += rows(self.q)  # type: ignore[arg-type]
            if self.kv_heads == self.heads:
                score += rows(self.k) + rows(self.v)  # type: ignore[arg-type]
        score += cols(self.o)
        return score

    # -- pruning --------------------------------------------------------------------------------
    def choose(self, scores: torch.Tensor, n_remove: int) -> list[int]:
        """Query heads to remove: the lowest-scoring, the same number inside each KV group."""
        if self.kv_heads == self.heads:
            return sorted(scores.argsort()[:n_remove].tolist())
        g = self.groups
        per_group = n_remove // self.kv_heads
        out: list[int] = []
        for j in range(self.kv_heads):
            block = scores[j * g : (j + 1) * g]
            out.extend(j * g + int(i) for i in block.argsort()[:per_group])
        return sorted(out)

    def removable(self, ratio: float) -> int:
        """How many query heads ``ratio`` removes: the nearest whole number (so 0.3 of 3 heads
        is 1), the same inside every key/value group, at least one head kept."""
        if self.kv_heads == self.heads:
            return min(math.floor(ratio * self.heads + 0.5), self.heads - 1)
        per_group = min(math.floor(ratio * self.groups + 0.5), self.groups - 1)
        return per_group * self.kv_heads

    def fused_rows(self, remove: list[int]) -> list[int]:
        """Rows of the fused projection that go with query heads ``remove`` (and, without GQA,
        their key/value heads)."""
        hd, h, kv = self.head_dim, self.heads, self.kv_heads
        mha = kv == h
        rows: list[int] = []
        for i in remove:
            if self.layout == "heads":  # [q0 k0 v0 | q1 k1 v1 | ...] (MHA only)
                rows.extend(range(i * 3 * hd, (i + 1) * 3 * hd))
            elif self.layout == "groups":  # per key/value head j: [q (g heads) | k_j | v_j]
                g = h // kv
                base = (i // g) * (g + 2) * hd
                start = base + (i % g) * hd
                rows.extend(range(start, start + hd))
                if mha:
                    rows.extend(range(base + hd, base + 3 * hd))
            else:  # blocks: [q (h heads) | k (kv heads) | v (kv heads)]
                rows.extend(range(i * hd, (i + 1) * hd))
                if mha:
                    for off in (h * hd, (h + kv) * hd):
                        rows.extend(range(off + i * hd, off + (i + 1) * hd))
        return sorted(rows)

    def prune_heads(self, model: nn.Module, remove: list[int]) -> None:
        """Remove query heads ``remove`` (and their K/V heads without GQA)."""
        if not remove:
            return
        hd = self.head_dim
        chans = [h * hd + d for h in remove for d in range(hd)]
        mha = self.kv_heads == self.heads

        def out_fn(m: nn.Module) -> Any:
            return (
                tp.prune_linear_out_channels
                if isinstance(m, nn.Linear)
                else CONV1D_PRUNER.prune_out_channels
            )

        def in_fn(m: nn.Module) -> Any:
            return (
                tp.prune_linear_in_channels
                if isinstance(m, nn.Linear)
                else CONV1D_PRUNER.prune_in_channels
            )

        if self.qkv is not None:
            m = model.get_submodule(self.qkv)
            rows = self.fused_rows(remove)
            out_fn(m)(m, rows)
            cut_mask(m, "out", rows)
        else:
            q = model.get_submodule(self.q)  # type: ignore[arg-type]
            out_fn(q)(q, chans)
            cut_mask(q, "out", chans)
            if mha:
                for p in (self.k, self.v):
                    m = model.get_submodule(p)  # type: ignore[arg-type]
                    out_fn(m)(m, chans)
                    cut_mask(m, "out", chans)
        o = model.get_submodule(self.o)
        in_fn(o)(o, chans)
        cut_mask(o, "in", chans)
        keep = None
        for path in self.extra.get("per_channel", []):  # BitNet's attn_sub_norm, OLMo2's q_norm
            m = model.get_submodule(path)
            for name, t in list(m._parameters.items()):
                if keep is None:
                    keep = torch.tensor(sorted(set(range(t.shape[0])) - set(chans)))
                new = nn.Parameter(t.data.index_select(0, keep.to(t.device)).clone())
                new.requires_grad_(t.requires_grad)
                m._parameters[name] = new
        if self.extra.get("swin"):
            self._prune_swin(model, remove)
        else:  # one value per query head on the module itself (gpt-oss's attention sinks)
            kept = torch.tensor([h for h in range(self.heads) if h not in set(remove)])
            if self.extra.get("bias_table"):
                table = model.get_submodule(self.extra["bias_table"])
                w = table.weight
                new_w = nn.Parameter(w.data.index_select(1, kept.to(w.device)).clone())
                new_w.requires_grad_(w.requires_grad)
                table._parameters["weight"] = new_w
                table.embedding_dim = int(kept.numel())
            for name, t in list(self.module._parameters.items()):
                if t is not None and t.dim() == 1 and t.shape[0] == self.heads:
                    new = nn.Parameter(t.data.index_select(0, kept.to(t.device)).clone())
                    new.requires_grad_(t.requires_grad)
                    self.module._parameters[name] = new
        new_heads = self.heads - len(remove)
        new_kv = new_heads if mha else self.kv_heads
        self._update_attrs(new_heads, new_kv)
        self.heads, self.kv_heads = new_heads, new_kv

    def _prune_swin(self, model: nn.Module, remove: list[int]) -> None:
        """torchvision Swin: per-head bias tables and scales; switch to the prunable twin."""
        from ..modules import swin

        m = self.module
        keep = [h for h in range(self.heads) if h not in set(remove)]
        idx = torch.tensor(keep)

        def cut(t: torch.Tensor, dim: int) -> nn.Parameter:
            return nn.Parameter(
                t.detach().index_select(dim, idx.to(t.device)), requires_grad=t.requires_grad
            )

        if "relative_position_bias_table" in m._parameters:
            m.relative_position_bias_table = cut(m.relative_position_bias_table, 1)
        if "logit_scale" in m._parameters:
            m.logit_scale = cut(m.logit_scale, 0)
        cpb = m._modules.get("cpb_mlp")
        if cpb is not None:
            last = cpb[-1]
            tp.prune_linear_out_channels(last, [h for h in remove])
        if not isinstance(m, (swin.HeadPrunableSwinAttention, swin.HeadPrunableSwinAttentionV2)):
            new = swin.convert(m, self.head_dim)
            set_module(model, self.path, new)
            self.module = new

    def _update_attrs(self, heads: int, kv_heads: int) -> None:
        m = self.module
        d = m.__dict__
        for n in _HEADS:
            if isinstance(d.get(n), int):
                d[n] = heads
        for n in _KV_HEADS:
            if isinstance(d.get(n), int):
                d[n] = kv_heads
        if isinstance(d.get("num_key_value_groups"), int):
            d["num_key_value_groups"] = heads // kv_heads
        for n in ("all_head_size", "inner_dim", "attn_dim"):
            if isinstance(d.get(n), int):
                d[n] = heads * self.head_dim
        # BART-style attention (XGLM, MVP, TrOCR, SpeechT5, InternVL...) reshapes its output
        # with embed_dim, the width of the concatenated heads (a forward that reads it as the
        # hidden width fails the check after pruning and keeps its heads)
        if isinstance(d.get("embed_dim"), int) and d["embed_dim"] == self.heads * self.head_dim:
            d["embed_dim"] = heads * self.head_dim
        if self.qkv is not None and isinstance(d.get("split_size"), int):
            d["split_size"] = heads * self.head_dim


def _per_channel(m: nn.Module, width: int) -> bool:
    """A leaf holding only per-channel vectors of ``width`` (a norm over the concatenated heads,
    or over a whole projection's output): its channels are the heads' channels."""
    ps = list(m._parameters.values())
    return (
        not m._modules
        and bool(ps)
        and all(p is not None and p.dim() == 1 and p.shape[0] == width for p in ps)
    )


def _timm_attention(m: nn.Module) -> bool:
    return type(m).__name__ == "Attention" and type(m).__module__.startswith("timm.")


def _falcon_layout(m: nn.Module) -> str | None:
    cfg = m.__dict__.get("config")
    if cfg is not None and getattr(cfg, "alibi", False):
        return None
    if getattr(m, "new_decoder_architecture", False):
        return "groups"
    return "blocks" if getattr(m, "multi_query", False) else "heads"


#: attention classes with one fused projection: class name -> (fused, output, layout), where
#: layout is a string or a function of the module (``None``: the layout is not prunable)
FUSED: dict[str, tuple[str, str, Any]] = {
    "Phi3Attention": ("qkv_proj", "o_proj", "blocks"),
    "Phi4MultimodalAttention": ("qkv_proj", "o_proj", "blocks"),
    "GPTNeoXAttention": ("query_key_value", "dense", "heads"),
    "GPTNeoXJapaneseAttention": ("query_key_value", "dense", "heads"),
    "PersimmonAttention": ("query_key_value", "dense", "heads"),
    "ModernBertAttention": ("Wqkv", "Wo", "blocks"),
    "FalconAttention": ("query_key_value", "dense", _falcon_layout),
}


#: what :func:`probe_fused_layouts` found per module: ``(fused, output, layout)`` or why not
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[str, str, str] | str] = (
    weakref.WeakKeyDictionary()
)


def _fused_pair(m: nn.Module) -> tuple[str, str] | None:
    """``(fused, output)`` child names of an attention-looking module of an unknown class: one
    plain ``nn.Linear`` with three times the inputs of another (MHA: ``[q | k | v]`` rows over
    the heads' width), and nothing else of that shape."""
    name = type(m).__name__.lower()
    if "attention" not in name and not name.endswith("attn"):
        return None
    lin = {n: c for n, c in m._modules.items() if type(c) is nn.Linear}
    pairs = [
        (f, o)
        for f, fm in lin.items()
        for o, om in lin.items()
        if f != o and fm.out_features == 3 * om.in_features
    ]
    return pairs[0] if len(pairs) == 1 else None


def _swap_heads(
    m: nn.Module, fused: str, out: str, layout: str, heads: int, hd: int, rows: bool
) -> None:
    """Swap head 0 and the last head in ``fused``'s rows (per ``layout``) and in the module's
    own per-head vectors (both skipped unless ``rows``), and in ``out``'s columns, in place."""
    a, b = 0, heads - 1
    f, o = m._modules[fused], m._modules[out]
    with torch.no_grad():
        if rows:
            for part in range(3):
                if layout == "blocks":  # [q | k | v], each heads x hd
                    ia, ib = part * heads * hd + a * hd, part * heads * hd + b * hd
                else:  # "heads": [q0 k0 v0 | q1 k1 v1 | ...]
                    ia, ib = (a * 3 + part) * hd, (b * 3 + part) * hd
                for t in (f.weight, f.bias):
                    if t is not None:
                        t[ia : ia + hd], t[ib : ib + hd] = (
                            t[ib : ib + hd].clone(),
                            t[ia : ia + hd].clone(),
                        )
        for t in m._parameters.values():  # one value per head (pruned with the heads too)
            if rows and t is not None and t.dim() == 1 and t.shape[0] == heads:
                t[a], t[b] = t[b].clone(), t[a].clone()
        w = o.weight
        w[:, a * hd : (a + 1) * hd], w[:, b * hd : (b + 1) * hd] = (
            w[:, b * hd : (b + 1) * hd].clone(),
            w[:, a * hd : (a + 1) * hd].clone(),
        )


def probe_fused_layouts(
    model: nn.Module, run: Callable[[], list[torch.Tensor]], reference: list[torch.Tensor]
) -> None:
    """Find the row layout of fused q/k/v projections in attention classes nnslim does not
    know, on the model itself. For each such class and each layout (``blocks``, ``heads``):
    swapping two heads within that layout, in every module of the class at once, must leave
    the output as it was (heads are interchangeable), and swapping only the output
    projection's columns must change it (the check can see them). A class where no layout
    holds (per-head ALiBi slopes or relative-position tables, a gate over the heads) keeps its
    heads, with the reason. The weights are put back exactly. Results are remembered per
    module; :func:`find_attention` uses them."""
    known = {p for s in find_attention(model) for p in s.projections}
    by_class: dict[type, list[tuple[str, nn.Module, str, str, int, int]]] = {}
    for path, m in model.named_modules():
        if m in _PROBED or type(m).__name__ in FUSED or _timm_attention(m):
            continue
        pair = _fused_pair(m)
        if pair is None:
            continue
        fused, out = pair
        join = f"{path}." if path else ""
        if join + fused in known:
            continue
        width = m._modules[out].in_features
        heads, hd = _heads_of(m, width)
        if not heads or not hd or heads < 2 or heads * hd != width:
            continue
        by_class.setdefault(type(m), []).append((path, m, fused, out, heads, hd))
    if not by_class or not reference:
        return

    def observed(members: list[Any]) -> list[torch.Tensor]:
        """The members' own outputs (a branch scaled down before the model's output, such as
        a layer scale of 1e-5, would hide a change there), else the model's."""
        seen: list[torch.Tensor] = []

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, (tuple, list)):  # Hugging Face: (output, weights, ...)
                out = next((o for o in out if isinstance(o, torch.Tensor)), None)
            if isinstance(out, torch.Tensor):
                seen.append(out.detach())

        handles = [m.register_forward_hook(hook) for _, m, _, _, _, _ in members]
        try:
            got = run()
        finally:
            for h in handles:
                h.remove()
        return seen if len(seen) >= len(members) else got

    def change(layout: str, rows: bool, members: list[Any], reference: list[Any]) -> float:
        saved = [
            {n: t.detach().clone() for n, t in m.named_parameters()} for _, m, _, _, _, _ in members
        ]
        try:
            for _, m, fused, out, heads, hd in members:
                _swap_heads(m, fused, out, layout, heads, hd, rows)
            got = observed(members)
        finally:
            with torch.no_grad():
                for (_, m, _, _, _, _), keep in zip(members, saved, strict=True):
                    for n, t in m.named_parameters():
                        t.copy_(keep[n])
        if len(got) != len(reference):
            return math.inf
        worst = 0.0
        for a, b in zip(got, reference, strict=True):
            if a.shape != b.shape:
                return math.inf
            scale = float(b.double().norm()) or 1.0
            worst = max(worst, float((a.double() - b.double()).norm()) / scale)
        return worst

    for members in by_class.values():
        found: str | None = None
        why = (
            "swapping two of its heads changed the output in every row layout nnslim knows "
            "(per-head state such as ALiBi slopes or position tables, or a gate over the heads)"
        )
        try:
            own = observed(members)
            control = change("blocks", False, members, own)  # columns alone: must show
            if control <= 1e-3:
                why = "swapping its output projection's head columns left the output unchanged"
            for layout in ("blocks", "heads") if control > 1e-3 else ():
                if change(layout, True, members, own) <= 1e-3 * control:
                    found = layout
                    break
        except Exception as e:  # a forward that does not survive the probe: nothing learned
            why = f"its head layout could not be checked ({type(e).__name__})"
        for _, m, fused, out, _, _ in members:
            _PROBED[m] = (fused, out, found) if found else why


def _kept_reason(m: nn.Module) -> str | None:
    """Why an attention class nnslim knows keeps its heads (``None``: not a known class)."""
    name = type(m).__name__
    cfg = m.__dict__.get("config")
    if name == "BloomAttention" or (name == "FalconAttention" and getattr(cfg, "alibi", False)):
        return "the model builds its ALiBi slopes per head from the config, outside the layer"
    probed = _PROBED.get(m)
    if isinstance(probed, str):
        return probed
    if name in FUSED or _timm_attention(m) or isinstance(probed, tuple):
        return (
            "its fused projection's width does not match its head attributes, or a gate or "
            "norm spans the heads"
        )
    return None


def _relative_bias(spec: AttentionSpec, m: nn.Module, path: str, join: Any) -> None:
    """T5's relative position bias: an ``nn.Embedding(buckets, heads)`` in the first layer of
    each stack, whose ``[1, heads, q, k]`` output the first layer hands to every later one
    (cross-attention hands on zeros of its head count). The heads of one role in one stack are
    tied: the same heads leave every layer (``extra["tie"]``) and the table's columns."""
    if not isinstance(m.__dict__.get("has_relative_attention_bias"), bool):
        return
    table = m._modules.get("relative_attention_bias")
    if isinstance(table, nn.Embedding):
        if table.embedding_dim != spec.heads:
            return
        spec.extra["bias_table"] = join("relative_attention_bias")
    parts = path.split(".")
    cut = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if cut is not None:  # encoder.block.<i>.layer.0.SelfAttention -> (encoder.block, layer.0.S..)
        spec.extra["tie"] = (".".join(parts[:cut]), ".".join(parts[cut + 1 :]))


def _fused_spec(path: str, m: nn.Module, join: Any) -> AttentionSpec | None:
    """A spec for an attention module with one fused q/k/v projection of a known layout."""
    name = type(m).__name__
    if _timm_attention(m):
        entry: tuple[str, str, Any] | None = ("qkv", "proj", "blocks")
        if m._modules.get("gate") is not None or not isinstance(
            m._modules.get("norm", nn.Identity()), nn.Identity
        ):
            return None  # a gate or a norm over the heads' width would need pruning too
    else:
        entry = FUSED.get(name)
        probed = _PROBED.get(m)
        if entry is None and isinstance(probed, tuple):
            entry = probed
    if entry is None:
        return None
    fused_name, out_name, layout = entry
    if callable(layout):
        layout = layout(m)
    qkv, o = m._modules.get(fused_name), m._modules.get(out_name)
    if layout is None or qkv is None or o is None or not (_is_proj(qkv) and _is_proj(o)):
        return None
    q_out = _in_features(o)
    heads, hd = _heads_of(m, q_out)
    if not heads or not hd or heads * hd != q_out:
        return None
    total = out_width(qkv)
    kv = _attr(m, _KV_HEADS) or (1 if getattr(m, "multi_query", False) else heads)
    if layout == "blocks" and (total - q_out) % (2 * hd) == 0:
        kv = (total - q_out) // (2 * hd)
    if total != (heads + 2 * kv) * hd or heads % kv or (layout == "heads" and kv != heads):
        return None
    spec = AttentionSpec(path, m, join(out_name), heads, kv, hd, qkv=join(fused_name))
    spec.layout = layout
    spec.extra["config_heads"] = _READS_CONFIG_HEADS.get(m, False)
    return spec


#: fused attention modules whose config's head count the model's forward reads (Phi-3 slices
#: its fused projection by ``config.num_attention_heads``), found by :func:`probe_config_heads`
_READS_CONFIG_HEADS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def probe_config_heads(
    model: nn.Module, run: Callable[[], list[torch.Tensor]], reference: list[torch.Tensor]
) -> None:
    """Whether the forward reads the shared ``config.num_attention_heads`` of fused attention
    modules (Phi-3): with the count doubled for one forward, does the output change or the
    forward fail? If so the config must follow the pruned count, and every layer sharing it
    keep the same count. One forward per config; the count is put back."""
    by_cfg: dict[int, tuple[Any, list[nn.Module]]] = {}
    for s in find_attention(model):
        cfg = s.module.__dict__.get("config")
        if s.qkv is not None and isinstance(getattr(cfg, "num_attention_heads", None), int):
            by_cfg.setdefault(id(cfg), (cfg, []))[1].append(s.module)
    for cfg, modules in by_cfg.values():
        heads = cfg.num_attention_heads
        try:
            cfg.num_attention_heads = 2 * heads
            got = run()
            reads = len(got) != len(reference) or any(
                a.shape != b.shape or not torch.equal(a, b)
                for a, b in zip(got, reference, strict=False)
            )
        except Exception:
            reads = True
        finally:
            cfg.num_attention_heads = heads
        for m in modules:
            _READS_CONFIG_HEADS[m] = reads


def _heads_of(m: nn.Module, q_out: int) -> tuple[int | None, int | None]:
    heads = _attr(m, _HEADS)
    hd = _attr(m, _HEAD_DIM)
    cfg = m.__dict__.get("config")
    if heads is None and cfg is not None and hd is None:
        heads = getattr(cfg, "num_attention_heads", None)
    if hd is None and heads:
        hd = q_out // heads
    if heads is None and hd:
        heads = q_out // hd
    return heads, hd


def find_attention(model: nn.Module) -> list[AttentionSpec]:
    """Every attention module nnslim knows how to prune by heads."""
    specs: list[AttentionSpec] = []
    named = dict(model.named_modules())
    for path, m in named.items():

        def join(n: str, p: str = path) -> str:
            return f"{p}.{n}" if p else n

        q, k, v = _child(m, _Q), _child(m, _K), _child(m, _V)
        if q and k and v:
            o = _child(m, _O)
            o_path = join(o[0]) if o else None
            if o is None:
                # BERT / HF ViT: the output projection lives in the parent's `output.dense`
                parent_path = path.rpartition(".")[0] if "." in path else ""
                parent = named.get(parent_path)
                out = parent._modules.get("output") if parent is not None else None
                dense = out._modules.get("dense") if out is not None else None
                if dense is not None and _is_proj(dense):
                    o_path = f"{parent_path}.output.dense" if parent_path else "output.dense"
            if o_path is None:
                continue
            q_out = out_width(q[1])
            heads, hd = _heads_of(m, q_out)
            if not heads or not hd or heads * hd != q_out:
                continue
            k_out = out_width(k[1])
            if k_out % hd or out_width(v[1]) != k_out:
                continue
            kv = k_out // hd
            if heads % kv:
                continue
            o_mod = named[o_path]
            if _in_features(o_mod) != q_out:
                continue
            spec = AttentionSpec(
                path, m, o_path, heads, kv, hd, q=join(q[0]), k=join(k[0]), v=join(v[0])
            )
            taken = {q[0], k[0], v[0], o[0] if o else None}
            _relative_bias(spec, m, path, join)
            spec.extra["per_channel"] = [
                join(n)
                for n, c in m._modules.items()
                if n not in taken and c is not None and _per_channel(c, q_out)
            ]
            specs.append(spec)
            continue
        fused = _fused_spec(path, m, join)
        if fused is not None:
            specs.append(fused)
            continue
        if is_head_prunable_mha(m):
            specs.append(
                AttentionSpec(
                    path, m, join("out_proj"), m.num_heads, m.num_heads, m.head_dim, qkv=join("qkv")
                )
            )
            continue
        if _is_swin(m):
            qkv_m, proj = m._modules.get("qkv"), m._modules.get("proj")
            heads = _attr(m, ("num_heads",))
            if isinstance(qkv_m, nn.Linear) and isinstance(proj, nn.Linear) and heads:
                hd = qkv_m.out_features // 3 // heads
                if hd * 3 * heads == qkv_m.out_features and proj.in_features == heads * hd:
                    spec = AttentionSpec(path, m, join("proj"), heads, heads, hd, qkv=join("qkv"))
                    spec.extra["swin"] = True
                    specs.append(spec)
            continue
        c = conv1d_type()
        qkv = m._modules.get("c_attn")
        proj = m._modules.get("c_proj")
        if c is not None and isinstance(qkv, c) and isinstance(proj, c):
            heads, hd = _heads_of(m, _in_features(proj))
            if heads and hd and qkv.nf == 3 * heads * hd:
                specs.append(
                    AttentionSpec(path, m, join("c_proj"), heads, heads, hd, qkv=join("c_attn"))
                )
    return specs


def _is_swin(m: nn.Module) -> bool:
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
    except Exception:  # pragma: no cover - torchvision missing
        return False
    return isinstance(m, ShiftedWindowAttention)


def unknown_attention_layers(model: nn.Module, known: list[AttentionSpec]) -> dict[str, str]:
    """Projections inside attention-looking modules nnslim cannot prune by heads, with reasons."""
    covered = {p for s in known for p in s.projections}
    out: dict[str, str] = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            why = convertible(m) or "used for cross-attention (query is not the key)"
            for n, c in m.named_modules():
                if n and isinstance(c, nn.Linear):
                    out[f"{path}.{n}"] = f"nn.MultiheadAttention {why}: its heads are kept"
            continue
        name = type(m).__name__.lower()
        if "attention" in name or name.endswith("attn"):
            why = _kept_reason(m)
            for n, c in m._modules.items():
                full = f"{path}.{n}" if path else n
                if c is not None and _is_proj(c) and full not in covered:
                    out[full] = (
                        f"inside {type(m).__name__}: {why}; its heads are kept"
                        if why
                        else f"inside {type(m).__name__}, whose head layout nnslim does not know"
                    )
    return out
