"""GGUF (llama.cpp's format) for decoder LLMs of the Llama family.

nnslim's integer layers go in as the GGUF block types that hold their codes exactly:

* ``Int4Linear`` (asymmetric, a scale and a minimum per group): ``Q4_1``, whose blocks of 32
  weights hold ``q * d + m``; a group of 64 or 128 is two or four blocks with the same
  ``d`` and ``m``. The bf16 scale and minimum become fp16 (exact where they are in fp16's
  range).
* ``Int8Linear`` / ``Int8DynamicLinear`` (symmetric per output channel): ``Q8_0`` (blocks of 32
  weights ``q * d``, ``d`` the channel's scale in fp16: about 1e-3 relative rounding).

Every other matrix (the token embedding, an untied output head, layers no block type holds,
dense for factorized or palettized layers) is written in ``float_type``: ``"f16"`` (the
default, as llama.cpp's converter writes them: half the bytes of float32, ~5e-4 relative
rounding), ``"bf16"`` or ``"f32"`` (exact); the norms' vectors stay float32, as llama.cpp keeps
them. The query and key projections are permuted as llama.cpp's converter does
(transformers' GGUF loader undoes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base.modules import linear_weight
from ..modules.kernels import unpack_int4
from ..modules.quantized import (
    Int4Embedding,
    Int4Linear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8Linear,
)

_INT4 = (Int4Linear, Int4Embedding)
_INT8 = (Int8Linear, Int8DynamicLinear, Int8Embedding)

__all__ = ["write_gguf"]

#: Hugging Face model types written, as llama.cpp's architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
_BLOCK = 32  # weights per Q4_1 / Q8_0 block


#: ``float_type`` -> how the matrices without a block type are stored
FLOAT_TYPES = ("f16", "bf16", "f32")


def check_float_type(float_type: str) -> None:
    """Refuse a ``float_type`` that is not one of :data:`FLOAT_TYPES`."""
    if float_type not in FLOAT_TYPES:
        raise ValueError(
            f"nnslim.export(float_type=...): expected one of {', '.join(FLOAT_TYPES)}, got "
            f"{float_type!r}."
        )


def write_gguf(
    model: nn.Module, path: Path, tokenizer_from: Path | None = None, float_type: str = "f16"
) -> list[str]:
    """Write ``model`` (a Hugging Face Llama-family causal LM) to ``path``; returns notes.
    ``tokenizer_from`` (what llama.cpp needs to run the file): a GGUF file whose
    ``tokenizer.*`` metadata is copied, or a directory holding a Hugging Face tokenizer
    (``tokenizer.json``) converted as llama.cpp's ``convert_hf_to_gguf.py`` does."""
    import gguf

    check_float_type(float_type)
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"nnslim.export(format='gguf'): writes Llama-family causal LMs ("
            f"{', '.join(ARCHITECTURES)}); this model is {type(model).__name__} "
            f"(model_type {kind!r}). Export it to ONNX instead."
        )
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    layers = model.model.layers
    _check_uniform(model, cfg)
    notes: list[str] = []
    w = gguf.GGUFWriter(str(path), ARCHITECTURES[kind])
    w.add_name(getattr(cfg, "name_or_path", "") or type(model).__name__)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(len(layers))
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_rope_dimension_count(head_dim)
    theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_file_type(gguf, model, float_type))
    if tokenizer_from is not None:
        source = Path(tokenizer_from)
        if source.is_dir():
            _hf_tokenizer(gguf, w, source, cfg.vocab_size)
        else:
            _copy_tokenizer(gguf, w, source, cfg.vocab_size)

    def add(name: str, module: nn.Module, permute: int | None = None) -> None:
        _add_linear(w, gguf, name, module, permute, notes, float_type)

    embed = model.model.embed_tokens
    add("token_embd.weight", embed)
    for i, layer in enumerate(layers):
        b = f"blk.{i}"
        att, mlp = layer.self_attn, layer.mlp
        w.add_tensor(f"{b}.attn_norm.weight", _f32(layer.input_layernorm.weight))
        add(f"{b}.attn_q.weight", att.q_proj, heads)
        add(f"{b}.attn_k.weight", att.k_proj, kv_heads)
        add(f"{b}.attn_v.weight", att.v_proj)
        add(f"{b}.attn_output.weight", att.o_proj)
        w.add_tensor(f"{b}.ffn_norm.weight", _f32(layer.post_attention_layernorm.weight))
        add(f"{b}.ffn_gate.weight", mlp.gate_proj)
        add(f"{b}.ffn_up.weight", mlp.up_proj)
        add(f"{b}.ffn_down.weight", mlp.down_proj)
    w.add_tensor("output_norm.weight", _f32(model.model.norm.weight))
    head = model.get_output_embeddings()
    if head is not None and not _tied(head, embed):  # llama.cpp reads a missing one as tied
        add("output.weight", head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return notes


def _copy_tokenizer(gguf: Any, w: Any, source: Path, vocab: int) -> None:
    """The ``tokenizer.*`` fields of another GGUF file (the model's source), checked against
    the model's vocabulary size."""
    if not source.is_file():
        raise FileNotFoundError(f"nnslim.export(tokenizer_from=...): no file {source}.")
    fields = {
        k: f for k, f in gguf.GGUFReader(str(source)).fields.items() if k.startswith("tokenizer.")
    }
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(
            f"nnslim.export(tokenizer_from=...): {source} holds no tokenizer "
            f"(no tokenizer.ggml.tokens field)."
        )
    if len(tokens.data) != vocab:
        raise ValueError(
            f"nnslim.export(tokenizer_from=...): {source}'s tokenizer has {len(tokens.data)} "
            f"tokens, the model's vocabulary {vocab}."
        )
    for key, field in fields.items():
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


#: llama.cpp's name for a byte-level BPE pre-tokenizer, from its ``tokenizer.json`` form
#: (llama.cpp's converter tells them apart by hashing a test text's tokens; these are the
#: ones whose structure names them unambiguously)
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _bpe_pre(pre: Any) -> str | None:
    """``tokenizer.ggml.pre`` for a ``tokenizer.json`` ``pre_tokenizer``; ``None``: unknown."""
    if not isinstance(pre, dict):
        return None

    def byte_level(p: dict[str, Any], regex: bool) -> bool:
        # llama.cpp's BPE adds no space before the text
        return (
            p.get("type") == "ByteLevel"
            and bool(p.get("use_regex", True)) == regex
            and not p.get("add_prefix_space", True)
        )

    if byte_level(pre, True):
        return "gpt-2"
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers", [])
    shape = [p.get("type") for p in parts]
    if shape == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        # SmolLM/SmolLM2: digits one by one, then GPT-2's split
        return "smollm" if byte_level(parts[1], True) else None
    if shape == ["Split", "ByteLevel"] and byte_level(parts[1], False):
        if (parts[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
            return "llama-bpe"
    return None


def _hf_tokenizer(gguf: Any, w: Any, source: Path, vocab: int) -> None:
    """A Hugging Face tokenizer directory as GGUF ``tokenizer.*`` metadata: a byte-level BPE
    (GPT-2 style: ``gpt2`` with its merges) or a Llama SentencePiece tokenizer (``llama``),
    padded with unused tokens to the model's vocabulary, special tokens and chat template
    from the directory's config."""
    import json

    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    where = f"nnslim.export(tokenizer_from={str(source)!r})"
    file = source / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{where}: no tokenizer.json in the directory; save the tokenizer with "
            f"tokenizer.save_pretrained(dir) (a fast tokenizer), or pass the source GGUF file."
        )
    spec = json.loads(file.read_text(encoding="utf-8"))
    vocab_obj: Any = None
    for cls in (BpeVocab, LlamaHfVocab):
        try:
            vocab_obj = cls(source)
            break
        except (FileNotFoundError, TypeError, ValueError, KeyError):
            continue
    if vocab_obj is None:
        model_type = (spec.get("model") or {}).get("type")
        raise ValueError(
            f"{where}: a {model_type} tokenizer; GGUF is written for byte-level BPE (GPT-2 "
            f"style) and Llama SentencePiece tokenizers. Pass the source GGUF file instead."
        )
    pre = None
    if vocab_obj.tokenizer_model == "gpt2":
        pre = _bpe_pre(spec.get("pre_tokenizer"))
        if pre is None:
            raise ValueError(
                f"{where}: its pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:120]}) is "
                f"not one nnslim can name for llama.cpp (GPT-2, SmolLM, Llama 3); a wrong name "
                f"would split text differently. Pass the source GGUF file instead."
            )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab_obj.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # added tokens by their flag, wherever their ids are (inside the base vocabulary too), as
    # llama.cpp's converter types them: special ones are control tokens, others user-defined
    for added in spec.get("added_tokens") or []:
        i = added.get("id")
        if isinstance(i, int) and 0 <= i < len(types):
            special = added.get("special", False)
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokens)} tokens, more than the model's "
            f"vocabulary of {vocab}."
        )
    for i in range(len(tokens), vocab):  # as llama.cpp's converter pads a larger embedding
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab_obj.tokenizer_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if vocab_obj.tokenizer_model != "gpt2":  # BPE has merges, no scores
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = SpecialVocab(
        source, load_merges=vocab_obj.tokenizer_model == "gpt2", n_vocab=len(tokens)
    )
    # whether the tokenizer adds BOS/EOS, as it behaves (its post-processor), where its config
    # does not say: llama.cpp's defaults differ by tokenizer kind
    added = _adds_special(file, special.special_token_ids)
    for kind, value in added.items():
        special.add_special_token.setdefault(kind, value)
    special.add_to_gguf(w, quiet=True)


def _adds_special(file: Path, ids: dict[str, int]) -> dict[str, bool]:
    """``{"bos": bool, "eos": bool}``: whether encoding with special tokens puts the BOS/EOS
    ids around a text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(file))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    out = {}
    if "bos" in ids:
        out["bos"] = len(full) > len(plain) and full[0] == ids["bos"]
    if "eos" in ids:
        out["eos"] = len(full) > len(plain) and full[-1] == ids["eos"]
    return out


def _check_uniform(model: nn.Module, cfg: Any) -> None:
    """GGUF's Llama holds one width per kind of layer: a model pruned unevenly cannot go."""
    for i, layer in enumerate(model.model.layers):
        inter = linear_weight(layer.mlp.up_proj).shape[0]
        if inter != cfg.intermediate_size:
            raise ValueError(
                f"nnslim.export(format='gguf'): model.layers.{i}.mlp keeps {inter} hidden units "
                f"where the config says {cfg.intermediate_size}; GGUF's Llama has one width for "
                f"every layer. Prune with one ratio for every layer, or export to ONNX."
            )
        for name in ("q_proj", "k_proj", "v_proj"):
            m = getattr(layer.self_attn, name)
            heads = cfg.num_attention_heads if name == "q_proj" else cfg.num_key_value_heads
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            if linear_weight(m).shape[0] != heads * hd:
                raise ValueError(
                    f"nnslim.export(format='gguf'): model.layers.{i}.self_attn.{name} has "
                    f"{linear_weight(m).shape[0]} outputs, not the config's {heads} x {hd}; "
                    f"GGUF's Llama has one head count for every layer."
                )


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _add_float(w: Any, gguf: Any, name: str, x: np.ndarray, float_type: str) -> None:
    """A matrix in ``float_type`` (bf16 as its raw 16-bit patterns, rounded to nearest even
    by torch)."""
    if float_type == "f16":
        w.add_tensor(name, x.astype(np.float16))
    elif float_type == "bf16":
        raw = torch.from_numpy(x).to(torch.bfloat16).view(torch.uint16).numpy()
        w.add_tensor(name, raw, raw_shape=x.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    else:
        w.add_tensor(name, x)


def _file_type(gguf: Any, model: nn.Module, float_type: str) -> Any:
    """``general.file_type``: the block type most layers take, as llama.cpp names files."""
    kinds = {type(m) for m in model.modules()}
    if Int4Linear in kinds:
        return gguf.LlamaFileType.MOSTLY_Q4_1
    if kinds & {Int8Linear, Int8DynamicLinear, Int8Embedding}:
        return gguf.LlamaFileType.MOSTLY_Q8_0
    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "f32": gguf.LlamaFileType.ALL_F32,
    }[float_type]


def _permute(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for the query and key projections (rotary halves interleaved)."""
    return (
        x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    )


def _tied(head: nn.Module, embed: nn.Module) -> bool:
    """Whether the LM head is the embedding's weight (float), or reads its codes (quantized)."""
    q = embed._buffers.get("qweight")
    if q is not None:
        return head._buffers.get("qweight") is q
    return isinstance(embed, nn.Embedding) and linear_weight(head) is embed.weight


def _width(m: nn.Module) -> int:
    """A projection's input width, or an embedding's row width."""
    width = getattr(m, "embedding_dim", None)
    return int(width) if width is not None else int(m.in_features)


def _add_linear(
    w: Any,
    gguf: Any,
    name: str,
    m: nn.Module,
    heads: int | None,
    notes: list[str],
    float_type: str,
) -> None:
    """One projection (or the token embedding); ``heads``: permute its rows as llama.cpp
    does (query, key)."""
    smooth = m._buffers.get("smooth")
    if isinstance(m, _INT4) and smooth is None and _width(m) % _BLOCK == 0:
        blocks = _q4_1(m)
        if heads is not None:
            blocks = _permute(blocks, heads)
        w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        return
    if isinstance(m, _INT8) and smooth is None and _width(m) % _BLOCK == 0:
        blocks = _q8_0(m)
        if heads is not None:
            blocks = _permute(blocks, heads)
        w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return
    if isinstance(m, (*_INT4, *_INT8)):
        notes.append(
            f"{name}: {type(m).__name__} written as {float_type} (a smoothing scale or a width that "
            f"is not a multiple of {_BLOCK} has no GGUF block type)"
        )
    weight = _f32(m.weight)
    if heads is not None:
        weight = _permute(weight, heads)
    _add_float(w, gguf, name, weight, float_type)


def _q4_1(m: Int4Linear | Int4Embedding) -> np.ndarray:
    """``block_q4_1 {fp16 d; fp16 m; uint8 qs[16]}`` per 32 weights: ``qs[j]`` holds weight
    ``j`` in its low nibble and weight ``j + 16`` in its high nibble."""
    q = unpack_int4(m.qweight)[:, : _width(m)].to(torch.uint8)  # (out, in) codes
    out, inp = q.shape
    per_group = m.group_size // _BLOCK if m.group_size >= _BLOCK else None
    if per_group is None or m.group_size % _BLOCK:
        raise ValueError(
            f"nnslim.export(format='gguf'): int4 group size {m.group_size} is not a multiple "
            f"of GGUF's 32-weight blocks; quantize with group_size 32, 64 or 128."
        )
    nb = inp // _BLOCK
    d = m.scales.float().repeat_interleave(per_group, dim=1)[:, :nb].to(torch.float16)
    mn = m.mins.float().repeat_interleave(per_group, dim=1)[:, :nb].to(torch.float16)
    qb = q.reshape(out, nb, _BLOCK)
    qs = qb[..., :16] | (qb[..., 16:] << 4)
    raw = torch.cat(
        [d.view(torch.uint8).reshape(out, nb, 2), mn.view(torch.uint8).reshape(out, nb, 2), qs],
        dim=-1,
    )
    return raw.reshape(out, nb * 20).numpy()


def _q8_0(m: Int8Linear | Int8DynamicLinear | Int8Embedding) -> np.ndarray:
    """``block_q8_0 {fp16 d; int8 qs[32]}`` per 32 weights, ``d`` the channel's scale."""
    q = m.qweight
    out, inp = q.shape
    nb = inp // _BLOCK
    d = m.scale.float().to(torch.float16)[:, None].expand(out, nb).contiguous()
    raw = torch.cat(
        [d.view(torch.uint8).reshape(out, nb, 2), q.reshape(out, nb, _BLOCK).view(torch.uint8)],
        dim=-1,
    )
    return raw.reshape(out, nb * 34).numpy()
