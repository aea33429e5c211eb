"""Export a compressed model for the engines it is served with.

``format="onnx"`` writes an ONNX file for ONNX Runtime (``torch.onnx.export``, the
``torch.export``-based exporter), with nnslim's layers in the engine's own integer operators:

* ``Int8Linear`` (int8 weights): the int8 weight and its per-channel scales as initializers,
  ``DequantizeLinear`` then ``MatMul`` (which ONNX Runtime fuses into its 8-bit
  ``MatMulNBits``, rounding the activations to int8);
* ``Int8DynamicLinear``: each activation row rounded to int8 on its own scale (as nnslim's
  kernel does), ``MatMulInteger`` with the int8 weight, rescaled: the same output as nnslim's
  eager layer to float rounding (ONNX Runtime's ``DynamicQuantizeLinear`` rounds the whole
  tensor on one scale, about 1% relative error per layer);
* ``Int4Linear``: ONNX Runtime's ``MatMulNBits`` (``com.microsoft``), block size = group size,
  carrying nnslim's codes exactly (with the engine's default zero point, and each group's
  minimum as a small correction term);
* ``Int8Embedding``/``Int4Embedding``: ``Gather`` on the integer table, de-quantized per row
  read; an embedding tied to its LM head reads the head's initializer (one copy in the file);
* pruned, factorized, palettized (a codebook lookup: ``Gather`` on the indices), cross-layer
  shared and sparse models, and ``Int8Conv2d``, as the torch operators their forwards run
  (packed sparse layers: the kept weights and the bitmask as initializers, unpacked by a
  graph ONNX Runtime folds into the dense weight when it loads the file: the file keeps their
  size, the session runs at dense speed).

``format="openvino"`` converts that ONNX file with ``openvino.convert_model`` into OpenVINO IR
(``.xml`` + ``.bin``): OpenVINO reads the int8 ``DequantizeLinear`` and int4 ``MatMulNBits``
layers as compressed weights (int8 and uint4 constants, decompressed in the graph; its CPU
plugin quantizes their activations at run time), which is why the ONNX route is taken rather
than its direct torch conversion, which sees nnslim's custom operators. int8-dynamic layers
go as int8 weights (OpenVINO widens a ``MatMulInteger`` weight to int32), palettized layers
as their dense weights (it widens codebook indices to int64).

``format="compressed-tensors"`` writes a Hugging Face model's int8 layers in llm-compressor's
layout for vLLM (:mod:`nnslim.io.compressed_tensors`).

``format="gguf"`` writes Llama-family causal LMs for llama.cpp (:mod:`nnslim.io.gguf`): int4
as ``Q4_1`` and int8 as ``Q8_0`` blocks holding nnslim's codes (the token embedding too, and
a head tied to it is left out, as llama.cpp reads it), the other matrices in fp16
(``float_type=``), the norms float32; checked by loading the file with transformers' GGUF
loader.

Hugging Face models export their main output (``logits``), with the batch axis (and the
sequence axis of token inputs) dynamic. The file is written atomically; with ``check=True``
(the default) it is run in ONNX Runtime on the example inputs and compared with the model
before it is put in place.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..base.atomic import atomic_path, temp_dir_beside
from ..base.inputs import Inputs, as_inputs, first_tensor, run_model
from ..base.modules import copy_model
from ..modules.fake_quant import FakeQuantLinear
from ..modules.kernels import quantize_rows
from ..modules.quantized import (
    Int4Embedding,
    Int4Linear,
    Int8Conv2d,
    Int8DynamicLinear,
    Int8Embedding,
    Int8Linear,
)
from ..modules.shared import PalettizedConv2d, PalettizedLinear
from ..modules.sparse import SparseConv2d, SparseLinear, bit_table
from ..profiling.latency import RUNTIMES, Latency, time_runs
from .gguf import check_float_type

__all__ = ["FORMATS", "RUNTIMES", "export", "onnxruntime_latency"]

#: the formats :func:`export` writes
FORMATS = ("onnx", "openvino", "gguf", "compressed-tensors")
#: ``check=True``: the largest relative error (norm of the difference over the norm of the
#: output) accepted between ONNX Runtime and the model's math (integer layers as their
#: dequantized weights): float and integer weights alike; where the engine rounds the
#: activations to int8 (int8-dynamic layers, int4 at accuracy level 4)
_TOLERANCE = {"float": 1e-3, "int8-activations": 5e-2}
#: ``int4_compute=`` -> ``MatMulNBits``'s accuracy level: ``"int8"`` rounds the activations to
#: int8 per block (its fast path: 10-20x faster than fp32 at batch 1 on one thread here, about
#: 0.5% relative error per layer), ``"float"`` computes in float32 (exact to the codes)
_INT4_LEVELS = {"int8": 4, "float": 0}


def export(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "onnx",
    dynamic: bool = True,
    check: bool = True,
    overwrite: bool = False,
    palettized: str = "lookup",
    int4_compute: str = "int8",
    tokenizer_from: Any = None,
    float_type: str = "f16",
) -> Path:
    """Write ``model`` in an engine's format; returns the path written.

    Args:
        model: the model (any ``nn.Module``, compressed by nnslim or not); left unchanged.
        example_inputs: inputs the model runs on (a tensor, a tuple, or a dict of keyword
            tensors for Hugging Face models).
        path: the file to write.
        format: ``"onnx"`` (ONNX Runtime), ``"openvino"`` (OpenVINO IR: ``path`` is the
            ``.xml``, the weights go beside it in a ``.bin``), ``"gguf"`` (llama.cpp;
            Llama-family causal LMs: :mod:`nnslim.io.gguf`) or ``"compressed-tensors"``
            (vLLM, transformers: a ``save_pretrained`` directory;
            :mod:`nnslim.io.compressed_tensors`).
        dynamic: the batch axis (and a token input's sequence axis) may vary.
        check: run the written file in its engine on ``example_inputs`` and compare with the
            model's math (integer layers as their dequantized weights) before putting it in
            place: relative error within 1e-3, or 5e-2 where the engine rounds activations
            to int8 (int8 and int8-dynamic layers, and int4 layers at ``MatMulNBits``'s
            accuracy level 4).
        overwrite: replace an existing file.
        palettized: ONNX only: ``"lookup"`` writes palettized layers as their codebook and
            one-byte codes (a small file; the engine folds the lookup into a dense weight when
            it loads it), ``"dense"`` as their dense float weights.
        int4_compute: ONNX only: how ONNX Runtime's ``MatMulNBits`` computes int4 layers:
            ``"int8"`` (activations rounded to int8 per block: its fast path) or ``"float"``
            (float32: exact to nnslim's codes, slower at small batches).
        tokenizer_from: GGUF only: the tokenizer llama.cpp needs to run the file: a GGUF
            file (the model's source) whose tokenizer metadata is copied, or a Hugging Face
            tokenizer (a fast tokenizer object, or a directory ``save_pretrained`` wrote)
            converted as llama.cpp's converter does (byte-level BPE of the GPT-2, SmolLM and
            Llama 3 kinds; Llama SentencePiece); checked by transformers reading it back and
            encoding a text to the same ids.
        float_type: GGUF only: how matrices without an integer block type (the token
            embedding, an untied output head, float layers) are stored: ``"f16"`` (as
            llama.cpp's converter writes them; half of float32's bytes), ``"bf16"``, or
            ``"f32"`` (exact).

    Raises:
        ValueError: an unknown format, inputs the model cannot run, a fake-quant model not yet
            converted, or an exported file whose outputs differ from the model's.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ImportError: the exporter's or the engine's packages are missing
            (``pip install 'nnslim[export]'``).
        RuntimeError: ``torch.onnx.export`` failed (the message names its error).

    Nothing is written when it raises.
    """
    if int4_compute not in _INT4_LEVELS:
        raise ValueError(
            f"nnslim.export(int4_compute=...): expected 'int8' or 'float', got {int4_compute!r}."
        )
    check_float_type(float_type)
    if palettized not in ("lookup", "dense"):
        raise ValueError(
            f"nnslim.export(palettized=...): expected 'lookup' or 'dense', got {palettized!r}."
        )
    if format not in FORMATS:
        raise ValueError(
            f"nnslim.export(format=...): unknown format {format!r}; supported: "
            f"{', '.join(FORMATS)}."
        )
    target = Path(path)
    files = [target]
    if format == "openvino":
        if target.suffix != ".xml":
            raise ValueError(
                f"nnslim.export(format='openvino'): the path names the model's .xml (its weights "
                f"go beside it in a .bin), got {target.name!r}."
            )
        files.append(target.with_suffix(".bin"))
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"nnslim.export: {existing[0]} exists; remove it, choose another path, or pass "
            f"overwrite=True. Nothing was written."
        )
    fake = [p for p, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if fake:
        raise ValueError(
            f"nnslim.export: {fake[0]} is a fake-quant (QAT) layer: call nnslim.convert(model) "
            f"to make the integer layers before exporting."
        )
    if format == "gguf":
        return _gguf(model, example_inputs, target, check, tokenizer_from, float_type)
    if format == "compressed-tensors":
        return _compressed_tensors(model, example_inputs, target, check)
    return _graph_export(
        model, example_inputs, target, format, dynamic, check, palettized, int4_compute
    )


def _graph_export(
    model: nn.Module,
    example_inputs: Any,
    target: Path,
    format: str,
    dynamic: bool,
    check: bool,
    palettized: str,
    int4_compute: str,
) -> Path:
    """ONNX, and OpenVINO IR converted from it: the model as the engine's operators."""
    engine = "onnxruntime" if format == "onnx" else "openvino"
    require_packages("onnx", "onnxscript", *((engine,) if check or format == "openvino" else ()))
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TypeError("nnslim.export: example_inputs is required.")
    rules = _OPENVINO_RULES if format == "openvino" else dict(_RULES)
    if palettized == "dense":
        rules.update({k: v for k, v in _OPENVINO_RULES.items() if k in _PALETTIZED})
    if type(model) in rules or type(model) in _RULES:
        # one compressed layer exported alone: its twin replaces it inside a container
        model = nn.Sequential(model).train(model.training)
    was_training = model.training
    model.eval()
    try:
        run_model(model, inputs)  # inputs the model cannot run: a clear error, nothing written
        reference = _main_output(run_model(_dequantized(model), inputs))
        twin = _for_onnx(model, rules, _INT4_LEVELS[int4_compute])
    finally:
        model.train(was_training)
    kinds = {type(m) for m in twin.modules()}
    # ONNX Runtime fuses DequantizeLinear(int8) + MatMul into its 8-bit MatMulNBits, which
    # rounds the activations to int8 too; OpenVINO's CPU plugin quantizes the activations of
    # layers with compressed weights at run time
    int8_activations = bool(kinds & {_Int8DynamicOnnx, _Int8WeightOnnx}) or (
        _Int4Onnx in kinds and (int4_compute == "int8" or format == "openvino")
    )
    tolerance = _TOLERANCE["int8-activations" if int8_activations else "float"]
    if format == "onnx":
        with atomic_path(target) as tmp:
            _onnx(twin, inputs, tmp, dynamic)
            if check:
                _check(_run_onnxruntime(tmp, inputs), reference, tolerance, "ONNX Runtime")
        return target
    _openvino(twin, inputs, target, dynamic, reference if check else None, tolerance)
    return target


def require_packages(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"nnslim.export needs {', '.join(missing)}: pip install 'nnslim[export]' (or "
            f"pip install {' '.join(missing)})."
        )


def _main_output(output: Any) -> torch.Tensor:
    t = first_tensor(output)
    if t is None:
        raise ValueError("nnslim.export: the model's output holds no tensor to export.")
    return t


# -- the model as the exporter sees it -------------------------------------------------------
class _MainOutput(nn.Module):
    """The model returning its main output tensor (a Hugging Face model's ``logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _main_output(self.model(*args, **kwargs))


def _dequantized(model: nn.Module) -> nn.Module:
    """A copy whose integer linear layers are float ``nn.Linear`` layers with their dequantized
    weights: the math the exported file must compute (nnslim's own CPU kernels round the
    activations to bf16 on the way, which is not the model's meaning)."""
    twin = copy_model(model)
    for path, m in list(twin.named_modules()):
        if not isinstance(m, (Int8Linear, Int8DynamicLinear, Int4Linear)):
            continue
        w = m.weight  # dequantized, in the dtype of the float weight it replaced
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent, _, name = path.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, name, lin)
    return twin.eval()


def _for_onnx(model: nn.Module, rules: dict[type, Any], int4_level: int = 4) -> nn.Module:
    """A copy whose nnslim layers emit the engine's operators (the model is untouched)."""
    twin = copy_model(model)
    config = getattr(twin, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # the exported graph computes logits, no key/value cache
    made: dict[int, nn.Module] = {}  # the twin made from a layer's codes, by their identity
    for path, m in list(twin.named_modules()):
        rule = rules.get(type(m))
        if rule is None:
            continue
        parent, _, name = path.rpartition(".")
        new = rule(m)
        if isinstance(new, _Int4Onnx):
            new.accuracy_level = int4_level
        codes = m._buffers.get("qweight")
        if codes is not None:
            # an embedding tied to its LM head reads the head's codes: one initializer
            first = made.setdefault(id(codes), new)
            for n, t in new._buffers.items():
                mine = first._buffers.get(n)
                if first is not new and t is not None and mine is not None:
                    if mine.shape == t.shape and mine.dtype == t.dtype:
                        new._buffers[n] = mine
        setattr(twin.get_submodule(parent) if parent else twin, name, new)
    return _MainOutput(twin).eval()


class _OnnxLinear(nn.Module):
    """Shared by the integer twins: flatten to 2-D, the op, bias, shape back."""

    out_features: int

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.out_features = m.out_features
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().float().clone())
        s = m._buffers.get("smooth")
        self.register_buffer("inv_smooth", None if s is None else 1.0 / s.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        y = self.matmul(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _symbolic(op: str, inputs: tuple[Any, ...], attrs: dict[str, Any], shape: Any) -> Any:
    domain = "com.microsoft::" if op == "MatMulNBits" else ""
    return torch.onnx.ops.symbolic(
        f"{domain}{op}", inputs, attrs, dtype=torch.float32, shape=shape, version=1
    )


class _Int8Onnx(_OnnxLinear):
    """The int8 twins' weight: stored transposed (``(in, out)``), with its per-channel scale."""

    def __init__(self, m: Int8Linear | Int8DynamicLinear) -> None:
        super().__init__(m)
        self.register_buffer("qweight_t", m.qweight.t().contiguous())
        self.register_buffer("scale", m.scale.float().clone())


class _Int8WeightOnnx(_Int8Onnx):
    """int8 weight -> ``DequantizeLinear`` -> ``MatMul``."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = _symbolic(
            "DequantizeLinear", (self.qweight_t, self.scale), {"axis": 1}, self.qweight_t.shape
        )
        return x @ w


class _Int8DynamicOnnx(_Int8Onnx):
    """Each row of the activations rounded to int8 on its own scale (as nnslim's kernel does:
    symmetric, 8-bit, carried as uint8 with zero point 128), ``MatMulInteger`` with the int8
    weight, rescaled per column then per row. ONNX Runtime's ``DynamicQuantizeLinear`` would
    round the whole tensor on one scale (1-3% relative error through a few layers against
    nnslim; this graph matches nnslim's output to float rounding at the same speed). The
    per-column scale is applied first: ONNX Runtime fuses ``MatMulInteger`` and the multiply
    after it into ``MatMulIntegerToFloat``, which reads that multiplier as per-column and is
    wrong for a per-row one (measured: 1.5% error)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        half = 127  # 8-bit codes around 128 (the exported file may run on a VNNI CPU or not)
        xq, sx = quantize_rows(x, half)
        acc = torch.onnx.ops.symbolic(
            "MatMulInteger",
            (xq, self.qweight_t, torch.tensor(half + 1, dtype=torch.uint8)),
            {},
            dtype=torch.int32,
            shape=(x.shape[0], self.qweight_t.shape[1]),
            version=1,
        )
        return acc.float() * self.scale * sx


def _nbits_buffers(twin: nn.Module, m: Int4Linear | Int4Embedding) -> int:
    """Register ``m``'s codes on ``twin`` in ``MatMulNBits``' layout (``b``: the bytes with
    their nibbles swapped, per block; ``scales`` flat; ``offsets_t``: each group's
    ``minimum + 8 * scale``, transposed); returns the blocks per row."""
    q = m.qweight
    blocks = m.scales.shape[1]
    swapped = ((q >> 4) | (q << 4)).to(torch.uint8)
    twin.register_buffer("b", swapped.reshape(q.shape[0], blocks, m.group_size // 2))
    s = m.scales.float()
    twin.register_buffer("scales", s.reshape(-1).contiguous())
    twin.register_buffer("offsets_t", (m.mins.float() + 8 * s).t().contiguous())
    return blocks


class _Int4Onnx(_OnnxLinear):
    """ONNX Runtime's ``MatMulNBits`` on nnslim's codes (two per byte, low nibble first there,
    high nibble first here), exactly: ``q * scale + minimum = (q - 8) * scale + c`` with
    ``c = minimum + 8 * scale`` per group. The engine computes the first term with its
    default zero point 8 (its fast path: a floating zero point, the direct encoding, runs
    about 100x slower), the second is each group's input sum times ``c``, one small matmul."""

    def __init__(self, m: Int4Linear) -> None:
        super().__init__(m)
        blocks = _nbits_buffers(self, m)
        self.in_features, self.group_size, self.blocks = m.in_features, m.group_size, blocks
        self.accuracy_level = 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        attrs = {
            "K": self.in_features,
            "N": self.out_features,
            "bits": 4,
            "block_size": self.group_size,
            "accuracy_level": self.accuracy_level,
        }
        y = _symbolic(
            "MatMulNBits", (x, self.b, self.scales), attrs, (x.shape[0], self.out_features)
        )
        pad = self.blocks * self.group_size - self.in_features
        xp = nn.functional.pad(x, (0, pad)) if pad else x
        sums = xp.reshape(-1, self.blocks, self.group_size).sum(-1)
        return y + sums @ self.offsets_t


class _Int8ConvOnnx(nn.Module):
    """int8 weight + per-channel ``DequantizeLinear`` -> ``Conv`` (the engine folds the
    dequantization into a float weight when it loads the file)."""

    def __init__(self, m: Int8Conv2d) -> None:
        super().__init__()
        self.register_buffer("qweight", m.qweight.detach().clone())
        self.register_buffer("scale", m.scale.detach().float().clone())
        self.bias = m.bias
        self.conv = {k: getattr(m, k) for k in ("stride", "dilation", "groups")}
        self.padding, self.padding_mode = m.padding, m.padding_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _symbolic(
            "DequantizeLinear", (self.qweight, self.scale), {"axis": 0}, self.qweight.shape
        )
        w = w.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            pad = [p for p in reversed(self.padding) for _ in range(2)]  # type: ignore[arg-type]
            x = nn.functional.pad(x, pad, mode=self.padding_mode)
            return nn.functional.conv2d(x, w, b, padding=0, **self.conv)
        return nn.functional.conv2d(x, w, b, padding=self.padding, **self.conv)


class _PalettizedOnnx(nn.Module):
    """A codebook lookup: the weight is ``Gather(codebook, codes + group offset)``, the codes
    one byte each for up to 256 clusters (nnslim packs them to the bit; ONNX has no bit
    unpacking that engines fold)."""

    def __init__(self, m: PalettizedLinear | PalettizedConv2d, dense: bool = False) -> None:
        super().__init__()
        self.register_buffer("dense", m.dequantize().detach().float() if dense else None)
        codes = m.codes()
        rows = codes.shape[0]
        dtype = torch.uint8 if m.clusters <= 256 else torch.int32
        self.register_buffer("codes", codes.to(dtype))
        group = torch.arange(rows, device=codes.device) // m.group_size
        self.register_buffer("offsets", (group * m.clusters)[:, None])
        with torch.no_grad():
            cb = m.codebook.detach().float().clone()
            if m.zero_code >= 0:
                cb[:, m.zero_code] = 0.0
        self.register_buffer("codebook", cb.reshape(-1))
        self.shape = tuple(m._weight_shape())
        self.bias = m.bias
        self.conv = (
            {k: getattr(m, k) for k in ("stride", "padding", "dilation", "groups")}
            if isinstance(m, PalettizedConv2d)
            else None
        )
        self.pad = (m._reversed_padding(), m.padding_mode) if self.conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense
        if w is None:
            w = self.codebook[self.codes.long() + self.offsets].reshape(self.shape)
        w = w.to(x.dtype)
        if self.conv is None:
            return nn.functional.linear(x, w, self.bias)
        conv = dict(self.conv)
        if self.pad is not None and self.pad[1] != "zeros":
            x = nn.functional.pad(x, self.pad[0], mode=self.pad[1])
            conv["padding"] = 0
        return nn.functional.conv2d(x, w, self.bias, **conv)


class _SparseOnnx(nn.Module):
    """A packed sparse layer as a graph the engine folds into the dense weight when it loads
    the file (the file keeps the kept weights and the bitmask): the bits by a ``Gather`` on a
    256-entry table, each weight's place among the kept ones by a ``CumSum``, then ``Where``.
    The layer's own unpacking (``masked_scatter``) exports through ``NonZero``, which ONNX
    Runtime does not fold: it would unpack on every call (55x slower at batch 1)."""

    def __init__(self, m: SparseLinear | SparseConv2d) -> None:
        super().__init__()
        self.register_buffer("values", m.values.detach().clone())
        self.register_buffer("bitmask", m.bitmask)
        self.register_buffer("table", bit_table(m.bitmask.device))
        self.shape = tuple(m.weight_shape)
        self.bias = m.bias
        self.conv = (
            {k: getattr(m, k) for k in ("stride", "padding", "dilation", "groups")}
            if isinstance(m, SparseConv2d)
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        numel = math.prod(self.shape)
        if self.values.numel():
            keep = self.table[self.bitmask.long()].reshape(-1)[:numel]
            # -1 before the first kept weight: a valid index (the last), masked out by Where
            place = keep.long().cumsum(0) - 1
            w = torch.where(keep, self.values[place], 0.0)
        else:
            w = torch.zeros(numel, dtype=self.values.dtype, device=self.values.device)
        w = w.reshape(self.shape).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.conv is None:
            return nn.functional.linear(x, w, b)
        return nn.functional.conv2d(x, w, b, **self.conv)


class _Int8EmbeddingOnnx(nn.Module):
    """A lookup of int8 rows (``Gather`` on the int8 table, stored ``(dim, vocab)`` as the int8
    LM head's twin stores it, so a tied pair is one initializer) times each row's scale."""

    def __init__(self, m: Int8Embedding) -> None:
        super().__init__()
        self.register_buffer("qweight_t", m.qweight.t().contiguous())
        self.register_buffer("scale", m.scale.float().clone())
        s = m._buffers.get("smooth")
        self.register_buffer("inv_smooth", None if s is None else 1.0 / s.float())
        self.dim, self.dtype = m.embedding_dim, m._weight_dtype()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight_t[:, flat].t().float() * self.scale[flat][:, None]
        if self.inv_smooth is not None:
            rows = rows * self.inv_smooth
        return rows.reshape(*ids.shape, self.dim).to(self.dtype)


class _Int4EmbeddingOnnx(nn.Module):
    """A lookup of 4-bit rows in ``MatMulNBits``' layout (as the int4 LM head's twin holds
    them, so a tied pair is one initializer): the packed bytes gathered, split into their two
    nibbles, ``(q - 8) * scale + (minimum + 8 * scale)`` per group."""

    def __init__(self, m: Int4Embedding) -> None:
        super().__init__()
        blocks = _nbits_buffers(self, m)
        sm = m._buffers.get("smooth")
        self.register_buffer("inv_smooth", None if sm is None else 1.0 / sm.float())
        self.dim, self.blocks, self.group_size = m.embedding_dim, blocks, m.group_size
        self.dtype = m._weight_dtype()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        g = self.b[flat].to(torch.int32)  # (rows, blocks, group / 2): low nibble first
        codes = torch.stack([g % 16, g // 16], -1).reshape(-1, self.blocks, self.group_size)
        scale = self.scales.reshape(-1, self.blocks)[flat][..., None]
        offset = self.offsets_t.t()[flat][..., None]
        rows = ((codes.float() - 8) * scale + offset).reshape(flat.shape[0], -1)[:, : self.dim]
        if self.inv_smooth is not None:
            rows = rows * self.inv_smooth
        return rows.reshape(*ids.shape, self.dim).to(self.dtype)


_PALETTIZED = (PalettizedLinear, PalettizedConv2d)
_RULES: dict[type, Any] = {
    Int8Linear: _Int8WeightOnnx,
    Int8Conv2d: _Int8ConvOnnx,
    Int8DynamicLinear: _Int8DynamicOnnx,
    Int4Linear: _Int4Onnx,
    Int8Embedding: _Int8EmbeddingOnnx,
    Int4Embedding: _Int4EmbeddingOnnx,
    PalettizedLinear: _PalettizedOnnx,
    PalettizedConv2d: _PalettizedOnnx,
    SparseLinear: _SparseOnnx,
    SparseConv2d: _SparseOnnx,
}
#: OpenVINO keeps int8 weights compressed from ``DequantizeLinear`` (not from
#: ``MatMulInteger``, whose weight it widens to int32) and quantizes the activations of such
#: layers itself at run time; it widens codebook indices to int64 (larger than the float
#: weight), so palettized layers go as their dense weights
_OPENVINO_RULES: dict[type, Any] = {
    Int8Linear: _Int8WeightOnnx,
    Int8Conv2d: _Int8ConvOnnx,
    Int8DynamicLinear: _Int8WeightOnnx,
    Int4Linear: _Int4Onnx,
    Int8Embedding: _Int8EmbeddingOnnx,
    Int4Embedding: _Int4EmbeddingOnnx,
    PalettizedLinear: lambda m: _PalettizedOnnx(m, dense=True),
    PalettizedConv2d: lambda m: _PalettizedOnnx(m, dense=True),
    SparseLinear: _SparseOnnx,
    SparseConv2d: _SparseOnnx,
}


# -- writing and checking ---------------------------------------------------------------------
def _dynamic_shapes(inputs: Inputs) -> Any:
    """The batch axis of every tensor input dynamic, and the sequence axis of token inputs."""
    auto = torch.export.Dim.AUTO

    def axes(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        dims = {0: auto}
        if not t.is_floating_point() and t.dim() >= 2:
            dims[1] = auto
        return dims

    # keyed as the exported wrapper's forward(*args, **kwargs) takes them
    out: dict[str, Any] = {}
    if inputs.args:
        out["args"] = tuple(axes(a) for a in inputs.args)
    if inputs.kwargs:
        out["kwargs"] = {k: axes(v) for k, v in inputs.kwargs.items()}
    return out


def _onnx(twin: nn.Module, inputs: Inputs, path: Path, dynamic: bool) -> None:
    import warnings

    kwargs = dict(inputs.kwargs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                twin,
                tuple(inputs.args),
                kwargs=kwargs or None,
                dynamo=True,
                # the exporter's optimizer folds constant subgraphs into initializers: a
                # codebook lookup would be written as the dense weight; the engine folds them
                # when it loads the file instead (in memory)
                optimize=False,
                dynamic_shapes=_dynamic_shapes(inputs) if dynamic else None,
                verbose=False,
            )
    except Exception as e:
        root: BaseException = e
        while root.__cause__ is not None:  # the exporter wraps the error that stopped it
            root = root.__cause__
        first = (str(root).strip().splitlines() or [""])[0][:300]
        first = f"{type(root).__name__}: {first}"
        raise RuntimeError(
            f"nnslim.export: torch.onnx.export failed ({first}). A layer "
            f"of your own that calls an operator ONNX has no translation for needs one "
            f"(torch.onnx.export's custom_translation_table); exclude it from compression if "
            f"it is one of nnslim's."
        ) from e
    # the exporter notes each node's Python stack trace: most of a small model's file
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.save(str(path), external_data=False)


def _run_onnxruntime(path: Path, inputs: Inputs) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, onnxruntime_feed(session, inputs))[0])


def onnxruntime_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    warmup: int = 3,
    repeat: int = 20,
    threads: int | None = None,
    min_time_s: float = 0.0,
) -> Latency:
    """Time ``model`` as the file :func:`export` writes for it (fixed shapes, its compressed
    layers as ONNX Runtime's operators), run in an ONNX Runtime CPU session with ``threads``
    intra-op threads (``None``: torch's current setting); the session's creation, where the
    engine folds constants, is not timed. The model is left unchanged; nothing is kept on
    disk. Arguments as :func:`nnslim.profiling.measure_latency`'s."""
    n = threads if threads is not None else torch.get_num_threads()
    session, feed = onnxruntime_session(model, example_inputs, threads=n)
    return time_runs(lambda: session.run(None, feed), warmup, repeat, min_time_s, n)


def onnxruntime_session(
    model: nn.Module, example_inputs: Any, *, threads: int | None = None, check: bool = False
) -> tuple[Any, dict[str, Any]]:
    """``(session, feed)``: ``model`` exported with fixed shapes (``check``: as
    :func:`export`'s), loaded in an ONNX Runtime CPU session with ``threads`` intra-op threads
    (``None``: torch's current setting) and one inter-op thread, and ``example_inputs`` as
    the session takes them; the file is not kept."""
    require_packages("onnx", "onnxscript", "onnxruntime")
    import onnxruntime as ort

    inputs = as_inputs(example_inputs)
    with tempfile.TemporaryDirectory(prefix="nnslim-ort-") as d:
        path = export(model, inputs, os.path.join(d, "m.onnx"), dynamic=False, check=check)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, onnxruntime_feed(session, inputs)


def onnxruntime_feed(session: Any, inputs: Inputs) -> dict[str, Any]:
    """The inputs as an ONNX Runtime session of an exported model takes them: by name
    (keyword tensors), or the graph's inputs in order (positional ones)."""
    names = [i.name for i in session.get_inputs()]
    tensors = {k: v for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)}
    if not set(names) <= set(tensors):  # positional inputs: the graph's inputs in order
        tensors = dict(zip(names, _tensors(inputs), strict=False))
    return {n: tensors[n].detach().cpu().numpy() for n in names}


def _tensors(inputs: Inputs) -> list[torch.Tensor]:
    return [t for t in [*inputs.args, *inputs.kwargs.values()] if isinstance(t, torch.Tensor)]


def _check(got: torch.Tensor, reference: torch.Tensor, tolerance: float, engine: str) -> None:
    ref = reference.detach().float().cpu()
    if got.shape != ref.shape:
        raise ValueError(
            f"nnslim.export: {engine}'s output has shape {tuple(got.shape)}, the model's "
            f"{tuple(ref.shape)}; nothing was written."
        )
    err = float((got.float() - ref).norm() / ref.norm().clamp_min(1e-12))
    if not err <= tolerance:
        raise ValueError(
            f"nnslim.export: {engine}'s output differs from the model's math by {err:.3g} "
            f"(relative; at most {tolerance} accepted); nothing was written. Pass check=False "
            f"to write it anyway."
        )


# -- OpenVINO ---------------------------------------------------------------------------------
def _openvino(
    twin: nn.Module,
    inputs: Inputs,
    target: Path,
    dynamic: bool,
    reference: torch.Tensor | None,
    tolerance: float,
) -> None:
    """ONNX first (OpenVINO reads nnslim's int8 and int4 layers from it as compressed
    weights: int8 and uint4 constants decompressed in the graph), converted with
    ``openvino.convert_model`` and saved as IR (.xml + .bin) beside ``target``; the .bin is
    put in place before the .xml, so an .xml is only ever beside its own weights."""
    import shutil

    import openvino as ov

    tmp = temp_dir_beside(target)
    try:
        onnx_path = tmp / "model.onnx"
        _onnx(twin, inputs, onnx_path, dynamic)
        model = ov.convert_model(str(onnx_path))
        xml = tmp / target.name
        ov.save_model(model, str(xml), compress_to_fp16=False)
        if reference is not None:
            compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            got = torch.from_numpy(compiled([t.numpy() for t in _tensors(inputs)])[0])
            _check(got, reference, tolerance, "OpenVINO")
        os.replace(xml.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(xml, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- GGUF -------------------------------------------------------------------------------------
def _gguf(
    model: nn.Module,
    example_inputs: Any,
    target: Path,
    check: bool,
    tokenizer_from: Any,
    float_type: str,
) -> Path:
    """GGUF via :func:`nnslim.io.gguf.write_gguf`; checked by loading it back with
    transformers' GGUF loader (which dequantizes it) and comparing the logits with the model's
    math."""
    require_packages("gguf", *(("transformers",) if check else ()))
    from .gguf import write_gguf

    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TypeError("nnslim.export: example_inputs is required.")
    was_training = model.training
    model.eval()
    try:
        run_model(model, inputs)
        reference = _main_output(run_model(_dequantized(model), inputs)) if check else None
    finally:
        model.train(was_training)
    with contextlib.ExitStack() as stack:
        source = _tokenizer_source(tokenizer_from, stack)
        with atomic_path(target) as tmp:
            write_gguf(model, tmp, source, float_type)
            if reference is not None:
                got = _run_gguf(tmp, inputs)
                _check(got, reference, _GGUF_TOLERANCE, "transformers' GGUF loader")
            if check and source is not None and source.is_dir():
                _check_gguf_tokenizer(tmp, source)
    return target


def _tokenizer_source(tokenizer_from: Any, stack: contextlib.ExitStack) -> Path | None:
    """``tokenizer_from`` as a path: a tokenizer object is saved into a temporary directory."""
    if tokenizer_from is None:
        return None
    if hasattr(tokenizer_from, "save_pretrained"):
        import tempfile

        where = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        tokenizer_from.save_pretrained(str(where))
        return where
    return Path(tokenizer_from)


#: encoded by the source tokenizer and by the one read back from the GGUF file
_TOKENIZER_PROBE = (
    "Hello world! The year 2026 had 365 days, and   spaces.\nNew line: naïve café, "
    "日本語, emoji 🙂, code `x = y**2` and 'quotes' don't."
)


def _check_gguf_tokenizer(path: Path, source: Path) -> None:
    """transformers reads the written tokenizer back; it must encode a probe text to the ids
    the source tokenizer gives (tokens, merges and their order carried over)."""
    import transformers

    with _quiet_transformers():
        theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        mine = transformers.AutoTokenizer.from_pretrained(str(source))
    a = mine(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    b = theirs(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        raise ValueError(
            f"nnslim.export(format='gguf'): the tokenizer read back from the file encodes a "
            f"probe text to other ids than {source} does ({len(b)} ids vs {len(a)}, first "
            f"difference at {first}); nothing was written. Pass the source GGUF file as "
            f"tokenizer_from instead."
        )


#: fp16 block scales (Q8_0 rounds each channel's fp32 scale), float32 elsewhere
_GGUF_TOLERANCE = 1e-2


@contextlib.contextmanager
def _quiet_transformers() -> Any:
    """transformers' GGUF loading without its warnings and progress bars."""
    import logging

    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        transformers.logging.set_verbosity(level)
        transformers.logging.enable_progress_bar()


def _run_gguf(path: Path, inputs: Inputs) -> torch.Tensor:
    import transformers

    with _quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
        ).eval()
    with torch.no_grad():
        return _main_output(inputs.call(model)).float()


# -- compressed-tensors -----------------------------------------------------------------------
def _compressed_tensors(model: nn.Module, example_inputs: Any, target: Path, check: bool) -> Path:
    """A ``save_pretrained`` directory in compressed-tensors' layout
    (:mod:`nnslim.io.compressed_tensors`), written beside ``target`` and renamed into place;
    checked by loading it with ``from_pretrained`` (transformers reads the format through the
    compressed-tensors package; int4 de-quantized, see below) and comparing the output with
    the model's math."""
    from ..base.atomic import commit_dir
    from .compressed_tensors import dense_copy, write_compressed_tensors

    require_packages("compressed_tensors", "transformers")
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise TypeError("nnslim.export: example_inputs is required.")
    was_training = model.training
    model.eval()
    try:
        run_model(model, inputs)
        reference = _main_output(run_model(_dequantized(model), inputs))
        dense = dense_copy(model, copy_model)
    finally:
        model.train(was_training)
    tmp = temp_dir_beside(target)
    try:
        write_compressed_tensors(model, dense, tmp)
        if check:
            kwargs: dict[str, Any] = {}
            if any(isinstance(m, Int4Linear) for m in model.modules()):
                # transformers (5.25, compressed-tensors 0.20.1) builds asymmetric packed
                # layers with unpacked zero points and refuses the file's packed ones (vLLM's
                # layout, which the package's own compressor writes): it loads them
                # de-quantized, through the package's decompressor
                from transformers import CompressedTensorsConfig

                kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            with warnings.catch_warnings():  # "the config's quantization_config will be used"
                warnings.filterwarnings("ignore", "You passed `quantization_config`")
                loaded = type(model).from_pretrained(str(tmp), dtype=torch.float32, **kwargs)
            loaded.eval()
            with torch.no_grad():
                got = _main_output(inputs.call(loaded)).float()
            dynamic = any(isinstance(m, Int8DynamicLinear) for m in model.modules())
            _check(got, reference, 5e-2 if dynamic else 1e-4, "transformers (compressed-tensors)")
        commit_dir(tmp, target)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
