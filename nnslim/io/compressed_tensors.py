"""compressed-tensors: the safetensors layout vLLM and transformers read for llm-compressor
models, for Hugging Face models with nnslim's int8 layers.

* ``Int8Linear``: W8A16 in the ``pack-quantized`` format (int8 codes packed into int32 words
  and a per-channel ``weight_scale``), as llm-compressor writes it.
* ``Int8DynamicLinear`` (without a smoothing scale): W8A8 with dynamic per-token int8
  activations in the ``int-quantized`` format, as nnslim runs it.
* ``Int4Linear`` with integer zero points (``Quantize(scheme="int4", zero_point="integer")``):
  W4A16 asymmetric per group in the ``pack-quantized`` format (llm-compressor's
  ``W4A16_ASYM``), one config group per group size.

The package's own compressor packs nnslim's codes; decompressing them must give nnslim's
dequantized weights exactly, or nothing is written.

Other layers are written as dense float weights (pruned, factorized, palettized; sparse
layers with their zeros: compressed-tensors dropped its 2:4 formats after 0.14 and vLLM its
2:4 kernels, so a file that carried them would load nowhere). An int4 layer with a floating
minimum per group (the default, and GGUF's ``Q4_1``) has no exact place in the format's
integer zero points: such a model is refused rather than silently requantized. Quantized
embeddings (``Int8Embedding``, ``Int4Embedding``) are written as their de-quantized float
tables (the format quantizes Linear layers only), and an LM head quantized apart from the
embedding it was tied to is written untied (``tie_word_embeddings`` false), so loading does
not tie it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modules.masks import MASK_NAME
from ..modules.quantized import Int4Linear, Int8DynamicLinear, Int8Linear
from ..record.edits import RECORD_ATTR
from .hf import GUARD_ATTR

__all__ = ["write_compressed_tensors"]


def write_compressed_tensors(model: nn.Module, dense: nn.Module, directory: Path) -> None:
    """Write ``model`` into ``directory`` (``save_pretrained``'s layout plus the
    ``quantization_config``); ``dense`` is its copy with every nnslim layer a float layer."""
    from compressed_tensors.quantization import QuantizationConfig

    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ValueError(
            f"nnslim.export(format='compressed-tensors'): a Hugging Face format; "
            f"{type(model).__name__} is not a transformers model. Export it to ONNX instead."
        )
    layers = {p: m for p, m in model.named_modules() if isinstance(m, _QUANTIZED)}
    for p, m in layers.items():
        _check_exportable(p, m)
    # one scheme per kind of layer (and int4 group size), each a config group of its targets
    groups: dict[tuple[Any, ...], list[str]] = {}
    for p, m in layers.items():
        groups.setdefault(_scheme_key(m), []).append(p)
    formats = {_FORMATS[key[0]] for key in groups}
    if len(formats) > 1:
        raise ValueError(
            "nnslim.export(format='compressed-tensors'): the model mixes Int8DynamicLinear "
            "(int8 activations: the 'int-quantized' format) with weight-only layers ('pack-"
            "quantized'); the format takes one per file. Quantize all of them one way."
        )
    schemes = {key: _scheme(key, sorted(paths)) for key, paths in groups.items()}
    fmt = formats.pop() if formats else "dense"
    compressor = _compressor(fmt) if layers else None
    state = dense.state_dict()
    # sparsity masks are nnslim's bookkeeping: the zeros are in the weights already
    for k in [k for k in state if k.rpartition(".")[2] == MASK_NAME]:
        del state[k]
    for p, m in layers.items():
        scheme = schemes[_scheme_key(m)]
        # the package's own compressor, from the dequantized weight and nnslim's scales (and
        # zero points): it rounds back to nnslim's codes; decompressing must give the same
        # weight exactly
        local = _local_state(m)
        w = local["weight"]
        packed = compressor.compress(local, scheme)
        back = compressor.decompress(dict(packed), scheme)["weight"].float()
        if not torch.equal(back, w):
            raise RuntimeError(
                f"nnslim.export(format='compressed-tensors'): {p}: compressed-tensors "
                f"decompresses to other weights than nnslim holds (largest difference "
                f"{float((back - w).abs().max()):.3g}); nothing was written."
            )
        del state[f"{p}.weight"]
        state.update({f"{p}.{k}": v.contiguous() for k, v in packed.items()})
    config = dense.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (
        getattr(config, "tie_word_embeddings", False)
        and head is not None
        and head in layers.values()
    ):
        # a quantized LM head is stored apart from the (float) embedding it was tied to:
        # transformers would otherwise tie the loaded head back to the embedding
        config.tie_word_embeddings = False
    dense.save_pretrained(str(directory), state_dict=state)
    if not layers:
        return
    config = QuantizationConfig(
        config_groups={f"group_{i}": sch for i, sch in enumerate(schemes.values())},
        format=fmt,
        quantization_status="compressed",
    )
    path = directory / "config.json"
    cfg: dict[str, Any] = json.loads(path.read_text())
    cfg["quantization_config"] = config.model_dump(exclude_none=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _check_exportable(path: str, m: nn.Module) -> None:
    """Raise, naming ``path``, where the format has no exact place for the layer."""
    where = f"nnslim.export(format='compressed-tensors'): {path}"
    if m._buffers.get("smooth") is not None:
        raise ValueError(
            f"{where} divides its activations by a smoothing scale, which the format has no "
            f"field for; quantize without smooth=, or export to ONNX."
        )
    if not isinstance(m, Int4Linear):
        return
    if m.zero_points() is None:
        raise ValueError(
            f"{where} is int4 with a floating minimum per group, which compressed-tensors' "
            f"integer zero points cannot hold exactly; quantize with "
            f"Quantize(scheme='int4', zero_point='integer'), or export to GGUF or ONNX."
        )
    if m.in_features % m.group_size:
        raise ValueError(
            f"{where} is {m.in_features} inputs wide, padded to groups of {m.group_size}; the "
            f"format's groups must divide the width. Exclude it from Quantize or pick a "
            f"group_size that divides {m.in_features}."
        )


def _scheme_key(m: nn.Module) -> tuple[Any, ...]:
    return (type(m), m.group_size) if isinstance(m, Int4Linear) else (type(m),)


def _scheme(key: tuple[Any, ...], targets: list[str]) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind = key[0]
    activations = None
    if kind is Int4Linear:
        weights = QuantizationArgs(
            num_bits=4, type="int", symmetric=False, strategy="group", group_size=key[1]
        )
    else:
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    if kind is Int8DynamicLinear:
        activations = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True
        )
    return QuantizationScheme(targets=targets, weights=weights, input_activations=activations)


def _local_state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The layer as the compressor takes it: its dequantized weight and its grid."""
    if isinstance(m, Int4Linear):
        zp = m.zero_points()
        if zp is None:  # _check_exportable refused it before
            raise RuntimeError(f"{type(m).__name__}: no integer zero points")
        scale = m.scales.float()
        w = m.dequantize().float()
        # compressed-tensors' int4 is signed: codes and zero points in [-8, 7]
        return {
            "weight": w,
            "weight_scale": scale.clone(),
            "weight_zero_point": (zp.to(torch.int16) - 8).to(torch.int8),
        }
    w = m.qweight.float() * m.scale.float()[:, None]
    return {"weight": w, "weight_scale": m.scale.detach().float()[:, None].clone()}


_QUANTIZED = (Int8Linear, Int8DynamicLinear, Int4Linear)
# llm-compressor's formats for these schemes: W8A8 keeps int8 weights, W8A16 and W4A16 pack
# them into int32 words
_FORMATS = {
    Int8Linear: "pack-quantized",
    Int4Linear: "pack-quantized",
    Int8DynamicLinear: "int-quantized",
}


def _compressor(fmt: str) -> Any:
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt)


def dense_copy(model: nn.Module, copy: Any) -> nn.Module:
    """``model`` with every nnslim layer that has a ``weight`` (factorized, palettized, int)
    as a float ``nn.Linear``/``nn.Conv2d`` of that weight."""
    twin = copy(model)
    # a plain model now: no edit record, and its own save_pretrained (not the guard that
    # refuses to save nnslim's layers through it)
    twin.__dict__.pop(RECORD_ATTR, None)
    twin.__dict__.pop(GUARD_ATTR, None)
    for path, m in list(twin.named_modules()):
        if not path or isinstance(m, (nn.Linear, nn.Conv2d)) or not _is_nnslim(m):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        bias = getattr(m, "bias", None)
        if hasattr(m, "num_embeddings"):  # a quantized embedding: the format keeps them float
            layer: nn.Module = nn.Embedding(*w.shape, padding_idx=m.padding_idx)
        elif w.dim() == 2:
            layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        else:
            continue
        with torch.no_grad():
            layer.weight.copy_(w)
            if bias is not None:
                layer.bias.copy_(bias)
        parent, _, name = path.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, name, layer)
    return twin


def _is_nnslim(m: nn.Module) -> bool:
    return type(m).__module__.startswith("nnslim.modules")
