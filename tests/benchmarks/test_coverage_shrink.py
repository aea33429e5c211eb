"""The coverage sweep's config shrinking (benchmarks/coverage.py): every architecture built
small must still be a model of its kind, and run."""

import pytest
import torch

from tests.benchmarks.scripts import load_benchmark

tf = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cov():
    return load_benchmark("coverage")


def test_each_kind_keeps_one_layer_of_every_kind(cov):
    assert cov._each_kind(["lin", "lin", "lin", "full"], 2) == ["lin", "full"]
    assert cov._each_kind(["a", "b", "a", "b"], 2) == ["a", "b"]
    assert cov._each_kind(["a", "a", "b", "c"], 3) == ["a", "b", "c"]


def test_a_hybrid_keeps_its_attention_layer(cov):
    cfg = cov.shrink_config(tf.Qwen3_5TextConfig())
    assert cfg.num_hidden_layers == 2
    assert sorted(cfg.layer_types) == ["full_attention", "linear_attention"]
    jamba = cov.shrink_config(tf.JambaConfig())
    assert "attention" in jamba.layers_block_type and "mamba" in jamba.layers_block_type


def test_mamba2_heads_span_the_mixer_width(cov):
    cfg = cov.shrink_config(tf.Mamba2Config())
    assert cfg.num_heads * cfg.head_dim == cfg.expand * cfg.hidden_size


@pytest.mark.parametrize("name", ["deepseek_v3", "minicpm3", "codegen", "hunyuan_v1_dense"])
def test_shrunk_architectures_build_and_run(cov, name):
    model, x, _ = cov.build(f"hf:{name}")
    with torch.no_grad():
        out = cov._call(model, x)
    assert torch.isfinite(cov._main_tensors(out)[0]).all()
