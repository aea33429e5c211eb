"""Exact MACs on Hugging Face models built from configs (analytic ground truth)."""

import pytest
import torch

import nnslim
from tests.zoo import bert_config, gpt2_config, llama_config

transformers = pytest.importorskip("transformers")

T = 32


def test_gpt2_conv1d_addmm_exact_and_tied_params():
    cfg = gpt2_config()
    model = transformers.GPT2LMHeadModel(cfg).eval()
    p = nnslim.profile(model, {"input_ids": torch.randint(0, 300, (1, T))})
    layers, d, vocab = 2, 64, 300
    assert p.macs == layers * (12 * T * d * d + 2 * T * T * d) + T * d * vocab
    assert p.unsupported == {}
    unique = {id(t): t.numel() for t in model.parameters()}
    assert p.params == sum(unique.values())  # wte and lm_head tied: counted once


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_llama_exact_with_and_without_grad(kv_heads):
    d, f, h = 64, 176, 4
    cfg = llama_config(
        hidden_size=d, intermediate_size=f, num_attention_heads=h, num_key_value_heads=kv_heads
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 300, (1, T))}
    hd = d // h
    per_layer = 2 * T * d * d + 2 * T * d * kv_heads * hd + 2 * T * T * d + 3 * T * d * f
    expected = 2 * per_layer + T * d * 300
    assert nnslim.profile(model, inputs).macs == expected
    with torch.enable_grad():
        assert nnslim.profile(model, inputs).macs == expected


def test_bert_with_pooler_counts_everything():
    cfg = bert_config()
    model = transformers.BertModel(cfg).eval()
    p = nnslim.profile(model, {"input_ids": torch.randint(0, 300, (1, T))})
    d, f = 64, 128
    per_layer = 4 * T * d * d + 2 * T * T * d + 2 * T * d * f
    assert p.macs == 2 * per_layer + d * d  # pooler: one token
    assert p.modules["pooler.dense"].macs == d * d
