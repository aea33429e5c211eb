"""Breadth: every transform on models no test names, enumerated instead of listed by hand.

Models:

* timm: one variant per model module (``timm.list_modules()``), the one with the fewest
  parameters (counted on the ``meta`` device);
* torchvision: every classification, segmentation, detection and video model;
* transformers: every architecture in the auto mappings for causal LM, seq2seq LM, sequence
  classification, masked LM, CTC, speech seq2seq, image classification and vision-text, built
  from the architecture's own config class with sizes shrunk (hidden 64, 2 layers, 4 heads,
  2 KV heads where it has them, MLP width 256 = 4 x hidden as in GPT-2, BERT, T5 and ViT, a
  512-token vocabulary where the model runs with one, so the LM head's share of the MACs stays
  near a real model's: see ``VOCAB``).

Every model is built with random weights (``weights=None``, ``pretrained=False``, configs), never
downloaded. For each model and each transform (``Prune(ratio=0.3)``, ``Prune(macs=0.5)``,
``Quantize`` int8 / int8-dynamic / int4, ``Factorize(ratio=0.5)``, ``ShareWeights(clusters=16)``,
``Compose([Prune, Quantize])``) a cell records: applied / unchanged (with the report's reason) /
failed (an nnslim error, or a raw error from inside), forward with the same output shape and
finite values, relative output error, MACs and bytes ratios, ``nnslim.save``/``load`` exact, and
``torch.compile`` running (``--compile``). A model that cannot be built or run before any
transform is counted apart, with the reason. Each model runs in its own process (a crash or a
hang costs one model, not the sweep).

    python benchmarks/coverage.py                  # the whole sweep (hours on 2 cores)
    python benchmarks/coverage.py --quick          # a few models per family (minutes)
    python benchmarks/coverage.py --only timm:levit_128s,hf:phi3
    python benchmarks/coverage.py --rst            # docs/coverage.rst from the JSON only

Writes ``benchmarks/results/coverage[-quick].json`` (resumable: models already in it are not run
again unless ``--fresh``) and ``docs/coverage.rst`` (full sweep only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, environment, print_table

import nnslim
from nnslim.base.inputs import as_inputs, first_tensor, output_tensors

ROOT = Path(__file__).resolve().parent.parent
RST = ROOT / "docs" / "coverage.rst"

#: the transforms of the sweep, by column name
TRANSFORMS: dict[str, Any] = {
    "prune-ratio": lambda: nnslim.Prune(ratio=0.3),
    "prune-macs": lambda: nnslim.Prune(macs=0.5),
    "int8": lambda: nnslim.Quantize(scheme="int8"),
    "int8-dynamic": lambda: nnslim.Quantize(scheme="int8-dynamic"),
    "int4": lambda: nnslim.Quantize(scheme="int4"),
    "factorize": lambda: nnslim.Factorize(ratio=0.5),
    "share": lambda: nnslim.ShareWeights(clusters=16),
    "compose": lambda: nnslim.Compose([nnslim.Prune(ratio=0.3), nnslim.Quantize(scheme="int8")]),
}

#: models in --quick: at least one per family that failed before the coverage issue's fixes
QUICK = [
    "timm:levit_128s",
    "timm:ghostnet_050",
    "timm:poolformer_s12",
    "timm:deit_tiny_patch16_224",
    "torchvision:swin_t",
    "torchvision:mobilenet_v3_small",
    "hf:phi3",
    "hf:gpt_neox",
    "hf:t5",
    "hf:clip",
    "hf:wav2vec2",
]

#: a model larger than this (parameters) is not built for the sweep
MAX_PARAMS = 120_000_000


# -- enumeration -------------------------------------------------------------------------------
def timm_models() -> list[str]:
    import timm

    out = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if not names:
            continue
        sizes = []
        for name in names:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = timm.create_model(name, pretrained=False)
                sizes.append((sum(p.numel() for p in m.parameters()), name))
            except Exception:
                continue
        if sizes:
            out.append(f"timm:{min(sizes)[1]}")
        else:
            out.append(f"timm:{names[0]}")
    return out


def torchvision_models() -> list[str]:
    import torchvision.models as tvm

    out = []
    for sub, group in (
        (tvm, "classification"),
        (tvm.segmentation, "segmentation"),
        (tvm.detection, "detection"),
        (tvm.video, "video"),
    ):
        out += [f"torchvision:{n}" for n in tvm.list_models(module=sub) if group]
    return out


HF_TASKS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "ctc": "MODEL_FOR_CTC_MAPPING_NAMES",
    "speech-seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "vision-text": "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
}


def _hf_mapping(task: str) -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, HF_TASKS[task], {})
    return {k: (v[0] if isinstance(v, (tuple, list)) else v) for k, v in mapping.items()}


def hf_models() -> list[str]:
    """One entry per architecture (model type), with the first task that lists it."""
    seen: dict[str, str] = {}
    for task in HF_TASKS:
        for model_type in _hf_mapping(task):
            seen.setdefault(model_type, task)
    return [f"hf:{t}" for t in sorted(seen)]


def enumerate_models(families: list[str]) -> list[str]:
    """The sweep's models, cached per library versions (listing timm alone takes minutes)."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "-"

    key = "-".join(f"{p}{version(p)}" for p in ("timm", "torchvision", "transformers"))
    cache = ROOT / "benchmarks" / ".cache" / f"coverage-models-{key}.json"
    listed: dict[str, list[str]] = json.loads(cache.read_text()) if cache.exists() else {}
    finders = {"torchvision": torchvision_models, "hf": hf_models, "timm": timm_models}
    specs: list[str] = []
    for fam in ("hf", "timm", "torchvision"):
        if fam not in families:
            continue
        if not _has(fam):
            print(f"coverage: {fam} not installed (`pip install -e '.[dev]'`); skipped")
            continue
        if fam not in listed:
            listed[fam] = finders[fam]()
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(listed, indent=1))
        specs += listed[fam]
    return specs


# -- building ----------------------------------------------------------------------------------
_SHRINK = {
    64: (
        "hidden_size",
        "d_model",
        "n_embd",
        "embed_dim",
        "word_embed_proj_dim",
        "projection_dim",
        "pooler_hidden_size",  # DeBERTa's pooler reads the hidden states
    ),
    2: (
        "num_hidden_layers",
        "n_layer",
        "n_layers",
        "num_layers",
        "encoder_layers",
        "decoder_layers",
        "num_decoder_layers",
        "num_encoder_layers",
    ),
    4: (
        "num_attention_heads",
        "n_head",
        "n_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
    ),
    256: (  # 4 x hidden: GPT-2's, BERT's, T5's, BLOOM's and ViT's ratio (Llama's is 2.7 gated)
        "intermediate_size",
        "ffn_dim",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "d_ff",
        "n_inner",
        "decoder_intermediate_size",
    ),
}


def shrink_config(cfg: Any, depth: int = 0) -> Any:
    """Shrink a transformers config in place: widths 64, 2 layers, 4 heads (2 KV heads)."""
    for value, names in _SHRINK.items():
        for name in names:
            old = getattr(cfg, name, None)
            if isinstance(old, int) and not isinstance(old, bool) and old > value:
                setattr(cfg, name, value)
    kv = getattr(cfg, "num_key_value_heads", None)
    if isinstance(kv, int) and kv > 2:
        cfg.num_key_value_heads = 2
    hd = getattr(cfg, "head_dim", None)
    if isinstance(hd, int) and hd > 16:
        cfg.head_dim = 16
    dkv = getattr(cfg, "d_kv", None)
    if isinstance(dkv, int) and dkv > 16:
        cfg.d_kv = 16
    depths = getattr(cfg, "depths", None)
    if isinstance(depths, (list, tuple)) and all(isinstance(d, int) for d in depths):
        cfg.depths = [1] * len(depths)
    heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
    if isinstance(heads, int) and isinstance(hidden, int) and heads:
        if "head_dim" in vars(cfg) and cfg.head_dim is None:  # HunYuan, Nemotron read it
            cfg.head_dim = hidden // heads
        rot = getattr(cfg, "rotary_dim", None)
        if isinstance(rot, int) and rot > hidden // heads:  # CodeGen, GPT-J
            cfg.rotary_dim = hidden // heads // 2
    _keep_layer_kinds(cfg)
    _shrink_mla(cfg)
    _shrink_ssm(cfg)
    _shrink_linear_attention(cfg)
    for name in ("image_size",):
        s = getattr(cfg, name, None)
        if isinstance(s, int) and s > 224:
            setattr(cfg, name, 224)
    if depth < 2:
        for sub in _sub_configs(cfg):
            shrink_config(sub, depth + 1)
    return cfg


def _shrink_mla(cfg: Any) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, Kimi, ...): its rope, no-rope and
    value head sizes and latent ranks, which the generic head_dim of 16 does not reach."""
    if not isinstance(getattr(cfg, "qk_rope_head_dim", None), int):
        return
    cfg.qk_rope_head_dim = cfg.qk_nope_head_dim = 16
    if isinstance(getattr(cfg, "num_key_value_heads", None), int):
        cfg.num_key_value_heads = cfg.num_attention_heads  # every head has its own latent k/v
    for name, value in (("v_head_dim", 16), ("qk_head_dim", 32), ("kv_lora_rank", 32)):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, value)
    if isinstance(getattr(cfg, "q_lora_rank", None), int):
        cfg.q_lora_rank = 32
    if isinstance(getattr(cfg, "head_dim", None), int):
        cfg.head_dim = 16  # DeepSeek: the rope head size
    for name, value in (("linear_head_dim", 16), ("linear_num_heads", 4)):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, value)


def _shrink_linear_attention(cfg: Any) -> None:
    """Linear attention (Qwen3.5's and Qwen3-Next's gated delta rule, OLMo-hybrid, Kimi) and
    RecurrentGemma's recurrence at the sweep's widths: head size 16, at most 4 value heads
    (key heads in their original proportion), recurrence width the hidden size."""
    for name in ("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"):
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) > 16:
            setattr(cfg, name, 16)
    v, k = getattr(cfg, "linear_num_value_heads", None), getattr(cfg, "linear_num_key_heads", None)
    if isinstance(v, int) and isinstance(k, int) and v > 4:
        cfg.linear_num_value_heads, cfg.linear_num_key_heads = 4, max(1, 4 * k // v)
    if isinstance(getattr(cfg, "linear_num_heads", None), int) and cfg.linear_num_heads > 4:
        cfg.linear_num_heads = 4
    hidden = getattr(cfg, "hidden_size", None)
    if isinstance(getattr(cfg, "lru_width", None), int) and isinstance(hidden, int):
        cfg.lru_width = hidden


#: (heads, head size, expansion) of Mamba-2 mixers: heads x head size = expansion x hidden
_SSM = (
    ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
    ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
    ("num_heads", "head_dim", "expand"),
    ("mamba_num_heads", "mamba_head_dim", "expand"),
)


def _shrink_ssm(cfg: Any) -> None:
    """Mamba-2 heads that span the mixer's width (expansion x the shrunk hidden size)."""
    for name in ("mamba_d_state", "ssm_state_size", "state_size"):  # Mamba-1's default, 16
        if isinstance(vars(cfg).get(name), int) and vars(cfg)[name] > 16:
            setattr(cfg, name, 16)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(hidden, int):
        return
    for heads, size, expand in _SSM:
        h, d, e = (getattr(cfg, n, None) for n in (heads, size, expand))
        if not all(isinstance(v, int) for v in (h, d, e)) or h * d == e * hidden:
            continue
        if heads == "num_heads" and not hasattr(cfg, "state_size"):
            continue  # an attention config's num_heads
        d = 16
        setattr(cfg, size, d)
        setattr(cfg, heads, max(1, e * hidden // d))
        if isinstance(getattr(cfg, "mamba_d_ssm", None), int):
            cfg.mamba_d_ssm = e * hidden
        return


def _each_kind(kinds: list[Any], n: int) -> list[Any]:
    """``n`` layer kinds from ``kinds`` (a hybrid's per-layer list) that hold every kind it
    has, in their order: ``[lin, lin, lin, full]`` in 2 layers is ``[lin, full]``."""
    first = {kind: kinds.index(kind) for kind in dict.fromkeys(kinds)}
    picked = set(list(first.values())[:n])
    for i in range(len(kinds)):  # then the earliest others, up to n
        if len(picked) >= n:
            break
        picked.add(i)
    return [kinds[i] for i in sorted(picked)]


#: per-layer kind lists of hybrid models (attention beside Mamba, linear attention, recurrence)
_KIND_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "block_types")


def _keep_layer_kinds(cfg: Any) -> None:
    """Two layers of a hybrid keep one layer of each kind (truncating its per-layer list to
    the first two would leave a Qwen3.5, OLMo-hybrid or Zamba without attention, which these
    models do not support): the number of layers grows to the number of kinds."""
    lists = {  # set ones only (Jamba's and Bamba's are properties derived from the below)
        name: list(vars(cfg)[name])
        for name in _KIND_LISTS
        if isinstance(vars(cfg).get(name), (list, tuple)) and vars(cfg)[name]
    }
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool):
        return
    if lists:
        n = max([n, *(len(dict.fromkeys(v)) for v in lists.values())])
        for name, kinds in lists.items():
            if len(kinds) >= n or name != "block_types":  # block_types cycles (RecurrentGemma)
                setattr(cfg, name, _each_kind(kinds, n))
        cfg.num_hidden_layers = n
    blocks = getattr(cfg, "layers_block_type", None)
    if isinstance(getattr(cfg, "hybrid_layer_ids", None), list) and isinstance(blocks, list):
        cfg.hybrid_layer_ids = [i for i, k in enumerate(blocks) if k == "hybrid"]  # Zamba2
    if getattr(cfg, "attn_layer_period", None) and n <= 2:  # Jamba, Zamba: one attention layer
        cfg.attn_layer_period, cfg.attn_layer_offset = n, n - 1
    if hasattr(cfg, "attn_layer_indices") and not getattr(cfg, "attn_layer_indices", None):
        cfg.attn_layer_indices = [n - 1]  # Bamba: Mamba layers only by default


def _sub_configs(cfg: Any) -> Any:
    """The configs held by ``cfg`` (text, vision, encoder, decoder, ...)."""
    from transformers import PretrainedConfig

    for name in dir(cfg):
        if name.startswith("_"):
            continue
        with contextlib.suppress(Exception):
            sub = getattr(cfg, name)
            if isinstance(sub, PretrainedConfig) and sub is not cfg:
                yield sub


#: vocabulary of the shrunk language models: at hidden 64 a 32,000-token LM head would be 97% of
#: the model's MACs (SmolLM2-135M's is 21%, Llama-2-7B's 2%), so a sweep at the original size
#: would measure the head, not the model; 512 tokens keep its share near a real model's
VOCAB = 512


def shrink_vocab(cfg: Any, vocab: int = VOCAB, depth: int = 0) -> bool:
    """Shrink ``vocab_size`` (and token ids past it) in place; ``True`` when something changed."""
    changed = False
    old = getattr(cfg, "vocab_size", None)
    if isinstance(old, int) and not isinstance(old, bool) and old > vocab:
        cfg.vocab_size = vocab
        changed = True
        taken: set[int] = set()
        for name in sorted(vars(cfg)):
            tid = getattr(cfg, name, None)
            if not (name.endswith(("_token_id", "_token_index")) and isinstance(tid, int)):
                continue
            if tid >= vocab:  # special tokens past the new end move to its last ids
                new = vocab - 1 - len(taken)
                taken.add(new)
                setattr(cfg, name, new)
    if depth < 2:
        for sub in _sub_configs(cfg):
            changed |= shrink_vocab(sub, vocab, depth + 1)
    return changed


def _hf_inputs(model: Any, cfg: Any, task: str) -> list[Any]:
    """Candidate inputs for a Hugging Face model, most likely first."""
    g = torch.Generator().manual_seed(0)
    text = getattr(cfg, "text_config", None) or cfg
    vocab = int(getattr(text, "vocab_size", 1000) or 1000)
    ids = torch.randint(3, max(4, min(vocab, 1000)), (1, 16), generator=g)
    name = getattr(model, "main_input_name", "input_ids")
    cands: list[Any] = []
    if name == "input_ids":
        base = {"input_ids": ids}
        if task == "vision-text":
            vcfg = getattr(cfg, "vision_config", cfg)
            s = int(getattr(vcfg, "image_size", 224))
            px = torch.randn(1, int(getattr(vcfg, "num_channels", 3)), s, s, generator=g)
            cands.append({"input_ids": ids, "pixel_values": px})
        if getattr(cfg, "is_encoder_decoder", False):
            cands.append({**base, "decoder_input_ids": ids[:, :8]})
        cands.append(base)
    elif name == "pixel_values":
        s = int(getattr(cfg, "image_size", 224) or 224)
        c = int(getattr(cfg, "num_channels", 3) or 3)
        cands += [{"pixel_values": torch.randn(1, c, s, s, generator=g)}]
        cands += [{"pixel_values": torch.randn(1, c, 224, 224, generator=g)}]
    elif name == "input_values":
        cands.append({"input_values": torch.randn(1, 16000, generator=g)})
    elif name == "input_features":
        mel = int(getattr(cfg, "num_mel_bins", 80) or 80)
        frames = 2 * int(getattr(cfg, "max_source_positions", 1500) or 1500)
        feats = int(getattr(cfg, "input_feat_per_channel", 80) or 80)
        chans = int(getattr(cfg, "input_channels", 1) or 1)
        extra = {"decoder_input_ids": ids[:, :8]} if getattr(cfg, "is_encoder_decoder", 0) else {}
        cands.append({"input_features": torch.randn(1, mel, frames, generator=g), **extra})
        cands.append({"input_features": torch.randn(1, 64, feats * chans, generator=g), **extra})
    else:
        cands.append({name: ids})
    return cands


def build(spec: str) -> tuple[Any, Any, str]:
    """``(model in eval mode, example inputs, group)``; the same weights on every call."""
    family, name = spec.split(":", 1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "timm":
            import timm

            model = timm.create_model(name, pretrained=False).eval()
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            c, *hw = tuple(cfg.get("input_size", (3, 224, 224)))
            g = torch.Generator().manual_seed(0)
            cands = [
                torch.randn(1, c, *_small(hw), generator=g),
                torch.randn(1, c, *hw, generator=g),
            ]
            group = "timm"
        elif family == "torchvision":
            import torchvision.models as tvm

            group = _torchvision_group(name)
            # detectors and segmenters would download an ImageNet backbone by default
            extra = {"weights_backbone": None} if group in ("detection", "segmentation") else {}
            model = tvm.get_model(name, weights=None, **extra).eval()
            g = torch.Generator().manual_seed(0)
            if group == "detection":
                cands = [([torch.rand(3, 128, 128, generator=g)],)]
            elif group == "video":
                # MViT takes 16 frames of 224 x 224 only; S3D needs more than 8 small frames
                cands = [
                    torch.randn(1, 3, 8, 112, 112, generator=g),
                    torch.randn(1, 3, 16, 224, 224, generator=g),
                ]
            elif group == "segmentation":
                cands = [torch.randn(1, 3, 128, 128, generator=g)]
            else:
                size = 299 if name.startswith("inception") else 224
                small = _small([size, size])
                cands = [torch.randn(1, 3, *small, generator=g), torch.randn(1, 3, size, size)]
        elif family == "hf":
            import transformers
            from transformers import CONFIG_MAPPING

            task = next(t for t in HF_TASKS if name in _hf_mapping(t))
            cls = getattr(transformers, _hf_mapping(task)[name])
            built = None
            for small_vocab in (True, False):  # the original vocabulary where 512 fails
                cfg = shrink_config(CONFIG_MAPPING[name]())
                if small_vocab and not shrink_vocab(cfg):
                    continue
                try:
                    model = cls(cfg).eval()
                    cands = _hf_inputs(model, cfg, task)
                    if small_vocab:
                        _first_that_runs(model, cands)
                    built = model
                    break
                except Exception:
                    if not small_vocab:
                        raise
            model = built
            group = task
        else:
            raise ValueError(f"unknown family {family!r}")
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise ValueError(f"too large for the sweep ({params / 1e6:.0f} M parameters)")
    return model, _first_that_runs(model, cands), group


#: vision models run at half their resolution where they accept it (a quarter of the time:
#: the sweep measures whether transforms apply, not accuracy); fixed-size ones at their own
SMALL = 0.5


def _small(hw: list[int]) -> list[int]:
    return [max(32, int(v * SMALL) // 32 * 32) for v in hw]


def _first_that_runs(model: Any, cands: list[Any]) -> Any:
    last: Exception | None = None
    for x in cands:
        try:
            with torch.no_grad():
                _call(model, x)
            return x
        except Exception as e:
            last = e
    raise RuntimeError(f"forward fails before any transform: {_short(last)}")


def _torchvision_group(name: str) -> str:
    import torchvision.models as tvm

    for sub, group in (
        (tvm.segmentation, "segmentation"),
        (tvm.detection, "detection"),
        (tvm.video, "video"),
    ):
        if name in tvm.list_models(module=sub):
            return group
    return "classification"


def _call(model: Any, x: Any) -> Any:
    inp = as_inputs(x)
    return inp.call(model)


def _main_tensors(out: Any) -> list[torch.Tensor]:
    t = first_tensor(out)
    if t is not None:
        return [t]
    return [t for t in output_tensors(out) if t.is_floating_point()][:1]


def _short(e: BaseException | None) -> str:
    if e is None:
        return ""
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


def _raised_in_nnslim(e: BaseException) -> bool:
    """Whether the innermost frame that raised ``e`` is nnslim's own code (an nnslim error,
    naming the module), not a raw error from torch or the model."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and f"{os.sep}nnslim{os.sep}" in frames[-1].filename


# -- one model ---------------------------------------------------------------------------------
def _same_shape(out: list[torch.Tensor], ref: list[torch.Tensor], group: str) -> bool:
    """Whether the outputs keep their shapes; a detector's box count depends on its scores,
    so detection outputs keep their per-box shape (``[N, 4]`` boxes stay ``[M, 4]``)."""
    if len(out) != len(ref):
        return False
    if group == "detection":
        return all(a.shape[1:] == b.shape[1:] for a, b in zip(out, ref))
    return all(a.shape == b.shape for a, b in zip(out, ref))


def run_cell(spec: str, column: str, compile_: bool) -> dict[str, Any]:
    model, x, group = build(spec)
    with torch.no_grad():
        ref = _main_tensors(_call(model, x))
    cell: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        report = TRANSFORMS[column]().apply(model, x)
    except Exception as e:
        cell.update(
            status="failed",
            error=_short(e),
            nnslim_error=_raised_in_nnslim(e),
            seconds=round(time.perf_counter() - t0, 2),
        )
        return cell
    cell["seconds"] = round(time.perf_counter() - t0, 2)
    changed = bool(report.all_changes())
    cell["changed"] = len(report.all_changes())
    if not changed:
        reasons = [n for n in _notes(report) if "changed nothing" in n]
        cell.update(status="unchanged", reason=reasons[0] if reasons else "")
        return cell
    try:
        with torch.no_grad():
            out = _main_tensors(_call(model, x))
    except Exception as e:
        cell.update(status="failed", error="forward after: " + _short(e), nnslim_error=False)
        return cell
    same_shape = _same_shape(out, ref, group)
    finite = all(bool(torch.isfinite(t).all()) for t in out)
    cell.update(same_shape=same_shape, finite=finite)
    if same_shape and ref and out[0].shape == ref[0].shape:
        a, b = out[0].double(), ref[0].double()
        cell["rel_error"] = float((a - b).norm() / b.norm().clamp_min(1e-12))
    before, after = _first_last_profiles(report)
    if before is not None and after is not None:
        cell["macs"] = after.macs / before.macs if before.macs else None
        b0 = before.param_bytes + before.buffer_bytes
        cell["bytes"] = (after.param_bytes + after.buffer_bytes) / b0 if b0 else None
    cell["status"] = "applied" if same_shape and finite else "failed"
    if column.startswith("prune") and not _removes_15pct(cell):
        cell["why"] = _why_short(report)
    if not (same_shape and finite):
        cell["error"] = "output shape changed" if not same_shape else "output not finite"
        cell["nnslim_error"] = False
    cell["save_load"] = _save_load(spec, model, x, out)
    if compile_:
        cell["compile"] = _compiles(model, x)
    return cell


def _why_short(report: Any) -> str:
    """The most frequent reasons a Prune report gives for what it left (for the docs' list of
    models where it removed under 15% of MACs)."""
    import collections

    skips = [s.reason for s in report.all_skips() if "produces the model output" not in s.reason]
    common = collections.Counter(r.split(":")[0][:110] for r in skips).most_common(2)
    notes = [n[:110] for n in _notes(report) if n.startswith("the hidden width")]
    return "; ".join([*notes[:1], *(f"{n} x {r}" for r, n in common)])


def _notes(report: Any) -> list[str]:
    out = list(report.notes)
    for s in report.steps:
        out += _notes(s)
    return out


def _first_last_profiles(report: Any) -> tuple[Any, Any]:
    if report.steps:
        return report.steps[0].before, report.steps[-1].after
    return report.before, report.after


def _save_load(spec: str, model: Any, x: Any, out: list[torch.Tensor]) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        try:
            nnslim.save(model, path)
        except Exception as e:
            return "save failed: " + _short(e)
        try:
            fresh, _, _ = build(spec)
            loaded = nnslim.load(path, fresh)
            with torch.no_grad():
                again = _main_tensors(_call(loaded, x))
        except Exception as e:
            return "load failed: " + _short(e)
    return "exact" if all(torch.equal(a, b) for a, b in zip(again, out)) else "differs"


def _compiles(model: Any, x: Any) -> str:
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            _call(compiled, x)
        return "ok"
    except Exception as e:
        return "failed: " + _short(e)
    finally:
        torch._dynamo.reset()


def run_model(spec: str, columns: list[str], compile_: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"model": spec, "family": spec.split(":", 1)[0], "commit": _commit()}
    t0 = time.perf_counter()
    try:
        model, x, group = build(spec)
        row.update(built=True, group=group, params=sum(p.numel() for p in model.parameters()))
        row["inputs"] = {
            k: list(v.shape) for k, v in as_inputs(x).kwargs.items() if torch.is_tensor(v)
        } or [list(t.shape) for t in as_inputs(x).tensors()]
        del model
    except Exception as e:
        row.update(built=False, reason=_short(e))
        return row
    row["cells"] = {}
    for column in columns:
        try:
            row["cells"][column] = run_cell(spec, column, compile_)
        except Exception as e:  # a failure of the sweep itself (not of the transform)
            row["cells"][column] = {"status": "failed", "error": "sweep: " + _short(e)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# -- the sweep ---------------------------------------------------------------------------------
def sweep(
    specs: list[str],
    columns: list[str],
    compile_: bool,
    out: Path,
    timeout: int,
    fresh: bool,
    jobs: int = 1,
    redo: str = "",
) -> list[dict[str, Any]]:
    """Run every model of ``specs`` not already in ``out``, ``jobs`` processes at a time.

    ``redo``: comma-separated models to run again although they are in ``out``, or ``failed``
    for every row with a cell that is not *ok* (or that crashed).
    """
    rows: dict[str, dict[str, Any]] = {}
    if out.exists() and not fresh:
        rows = {r["model"]: r for r in json.loads(out.read_text()).get("models", [])}
    again = set(_redo(rows, redo, columns))  # their old rows stay until replaced
    todo = [s for s in specs if s not in rows or s in again]
    print(f"coverage: {len(todo)} of {len(specs)} models to run, {jobs} at a time", flush=True)

    def one(spec: str) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", spec, "--columns", ",".join(columns)]
        cmd += ["--jobs", str(jobs)]  # the process's share of the cores
        if compile_:
            cmd.append("--compile")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                row = _crashed(spec, f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            row = _crashed(spec, f"timed out after {timeout} s")
        return row, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(one, spec): spec for spec in todo}
        for i, fut in enumerate(as_completed(futures)):
            spec = futures[fut]
            row, took = fut.result()
            rows[spec] = row
            print(
                f"[{i + 1}/{len(todo)}] {spec}: {_row_line(row, columns)} ({took:.0f} s)",
                flush=True,
            )
            _write(out, _in_order(rows, specs), columns)
    return _in_order(rows, specs)


def _in_order(rows: dict[str, dict[str, Any]], specs: list[str]) -> list[dict[str, Any]]:
    """Rows of ``specs`` in their order, then any other rows of the file (kept, not lost)."""
    first = [rows[s] for s in specs if s in rows]
    return first + [r for k, r in rows.items() if k not in set(specs)]


def _redo(rows: dict[str, dict[str, Any]], redo: str, columns: list[str]) -> list[str]:
    if not redo:
        return []
    if redo == "uncompiled":  # rows with an applied cell that did not run torch.compile
        return [
            spec
            for spec, r in rows.items()
            if any(
                c.get("status") == "applied" and "compile" not in c
                for c in r.get("cells", {}).values()
            )
        ]
    if redo != "failed":
        return [s for s in redo.split(",") if s]
    return [
        spec
        for spec, r in rows.items()
        if r.get("built")
        and (r.get("crashed") or any(_mark(r["cells"].get(c)) != "ok" for c in columns))
    ]


def _commit() -> str:
    """The nnslim commit a row was measured at (a long sweep may span several)."""
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(Path(nnslim.__file__).resolve().parent),
                "rev-parse",
                "--short",
                "HEAD",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _crashed(spec: str, why: str) -> dict[str, Any]:
    """The row of a model whose process died or hung."""
    return {
        "model": spec,
        "family": spec.split(":", 1)[0],
        "commit": _commit(),
        "built": True,
        "crashed": why,
        "cells": {},
    }


def _row_line(row: dict[str, Any], columns: list[str]) -> str:
    if not row.get("built"):
        return "not built: " + row.get("reason", "")[:80]
    if row.get("crashed"):
        return "crashed: " + row["crashed"][:80]
    return " ".join(f"{c}={_mark(row['cells'].get(c))}" for c in columns)


def _mark(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "?"
    s = cell.get("status")
    if s == "applied":
        return "ok" if cell.get("save_load") == "exact" else "ok*"
    if s == "unchanged":
        return "none"
    return "FAIL" if not cell.get("nnslim_error") else "err"


def _write(
    out: Path, rows: list[dict[str, Any]], columns: list[str], more: list[str] | None = None
) -> None:
    command = "python " + " ".join(sys.argv)
    commands: list[str] = []
    if out.exists():  # every run that wrote rows into the file (a sweep, its redos, merges)
        with contextlib.suppress(Exception):
            old = json.loads(out.read_text())
            commands = list(old.get("commands") or [old["command"]])
    commands = list(dict.fromkeys([*commands, *(more or []), command]))
    payload = {
        "command": command,
        "commands": commands,
        "environment": environment(),
        "columns": columns,
        "summary": summarize(rows, columns),
        "models": rows,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, out)


def merge(other: Path, out: Path) -> None:
    """Replace the rows of ``out`` by those of ``other`` (same model), add the new ones, and
    recompute the summary; the commands of both runs are kept."""
    mine, theirs = json.loads(out.read_text()), json.loads(other.read_text())
    rows = {r["model"]: r for r in mine["models"]}
    rows.update({r["model"]: r for r in theirs["models"]})
    ordered = sorted(rows.values(), key=lambda r: (FAMILY_ORDER.index(r["family"]), r["model"]))
    _write(out, ordered, mine["columns"], theirs.get("commands") or [theirs["command"]])


#: the order families run in (and appear in the JSON)
FAMILY_ORDER = ["hf", "timm", "torchvision"]


def summarize(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, Any]:
    """The goal figures, overall and per family."""

    def figures(rs: list[dict[str, Any]]) -> dict[str, Any]:
        built = [r for r in rs if r.get("built")]
        cells = [
            (r["model"], c, r["cells"].get(c) or {"status": "failed", "error": "crashed"})
            for r in built
            for c in columns
        ]
        applied = [x for x in cells if x[2].get("status") == "applied"]
        unchanged = [x for x in cells if x[2].get("status") == "unchanged"]
        failed = [x for x in cells if x[2].get("status") == "failed"]
        prune = [r["cells"].get("prune-ratio") for r in built if r["cells"].get("prune-ratio")]
        pruned_15 = [c for c in prune if _removes_15pct(c)]
        return {
            "models": len(rs),
            "built": len(built),
            "not_built": len(rs) - len(built),
            "cells": len(cells),
            "applied": len(applied),
            "applied_pct": _pct(len(applied), len(cells)),
            "unchanged": len(unchanged),
            "unchanged_without_reason": sum(1 for x in unchanged if not x[2].get("reason")),
            "failed": len(failed),
            "failed_raw": sum(1 for x in failed if not x[2].get("nnslim_error")),
            "save_load_exact_pct": _pct(
                sum(1 for x in applied if x[2].get("save_load") == "exact"), len(applied)
            ),
            "prune_ratio_15pct_macs_pct": _pct(len(pruned_15), len(built)),
            **_compile_figures(applied),
        }

    families = sorted({r["family"] for r in rows})
    return {
        "all": figures(rows),
        **{f: figures([r for r in rows if r["family"] == f]) for f in families},
    }


def _compile_figures(applied: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """``torch.compile`` figures over the applied cells that ran it (``--compile``)."""
    ran = [x for x in applied if "compile" in x[2]]
    if not ran:
        return {}
    ok = sum(1 for x in ran if x[2]["compile"] == "ok")
    return {"compile_cells": len(ran), "compile_ok_pct": _pct(ok, len(ran))}


def _removes_15pct(cell: dict[str, Any]) -> bool:
    """The pruning goal for one model: ``Prune(ratio=0.3)`` applied and removed 15% of MACs."""
    return cell.get("status") == "applied" and (cell.get("macs") or 1) <= 0.85


def _pct(a: int, b: int) -> float | None:
    return round(100 * a / b, 1) if b else None


def print_summary(summary: dict[str, Any]) -> None:
    keys = [
        "models",
        "built",
        "applied_pct",
        "unchanged",
        "unchanged_without_reason",
        "failed",
        "failed_raw",
        "save_load_exact_pct",
        "prune_ratio_15pct_macs_pct",
    ]
    rows = [[fam, *[v.get(k) for k in keys]] for fam, v in summary.items()]
    print_table(["family", *keys], rows, title="coverage")


def write_rst(payload: dict[str, Any], path: Path = RST) -> None:
    """``docs/coverage.rst`` from the sweep's JSON."""
    columns = payload["columns"]
    s = payload["summary"]
    env = payload["environment"]
    rows = payload["models"]
    commits = sorted({r.get("commit", "?") for r in rows})
    hours = sum(r.get("seconds") or 0 for r in rows) / 3600
    commands = payload.get("commands") or [payload["command"]]
    lines = [
        "Coverage",
        "========",
        "",
        ".. This file is generated by benchmarks/coverage.py; do not edit it by hand.",
        "",
        "Every transform on models that no test names, enumerated from timm, torchvision and "
        "transformers (one smallest variant per timm module; every torchvision classification, "
        "segmentation, detection and video model; every transformers architecture in the auto "
        "mappings for causal LM, seq2seq LM, sequence classification, masked LM, CTC, speech "
        "seq2seq, image classification and vision-text, built from its config with hidden 64, "
        "2 layers, 4 heads, 2 KV heads, MLP 256 and a 512-token vocabulary). Random weights, "
        "nothing downloaded; vision models at half their resolution where they accept it.",
        "",
        f"Produced on torch {env['torch']} ({env['date']}) by these runs of "
        f"``benchmarks/coverage.py`` (a full sweep, then models redone after fixes; each row "
        f"records the commit it was measured at: {', '.join(commits)}):",
        "",
        *[f"* ``{_rst_escape(_short_command(c))}``" for c in commands],
        "",
        f"The models took {hours:.1f} hours of one CPU core in all (``--jobs 2`` on the 2-core "
        f"machine takes about half that); run it outside CI.",
        "",
        "A cell is *ok* when the transform changed the model, the forward runs with the same "
        "output shape (detectors: the same per-box shape) and finite values, and "
        "``nnslim.save``/``load`` reproduces the output exactly (*ok\\** when save/load did "
        "not); *none* when it changed nothing (the report says why); *err* when it failed with "
        "an nnslim error naming the module and the way around it; *FAIL* when a raw error came "
        "from inside.",
        "",
        "Summary",
        "-------",
        "",
    ]
    for fam, v in s.items():
        if fam == "all":
            continue
        lines.append(
            f"* **{fam}**: {v['built']} of {v['models']} models built and run; "
            f"{v['applied_pct']}% of {v['cells']} cells applied, {v['unchanged']} unchanged "
            f"with a reason, {v['failed']} failed ({v['failed_raw']} raw); save/load exact on "
            f"{v['save_load_exact_pct']}% of applied cells; ``Prune(ratio=0.3)`` removes 15% "
            f"of MACs or more on {v['prune_ratio_15pct_macs_pct']}% of the built models"
            + (
                f"; ``torch.compile`` runs {v['compile_ok_pct']}% of {v['compile_cells']} "
                f"compiled cells"
                if "compile_cells" in v
                else ""
            )
            + "."
        )
    lines.append("")
    keys = [
        ("built", "models built"),
        ("applied_pct", "cells applied (%)"),
        ("unchanged", "unchanged"),
        ("failed", "failed"),
        ("failed_raw", "raw errors"),
        ("save_load_exact_pct", "save/load exact (%)"),
        ("prune_ratio_15pct_macs_pct", "Prune(0.3) >= 15% MACs (%)"),
    ]
    lines += _rst_table(
        ["family", *[k[1] for k in keys]],
        [[fam, *[str(v.get(k[0])) for k in keys]] for fam, v in s.items()],
    )
    by_family: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    measured = {r["model"] for r in rows}
    try:
        enumerated = enumerate_models(sorted(by_family))
    except Exception:  # the enumeration needs every family installed
        enumerated = []
    for fam, fam_rows in sorted(by_family.items()):
        lines += ["", fam, "-" * len(fam), ""]
        table = []
        for r in sorted(fam_rows, key=lambda r: r["model"]):
            name = r["model"].split(":", 1)[1]
            if not r.get("built"):
                table.append([name, *["-"] * len(columns)])
            elif r.get("crashed"):
                table.append([name, *["crash"] * len(columns)])
            else:
                table.append([name, *[_mark(r["cells"].get(c)) for c in columns]])
        lines += _rst_table(["model", *columns], table)
        no_compile = [
            (r["model"], c, cell["compile"])
            for r in fam_rows
            for c, cell in sorted(r.get("cells", {}).items())
            if cell.get("compile", "ok") != "ok"
        ]
        if no_compile:
            lines += ["", "``torch.compile`` failed on:", ""]
            lines += [f"* ``{m}`` {c}: {_rst_escape(why)}" for m, c, why in no_compile]
        missing = [m for m in enumerated if m.startswith(f"{fam}:") and m not in measured]
        if missing:
            lines += [
                "",
                f"Enumerated but not measured by these runs ({len(missing)}; the sweep was cut "
                f"short after fixes dropped their earlier rows):",
                "",
                ", ".join(f"``{m.split(':', 1)[1]}``" for m in missing),
            ]
        short = [
            (r["model"], r["cells"]["prune-ratio"])
            for r in fam_rows
            if r.get("built")
            and not r.get("crashed")
            and "prune-ratio" in r.get("cells", {})
            and not _removes_15pct(r["cells"]["prune-ratio"])
        ]
        if short:
            lines += ["", "``Prune(ratio=0.3)`` removes under 15% of MACs on:", ""]
            lines += [
                f"* ``{m}``: "
                + (f"MACs x{c['macs']:.3f}" if c.get("macs") is not None else c.get("status", ""))
                + (f"; {_rst_escape(c['why'])}" if c.get("why") else "")
                for m, c in short
            ]
        apart = [r for r in fam_rows if not r.get("built")]
        if apart:
            lines += ["", "Not built or not runnable before any transform:", ""]
            lines += [f"* ``{r['model']}``: {_rst_escape(r.get('reason', ''))}" for r in apart]
    path.write_text("\n".join(lines) + "\n")


def _short_command(command: str) -> str:
    """A command with its long model lists (``--redo``, ``--only``) as a count."""
    words = command.split(" ")
    for i, w in enumerate(words):
        if w.count(",") >= 3 and ":" in w:
            words[i] = f"<{w.count(',') + 1} models>"
        elif w.startswith("/") and ("/tmp/" in w or "/work/" in w):
            words[i] = f"<{Path(w).name}>"
    return " ".join(words)


def _rst_escape(text: str) -> str:
    return text.replace("*", "\\*").replace("`", "'").replace("|", "/")


def _rst_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    sep = "  ".join("=" * w for w in widths)
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return [sep, fmt(headers), sep, *[fmt(r) for r in rows], sep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the QUICK models only")
    ap.add_argument("--only", default="", help="comma-separated family:name entries")
    ap.add_argument("--families", default="timm,torchvision,hf")
    ap.add_argument("--columns", default=",".join(TRANSFORMS))
    ap.add_argument("--compile", action="store_true", help="also run torch.compile per cell")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    ap.add_argument("--fresh", action="store_true", help="ignore models already in the JSON")
    ap.add_argument("--jobs", type=int, default=1, help="models run at once (one thread each)")
    ap.add_argument(
        "--redo",
        default="",
        help="models to run again (comma-separated), 'failed', or 'uncompiled' (with --compile: "
        "rows with an applied cell torch.compile has not run; a sweep in slices)",
    )
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rst", action="store_true", help="only write docs/coverage.rst")
    ap.add_argument(
        "--merge",
        default="",
        help="rows of another sweep's JSON replace this one's (a family run apart), then --rst",
    )
    args = ap.parse_args()
    columns = [c for c in args.columns.split(",") if c]
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(2, args.jobs)))
    if args.one:
        print(json.dumps(run_model(args.one, columns, args.compile), default=_json_default))
        return
    name = "coverage-quick" if args.quick or args.only else "coverage"
    out = RESULTS / f"{name}.json"
    if args.merge:
        merge(Path(args.merge), out)
    if args.rst or args.merge:
        write_rst(json.loads((RESULTS / "coverage.json").read_text()))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.only:
        specs = [s for s in args.only.split(",") if s]
    elif args.quick:
        specs = QUICK
    else:
        specs = enumerate_models(args.families.split(","))
    missing = [f for f in {s.split(":")[0] for s in specs} if not _has(f)]
    if missing:
        print(f"coverage: {missing} not installed; `pip install timm` for the timm family")
        specs = [s for s in specs if s.split(":")[0] not in missing]
    t0 = time.perf_counter()
    rows = sweep(specs, columns, args.compile, out, args.timeout, args.fresh, args.jobs, args.redo)
    payload = json.loads(out.read_text())
    payload["seconds"] = round(time.perf_counter() - t0)
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print_summary(summarize(rows, columns))
    print(f"wrote {out}")
    if name == "coverage":
        write_rst(payload)
        print(f"wrote {RST}")


def _has(family: str) -> bool:
    import importlib.util

    mod = {"timm": "timm", "torchvision": "torchvision", "hf": "transformers"}[family]
    return importlib.util.find_spec(mod) is not None


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


if __name__ == "__main__":
    main()
