"""nnslim.export(format="onnx"): compressed models in ONNX Runtime, with the engine's integer
operators, dynamic axes, atomic writes and clear refusals."""

import copy
import os

import pytest
import torch
from torch import nn

import nnslim
from nnslim.modules.quantized import Int4Linear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

X = torch.randn(4, 64)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


TRANSFORMS = {
    "float": (None, "Gemm|MatMul"),
    "prune": (lambda: nnslim.Prune(ratio=0.5), "Gemm|MatMul"),
    "int8": (lambda: nnslim.Quantize(scheme="int8"), "DequantizeLinear"),
    "int8-dynamic": (lambda: nnslim.Quantize(scheme="int8-dynamic"), "MatMulInteger"),
    "int4": (lambda: nnslim.Quantize(scheme="int4", group_size=32), "MatMulNBits"),
    "factorize": (lambda: nnslim.Factorize(ratio=0.5), "Gemm|MatMul"),
    "share": (lambda: nnslim.ShareWeights(clusters=16), "GatherND|Gather"),
    "2:4": (lambda: nnslim.Prune(structure="2:4"), "Gemm|MatMul"),
    "2:4 packed": (lambda: nnslim.Prune(structure="2:4", pack=True), "Gemm|MatMul"),
}


def _run(path, *inputs):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs, strict=True)}
    return torch.from_numpy(s.run(None, feed)[0])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_compressed_models_run_in_onnx_runtime_with_a_dynamic_batch(tmp_path, name):
    make, op = TRANSFORMS[name]
    model = _mlp()
    if make is not None:
        make().apply(model, X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = nnslim.export(model, X, tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and os.listdir(tmp_path) == ["m.onnx"]
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops & set(op.split("|")), ops
    x7 = torch.randn(7, 64)  # another batch size than the example's
    tol = {"int8-dynamic": 5e-2, "int8": 1e-2, "int4": 2e-2}.get(name, 1e-4)
    with torch.no_grad():
        assert _rel(_run(path, x7), model(x7)) < tol
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_int8_dynamic_rounds_activations_per_row_as_nnslim_does(tmp_path):
    """The engine rounds each activation row on its own scale, like nnslim's kernel: the same
    output to float rounding where nnslim's kernel takes 8-bit activations (VNNI/AMX CPUs;
    without VNNI it takes 7-bit ones, so the engine is the more precise there). ONNX Runtime's
    ``DynamicQuantizeLinear`` (one scale per tensor) was ~1% off per layer; a rows' scale
    multiplied before the per-column one made ONNX Runtime fuse it as per-column (1.5% off)."""
    from nnslim.modules.kernels import cpu_has_vnni

    model = _mlp()
    nnslim.Quantize(scheme="int8-dynamic").apply(model, X)
    path = nnslim.export(model, X, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" in ops
    x = torch.randn(9, 64) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different sizes
    with torch.no_grad():
        eager = model(x)
    assert _rel(_run(path, x), eager) < (1e-5 if cpu_has_vnni() else 3e-2)
    # and a session with every graph optimization (the fusions) agrees with one without
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    plain = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])
    assert _rel(_run(path, x), plain) < 1e-6


def test_int4_carries_the_codes_exactly(tmp_path):
    """MatMulNBits computes with nnslim's own codes, scales and minimums: with float compute
    (accuracy level 0; the default, 4, rounds activations to int8) the engine's output is the
    dequantized weight's, to float rounding (nnslim's CPU kernel rounds activations to bf16, so
    it is compared with the float math)."""
    model = _mlp()
    nnslim.Quantize(scheme="int4", group_size=32).apply(model, X)
    path = nnslim.export(model, X, tmp_path / "m.onnx", int4_compute="float")
    exact = X
    with torch.no_grad():
        for m in model:
            exact = torch.relu(exact) if isinstance(m, nn.ReLU) else exact @ m.weight.T + m.bias
    assert _rel(_run(path, X), exact) < 1e-5


def test_integer_and_palettized_weights_stay_small_in_the_file(tmp_path):
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    x = torch.randn(2, 512)
    sizes = {}
    for name, t in [
        ("float", None),
        ("int8", nnslim.Quantize(scheme="int8")),
        ("int4", nnslim.Quantize(scheme="int4", group_size=64, select=["0"])),
        ("share", nnslim.ShareWeights(clusters=16, select=["0"])),
        ("packed", nnslim.Prune(ratio=0.5, structure="unstructured", pack=True, select=["0", "2"])),
    ]:
        m = copy.deepcopy(big)
        if t is not None:
            t.apply(m, x)
        sizes[name] = os.path.getsize(nnslim.export(m, x, tmp_path / f"{name}.onnx"))
    assert sizes["int8"] < 0.3 * sizes["float"]
    # one of two layers: int4 codes (an eighth) or one-byte codes (a quarter), the other float
    assert sizes["int4"] < 0.6 * sizes["float"]
    assert sizes["share"] < 0.7 * sizes["float"]
    # half the weights and a bit per weight: the graph unpacks them
    assert sizes["packed"] < 0.56 * sizes["float"]


def test_hugging_face_model_with_dict_inputs_exports_its_logits(tmp_path):
    tf = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 100, (2, 12))
    nnslim.Quantize(scheme="int4", group_size=32).apply(model, {"input_ids": ids})
    path = nnslim.export(model, {"input_ids": ids}, tmp_path / "llama.onnx")
    other = torch.randint(0, 100, (3, 9))  # batch and sequence both vary
    with torch.no_grad():
        ref = model(input_ids=other).logits
    assert _rel(_run(path, other), ref) < 1e-2


def test_bad_input_is_refused_and_nothing_is_written(tmp_path):
    model = _mlp()
    with pytest.raises(ValueError, match="unknown format 'tflite'.*supported: onnx"):
        nnslim.export(model, X, tmp_path / "a", format="tflite")
    with pytest.raises(ValueError, match=r"Sequential.forward failed on example_inputs"):
        nnslim.export(model, torch.randn(2, 3), tmp_path / "a.onnx")
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        nnslim.export(model, X, tmp_path / "exists.onnx")
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"
    qat = _mlp()
    nnslim.Quantize(scheme="int8", qat=True).apply(qat, X)
    with pytest.raises(ValueError, match="nnslim.convert"):
        nnslim.export(qat, X, tmp_path / "q.onnx")
    assert sorted(os.listdir(tmp_path)) == ["exists.onnx"]


def test_a_file_that_fails_its_check_is_not_written(tmp_path, monkeypatch):
    from nnslim.io import export as ex

    monkeypatch.setitem(ex._TOLERANCE, "float", -1.0)  # no output can be that close
    with pytest.raises(ValueError, match="differs from the model's math.*nothing was written"):
        nnslim.export(_mlp(), X, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
    assert nnslim.export(_mlp(), X, tmp_path / "m.onnx", check=False).exists()


@pytest.mark.parametrize(
    "name", ["float", "prune", "int8", "int8-dynamic", "int4", "share", "2:4 packed"]
)
def test_openvino_runs_them_with_integer_weights_kept_compressed(tmp_path, name):
    ov = pytest.importorskip("openvino")
    from nnslim.io.export import _dequantized

    make, _ = TRANSFORMS[name]
    model = _mlp()
    if make is not None:
        make().apply(model, X)
    path = nnslim.export(model, X, tmp_path / "m.xml", format="openvino")
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.xml"]
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x7 = torch.randn(7, 64)
    got = torch.from_numpy(compiled([x7.numpy()])[0])
    with torch.no_grad():
        ref = _dequantized(model)(x7)
    assert _rel(got, ref) < (5e-2 if "int" in name else 1e-4)
    types = {str(op.get_element_type()) for op in ov.Core().read_model(str(path)).get_ops()}
    if name in ("int8", "int8-dynamic"):
        assert "<Type: 'int8_t'>" in types
    if name == "int4":
        assert "<Type: 'uint4_t'>" in types


def test_openvino_path_is_the_xml_and_neither_file_is_overwritten(tmp_path):
    pytest.importorskip("openvino")
    with pytest.raises(ValueError, match="names the model's .xml"):
        nnslim.export(_mlp(), X, tmp_path / "m.onnx", format="openvino")
    (tmp_path / "m.bin").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="m.bin exists"):
        nnslim.export(_mlp(), X, tmp_path / "m.xml", format="openvino")
    assert sorted(os.listdir(tmp_path)) == ["m.bin"]


def _llama():
    tf = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(llama_config()).eval()


IDS = {"input_ids": torch.randint(0, 100, (2, 12))}


@pytest.mark.parametrize(
    "name, make, block, tol",
    [
        ("float", None, None, 1e-5),
        ("int4-g32", lambda: nnslim.Quantize(scheme="int4", group_size=32), "Q4_1", 1e-4),
        ("int4-g64", lambda: nnslim.Quantize(scheme="int4", group_size=64), "Q4_1", 1e-4),
        ("int8", lambda: nnslim.Quantize(scheme="int8"), "Q8_0", 5e-3),
        ("pruned", lambda: nnslim.Prune(ratio=0.25), None, 1e-5),
        ("2:4 packed", lambda: nnslim.Prune(structure="2:4", pack=True), None, 1e-5),
    ],
)
def test_gguf_holds_the_codes_and_transformers_loads_it(tmp_path, name, make, block, tol):
    """Q4_1 is nnslim's int4 exactly (a scale and a minimum per 32 weights; the bf16 scales
    become fp16); Q8_0 rounds each channel's scale to fp16. transformers' GGUF loader
    (dequantizing) gives the logits of the model's math."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import transformers

    from nnslim.io.export import _dequantized

    model = _llama()
    if make is not None:
        make().apply(model, IDS)
    path = nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", float_type="f32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    if block is not None:
        assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == block
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    other = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert (
            _rel(loaded(input_ids=other).logits, _dequantized(model)(input_ids=other).logits) < tol
        )


@pytest.mark.parametrize("float_type, tol", [("f16", 1e-3), ("bf16", 1e-2)])
def test_gguf_writes_float_matrices_in_half_precision_as_llama_cpp_does(tmp_path, float_type, tol):
    """The default (``f16``, llama.cpp's converter's) halves the embedding's bytes; the norms
    stay float32; the integer layers keep their block types; the file's type names them."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import transformers

    from nnslim.io.export import _dequantized

    model = _llama()
    nnslim.Quantize(scheme="int4", group_size=32).apply(model, IDS)
    kw = {} if float_type == "f16" else {"float_type": float_type}
    path = nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", **kw)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == float_type.upper()
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    f32 = nnslim.export(model, IDS, tmp_path / "f.gguf", format="gguf", float_type="f32")
    embedding = model.model.embed_tokens.weight.numel()
    assert os.path.getsize(f32) - os.path.getsize(path) >= 2 * embedding
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    other = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        ref = _dequantized(model)(input_ids=other).logits
        assert _rel(loaded(input_ids=other).logits, ref) < tol
    with pytest.raises(ValueError, match="float_type"):
        nnslim.export(model, IDS, tmp_path / "x.gguf", format="gguf", float_type="q8")
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_refuses_what_it_cannot_hold(tmp_path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from tests.zoo import gpt2_config

    gpt2 = tf.GPT2LMHeadModel(gpt2_config()).eval()
    with pytest.raises(ValueError, match="writes Llama-family causal LMs.*ONNX"):
        nnslim.export(gpt2, IDS, tmp_path / "g.gguf", format="gguf")
    model = _llama()
    nnslim.Prune(select={"re:model\\.layers\\.0\\.mlp\\..*": 0.5}).apply(model, IDS)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp keeps .* one width for every layer"):
        nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "name, make, fmt, key",
    [
        ("int8", lambda: nnslim.Quantize(scheme="int8"), "pack-quantized", "weight_packed"),
        ("int8-dynamic", lambda: nnslim.Quantize(scheme="int8-dynamic"), "int-quantized", "weight"),
        ("pruned", lambda: nnslim.Prune(ratio=0.25), None, "weight"),
    ],
)
def test_compressed_tensors_directory_loads_in_transformers(tmp_path, name, make, fmt, key):
    """llm-compressor's layout (W8A16 packed into int32 words, W8A8 with dynamic per-token
    activations), written by the compressed-tensors package's own compressor from nnslim's
    codes, loaded back by transformers through that package."""
    pytest.importorskip("compressed_tensors")
    import json

    from safetensors import safe_open

    from nnslim.io.export import _dequantized

    model = _llama()
    make().apply(model, IDS)
    out = nnslim.export(model, IDS, tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("quantization_config", {}).get("format") == fmt
    with safe_open(out / "model.safetensors", "pt") as f:
        q = f.get_tensor(f"model.layers.0.self_attn.q_proj.{key}")
    assert q.dtype == {"weight_packed": torch.int32, "weight": torch.int8}.get(key, q.dtype) or (
        fmt is None and q.is_floating_point()
    )
    loaded = type(model).from_pretrained(str(out), dtype=torch.float32).eval()
    other = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        err = _rel(loaded(input_ids=other).logits, _dequantized(model)(input_ids=other).logits)
    assert err < (5e-2 if name == "int8-dynamic" else 1e-5)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_compressed_tensors_int4_with_integer_zero_points(tmp_path):
    """W4A16 asymmetric per group (llm-compressor's W4A16_ASYM): int4 codes and zero points
    packed into int32 words by the package's compressor, read back by transformers to nnslim's
    weights exactly."""
    pytest.importorskip("compressed_tensors")
    import json

    from safetensors import safe_open

    from nnslim.io.export import _dequantized

    model = _llama()
    nnslim.Quantize(scheme="int4", group_size=32, zero_point="integer").apply(model, IDS)
    out = nnslim.export(model, IDS, tmp_path / "ct", format="compressed-tensors")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized"
    (group,) = q["config_groups"].values()
    assert group["weights"]["num_bits"] == 4 and group["weights"]["symmetric"] is False
    assert group["weights"]["group_size"] == 32
    with safe_open(out / "model.safetensors", "pt") as f:
        layer = "model.layers.0.mlp.down_proj"
        packed = f.get_tensor(f"{layer}.weight_packed")
        zp = f.get_tensor(f"{layer}.weight_zero_point")
    down = model.get_submodule(layer)
    assert packed.dtype == torch.int32 and packed.shape == (down.out_features, 128 // 8)
    # zero points packed 8 to a word along the output rows (vLLM's layout)
    assert zp.dtype == torch.int32 and zp.shape == (down.out_features // 8, 128 // 32)
    from transformers import CompressedTensorsConfig

    loaded = type(model).from_pretrained(
        str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            assert torch.equal(loaded.get_submodule(name).weight, m.dequantize()), name
    other = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=other).logits, _dequantized(model)(input_ids=other).logits
        )


def test_upstream_transformers_still_refuses_packed_asymmetric_zero_points(tmp_path):
    """Guards the export check's de-quantized load: transformers 5.25 with compressed-tensors
    0.20.1 builds an asymmetric pack-quantized layer with unpacked zero points and refuses a
    file's packed ones. When this test fails, upstream loads them: check with the compressed
    path too."""
    pytest.importorskip("compressed_tensors")
    model = _llama()
    nnslim.Quantize(scheme="int4", group_size=32, zero_point="integer").apply(model, IDS)
    out = nnslim.export(model, IDS, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(str(out), dtype=torch.float32)


def test_packed_sparse_layers_fold_to_their_dense_weights_in_onnx_runtime(tmp_path):
    """The file holds the kept weights and the bitmask; ONNX Runtime folds the unpacking into
    constants when it loads the file, so the session multiplies by a dense weight (no
    unpacking per call)."""
    model = _mlp()
    nnslim.Prune(structure="2:4", pack=True, select=["0", "2", "4"]).apply(model, X)
    path = nnslim.export(model, X, tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    before = {n.op_type for n in onnx.load(path).graph.node}
    after = {n.op_type for n in onnx.load(tmp_path / "folded.onnx").graph.node}
    assert {"CumSum", "Where"} <= before
    assert after <= {"Gemm", "MatMul", "Add", "Relu", "Transpose"}, after


@pytest.mark.parametrize("pack", [False, True])
def test_compressed_tensors_keeps_sparse_zeros_dense(tmp_path, pack):
    """2:4 layers are written dense with their zeros (compressed-tensors dropped its 2:4
    formats after 0.14); nnslim's masks (or packed values) are not written."""
    pytest.importorskip("compressed_tensors")
    from safetensors import safe_open

    model = _llama()
    nnslim.Prune(structure="2:4", pack=pack).apply(model, IDS)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == (
        "SparseLinear" if pack else "Linear"
    )
    out = nnslim.export(model, IDS, tmp_path / "ct", format="compressed-tensors")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.endswith("weight_mask")]
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(w, model.model.layers[0].mlp.up_proj.weight)
    assert int((w.reshape(-1, 4) == 0).sum(1).min()) >= 2


def test_compressed_tensors_refuses_int4_and_other_models(tmp_path):
    pytest.importorskip("compressed_tensors")
    model = _llama()
    nnslim.Quantize(scheme="int4", group_size=32).apply(model, IDS)
    with pytest.raises(ValueError, match="floating minimum per group.*zero_point='integer'"):
        nnslim.export(model, IDS, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(ValueError, match="not a transformers model"):
        nnslim.export(_mlp(), X, tmp_path / "ct", format="compressed-tensors")
    assert os.listdir(tmp_path) == []


def test_int8_convolutions_and_dense_palettes(tmp_path):
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
    ).eval()
    x = torch.randn(2, 3, 12, 12)
    int8 = copy.deepcopy(cnn)
    nnslim.Quantize(scheme="int8").apply(int8, x)
    path = nnslim.export(int8, x, tmp_path / "int8.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("DequantizeLinear") == 2 and ops.count("Conv") == 2
    with torch.no_grad():
        assert _rel(_run(path, x), int8(x)) < 1e-4
    shared = copy.deepcopy(cnn)
    nnslim.ShareWeights(clusters=8).apply(shared, x)
    lookup = nnslim.export(shared, x, tmp_path / "lookup.onnx")
    dense = nnslim.export(shared, x, tmp_path / "dense.onnx", palettized="dense")
    assert "GatherND" in {n.op_type for n in onnx.load(lookup).graph.node}
    assert not {"Gather", "GatherND"} & {n.op_type for n in onnx.load(dense).graph.node}
    with torch.no_grad():
        assert _rel(_run(dense, x), shared(x)) < 1e-5
    with pytest.raises(ValueError, match="palettized=.*'lookup' or 'dense'"):
        nnslim.export(shared, x, tmp_path / "x.onnx", palettized="packed")


def test_gguf_carries_a_source_files_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = _llama()
    vocab = model.config.vocab_size
    source = tmp_path / "source.gguf"
    w = gguf.GGUFWriter(str(source), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_bos_token_id(1)
    w.add_tensor("x", torch.zeros(2).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=source)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    small = tmp_path / "small.gguf"
    w = gguf.GGUFWriter(str(small), "llama")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="has 2 tokens, the model's vocabulary"):
        nnslim.export(model, IDS, tmp_path / "n.gguf", format="gguf", tokenizer_from=small)
    assert not (tmp_path / "n.gguf").exists()


def _bpe_tokenizer(pre=None, vocab=290):
    """A byte-level BPE (SmolLM's pre-tokenizer: digits one by one, then GPT-2's split),
    trained here on a short text, with a special token that is also BOS/EOS."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre or pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog 2026 ", "hello world, naive cafe"] * 20
    tok.train_from_iterator(text, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )


def test_gguf_carries_a_hugging_face_tokenizer(tmp_path):
    """An HF byte-level BPE goes in as llama.cpp's converter writes it (gpt2 model, named
    pre-tokenizer, merges, the special token a control token, the vocabulary padded to the
    model's with unused tokens); transformers reads it back to the same ids (the export's
    check) and so does this test."""
    gguf = pytest.importorskip("gguf")
    import transformers

    tok = _bpe_tokenizer()
    model = _llama()
    out = nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=tok)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == model.config.vocab_size == 300 and len(tok) == 290
    assert tokens[:290] == [tok.convert_ids_to_tokens(i) for i in range(290)]
    assert tokens[290:] == [f"[PAD{i}]" for i in range(290, 300)]
    special = tok.convert_tokens_to_ids("<|endoftext|>")
    assert types[special] == gguf.TokenType.CONTROL
    assert set(types[290:]) == {gguf.TokenType.UNUSED}
    assert fields["tokenizer.ggml.bos_token_id"].contents() == special
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # it adds none
    import json

    spec = json.loads(tok.backend_tokenizer.to_str())
    assert len(fields["tokenizer.ggml.merges"].contents()) == len(spec["model"]["merges"])
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "the lazy fox 123, naive"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    # a directory save_pretrained wrote does the same
    tok.save_pretrained(str(tmp_path / "tok"))
    again = nnslim.export(
        model, IDS, tmp_path / "d.gguf", format="gguf", tokenizer_from=tmp_path / "tok"
    )
    assert gguf.GGUFReader(again).fields["tokenizer.ggml.tokens"].contents() == tokens


def test_gguf_refuses_tokenizers_it_cannot_name_for_llama_cpp(tmp_path):
    pytest.importorskip("gguf")
    from tokenizers import pre_tokenizers

    from nnslim.io.export import _check_gguf_tokenizer

    model = _llama()
    odd = _bpe_tokenizer(pre=pre_tokenizers.Whitespace())
    with pytest.raises(ValueError, match="pre-tokenizer .* not one nnslim can name"):
        nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=odd)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=tmp_path)
    big = _bpe_tokenizer(vocab=320)
    with pytest.raises(ValueError, match="more than the model's vocabulary of 300"):
        nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=big)
    assert not (tmp_path / "m.gguf").exists()
    # the read-back check compares ids: another tokenizer's directory differs
    out = nnslim.export(
        model, IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=_bpe_tokenizer()
    )
    other = _bpe_tokenizer(vocab=270)
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="encodes a probe text to other ids"):
        _check_gguf_tokenizer(out, tmp_path / "other")


def test_gguf_carries_a_llama_sentencepiece_style_tokenizer(tmp_path):
    """A Llama (SentencePiece-style: byte fallback, metaspace) HF tokenizer goes in as
    llama.cpp's ``llama`` tokenizer with scores; transformers reads it back to the same ids."""
    gguf = pytest.importorskip("gguf")
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 2026"] * 20, trainer)
    fast = transformers.LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    out = nnslim.export(_llama(), IDS, tmp_path / "m.gguf", format="gguf", tokenizer_from=fast)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert "tokenizer.ggml.pre" not in fields
    assert len(fields["tokenizer.ggml.scores"].contents()) == 300
    assert fields["tokenizer.ggml.bos_token_id"].contents() == fast.bos_token_id
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "the lazy dog 42 caf\u00e9"
    assert (
        back(text, add_special_tokens=False)["input_ids"]
        == fast(text, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("scheme, block", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_a_quantized_embedding_tied_to_its_head_is_one_table_in_every_format(
    tmp_path, scheme, block
):
    """ONNX: a ``Gather`` on the integer table the head's operator reads (one initializer);
    GGUF: ``token_embd`` in the block type and no ``output.weight`` (llama.cpp reads it as
    tied); compressed-tensors: the embedding float, the quantized head stored untied."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("compressed_tensors")
    pytest.importorskip("accelerate")
    import json

    import transformers

    from nnslim.io.export import _dequantized
    from tests.zoo import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    nnslim.Quantize(
        scheme=scheme, group_size=32, zero_point="integer", select=["model.embed_tokens"]
    ).apply(model, IDS)
    assert model.model.embed_tokens.qweight is model.lm_head.qweight
    with torch.no_grad():
        ref = _dequantized(model)(**IDS).logits

    path = nnslim.export(model, IDS, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    table = (64, 300) if scheme == "int8" else (300, 2, 16)  # (dim, vocab); MatMulNBits' blocks
    assert [tuple(i.dims) for i in proto.graph.initializer].count(table) == 1
    got = _run(path, IDS["input_ids"])
    assert _rel(got, ref) < 5e-2  # the head's operators round activations to int8
    # the lookup alone is exact
    alone = nn.Sequential(copy.deepcopy(model.model.embed_tokens))
    path = nnslim.export(alone, IDS["input_ids"], tmp_path / "e.onnx")
    with torch.no_grad():
        assert _rel(_run(path, IDS["input_ids"]), alone(IDS["input_ids"])) < 1e-6

    path = nnslim.export(model, IDS, tmp_path / "m.gguf", format="gguf", float_type="f32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == block and "output.weight" not in types
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        assert _rel(loaded(**IDS).logits, ref) < 5e-3

    out = nnslim.export(model, IDS, tmp_path / "ct", format="compressed-tensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


@pytest.mark.parametrize("name", ["int8", "int8-dynamic", "int4", "share", "2:4 packed"])
def test_one_compressed_layer_exports_alone_with_the_engines_operators(tmp_path, name):
    """A compressed layer given alone (as Auto's ONNX Runtime timing gives each candidate) is
    written with the engine's operators, as inside a model (it was written as its torch math,
    or not at all), and runs as the layer does; it stays in eval mode."""
    model = _mlp()
    TRANSFORMS[name][0]().apply(model, X)
    layer = model[2].eval()
    path = nnslim.export(layer, torch.randn(4, 128), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & set(TRANSFORMS[name][1].split("|")), ops
    x = torch.randn(3, 128)
    tol = 5e-2 if name.startswith("int8") or name == "int4" else 1e-4
    assert _rel(_run(path, x), layer(x).float()) < tol
    assert not layer.training
