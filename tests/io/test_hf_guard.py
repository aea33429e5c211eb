"""``model.save_pretrained`` on a model nnslim changed: reloads exactly or is refused."""

import copy
import pickle

import pytest
import torch

import nnslim
from tests.zoo import llama_config

tf = pytest.importorskip("transformers")

X = {"input_ids": torch.randint(0, 200, (1, 8))}


def llama():
    cfg = llama_config(vocab_size=200)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def neox():
    cfg = tf.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=200,
    )
    torch.manual_seed(0)
    return tf.GPTNeoXForCausalLM(cfg).eval()


def logits(m):
    with torch.no_grad():
        return m(**X).logits


def test_a_pruned_model_the_config_describes_saves_plainly(tmp_path):
    m = llama()
    nnslim.Prune(ratio=0.5, select=["re:.*up_proj", "re:.*gate_proj"]).apply(m, X)
    m.save_pretrained(tmp_path)
    back = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(back), logits(m))


@pytest.mark.parametrize(
    "build, transform",
    [
        (llama, lambda: nnslim.Quantize(scheme="int8")),
        (llama, lambda: nnslim.Factorize(ratio=0.5)),
        (llama, lambda: nnslim.ShareWeights(clusters=16)),
        (neox, lambda: nnslim.Prune(ratio=0.3)),  # head size the config cannot say
    ],
    ids=["int8", "factorize", "share", "neox-heads"],
)
def test_plain_save_is_refused_and_nnslim_hf_round_trips(build, transform, tmp_path):
    m = build()
    transform().apply(m, X)
    with pytest.raises(RuntimeError, match=r"nnslim\.hf\.save_pretrained"):
        m.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    nnslim.hf.save_pretrained(m, tmp_path / "n")
    back = nnslim.hf.from_pretrained(type(m), tmp_path / "n").eval()
    assert torch.equal(logits(back), logits(m))
    # the guard holds no model: it copies and pickles with it
    assert copy.deepcopy(m).save_pretrained.reason == m.save_pretrained.reason
    pickle.dumps(m.save_pretrained)


def test_an_unchanged_model_keeps_its_own_save_pretrained():
    m = llama()
    assert "save_pretrained" not in m.__dict__
    nnslim.Prune(ratio=0.5, select=["re:.*up_proj", "re:.*gate_proj"]).apply(m, X)
    assert "save_pretrained" not in m.__dict__


def test_a_quantized_model_cast_after_its_transform_round_trips_in_its_dtype(tmp_path):
    """Quantized in fp32, cast to bf16, saved with nnslim.hf: the quantized layers come back
    computing in bf16 and saying so (their ``float_dtype``, and the ``weight`` rebuilt in it)."""
    m = llama()
    nnslim.Quantize(scheme="int8").apply(m, X)
    m = m.to(torch.bfloat16)
    nnslim.hf.save_pretrained(m, tmp_path / "n")
    back = nnslim.hf.from_pretrained(type(m), tmp_path / "n").eval()
    layer = back.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "Int8Linear"
    assert layer.float_dtype == "bfloat16" and layer.weight.dtype == torch.bfloat16
    # (not bit-equal: the rotary embedding's non-persistent inv_freq is rebuilt in fp32, where
    # the cast model holds it in bf16)
    torch.testing.assert_close(logits(back), logits(m), rtol=2e-2, atol=2e-2)
    assert "float_dtypes" not in back._nnslim_record
