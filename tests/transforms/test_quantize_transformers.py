"""Quantize on Hugging Face models built from configs: Conv1D, LM heads, sequential GPTQ."""

import pytest
import torch

import nnslim
from tests.zoo import llama_config

tf = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=2000, n_positions=64)
    return tf.GPT2LMHeadModel(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = llama_config(vocab_size=2000)
    return tf.LlamaForCausalLM(cfg).eval()


def batch(seed, n=2, t=16):
    return {
        "input_ids": torch.randint(0, 2000, (n, t), generator=torch.Generator().manual_seed(seed))
    }


def test_gpt2_conv1d_quantized_and_lm_head_kept(tmp_path):
    m = gpt2()
    x = batch(0)
    with torch.no_grad():
        ref = m(**x).logits
    report = nnslim.Quantize(scheme="int8").apply(m, x)
    assert type(m.transformer.h[0].attn.c_attn).__name__ == "Int8Linear"
    assert type(m.lm_head).__name__ == "Linear"
    skipped = dict((s.path, s.reason) for s in report.skips)
    assert "LM head stays in float" in skipped["lm_head"]
    assert skipped["transformer.wte"].startswith("embeddings stay in float")
    with torch.no_grad():
        out = m(**x).logits
    assert float((out - ref).norm() / ref.norm()) < 0.02
    nnslim.save(m, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", gpt2())
    with torch.no_grad():
        assert torch.allclose(back(**x).logits, out, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int4", "int8-dynamic"])
def test_sequential_gptq_on_llama_blocks(scheme):
    m = llama()
    x = batch(5)
    with torch.no_grad():
        ref = m(**x).logits
    calib = [batch(s) for s in range(3)]
    report = nnslim.Quantize(scheme=scheme, group_size=32, method="gptq").apply(
        m, calibration=calib
    )
    quantized = [c.path for c in report.changes]
    assert "model.layers.1.mlp.down_proj" in quantized and "lm_head" not in quantized
    with torch.no_grad():
        out = m(**x).logits
    assert float((out - ref).norm() / ref.norm()) < 0.2
