"""compressed-tensors: the safetensors layout vLLM and transformers read for llm-compressor
models, for Hugging Face models with nnslim's int8 layers.

* ``Int8Linear``: W8A16 in the ``pack-quantized`` format (int8 codes packed into int32 words
  and a per-channel ``weight_scale``), as llm-compressor writes it.
* ``Int8DynamicLinear`` (without a smoothing scale): W8A8 with dynamic per-token int8
  activations in the ``int-quantized`` format, as nnslim runs it.

The package's own compressor packs nnslim's codes; decompressing them must give nnslim's
dequantized weights exactly, or nothing is written.

Other layers are written as dense float weights (pruned, factorized, palettized). nnslim's
int4 keeps a floating minimum per group, which compressed-tensors' integer zero points cannot
hold exactly: such a model is refused rather than silently requantized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..modules.quantized import Int4Linear, Int8DynamicLinear, Int8Linear
from ..record.edits import RECORD_ATTR
from .hf import GUARD_ATTR

__all__ = ["write_compressed_tensors"]


def write_compressed_tensors(model: nn.Module, dense: nn.Module, directory: Path) -> None:
    """Write ``model`` into ``directory`` (``save_pretrained``'s layout plus the
    ``quantization_config``); ``dense`` is its copy with every nnslim layer a float layer."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    if not hasattr(model, "save_pretrained") or getattr(model, "config", None) is None:
        raise ValueError(
            f"nnslim.export(format='compressed-tensors'): a Hugging Face format; "
            f"{type(model).__name__} is not a transformers model. Export it to ONNX instead."
        )
    layers = {p: m for p, m in model.named_modules() if isinstance(m, _QUANTIZED)}
    int4 = [p for p, m in layers.items() if isinstance(m, Int4Linear)]
    if int4:
        raise ValueError(
            f"nnslim.export(format='compressed-tensors'): {int4[0]} is int4 with a floating "
            f"minimum per group, which compressed-tensors' integer zero points cannot hold "
            f"exactly; export it to GGUF or ONNX, or quantize with scheme='int8'."
        )
    smoothed = [p for p, m in layers.items() if m._buffers.get("smooth") is not None]
    if smoothed:
        raise ValueError(
            f"nnslim.export(format='compressed-tensors'): {smoothed[0]} divides its activations "
            f"by a smoothing scale, which the format has no field for; quantize without "
            f"smooth=, or export to ONNX."
        )
    kinds = {type(m) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(
            "nnslim.export(format='compressed-tensors'): the model mixes Int8Linear and "
            "Int8DynamicLinear layers; the format takes one scheme per file here."
        )
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    dynamic = Int8DynamicLinear in kinds
    activations = (
        QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        if dynamic
        else None
    )
    scheme = QuantizationScheme(
        targets=sorted(layers), weights=weights, input_activations=activations
    )
    # llm-compressor's formats for these schemes: W8A8 keeps int8 weights, W8A16 packs them
    # into int32 words
    fmt = "int-quantized" if dynamic else "pack-quantized"
    compressor = _compressor(fmt)
    state = dense.state_dict()
    for p, m in layers.items():
        # the package's own compressor, from the dequantized weight and nnslim's scales: it
        # rounds back to nnslim's codes; decompressing must give the same weight exactly
        w = m.qweight.float() * m.scale.float()[:, None]
        local = {"weight": w, "weight_scale": m.scale.detach().float()[:, None].clone()}
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
    dense.save_pretrained(str(directory), state_dict=state)
    if not layers:
        return
    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed"
    )
    path = directory / "config.json"
    cfg: dict[str, Any] = json.loads(path.read_text())
    cfg["quantization_config"] = config.model_dump(exclude_none=True)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


_QUANTIZED = (Int8Linear, Int8DynamicLinear, Int4Linear)


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
        if w.dim() == 2:
            layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
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
