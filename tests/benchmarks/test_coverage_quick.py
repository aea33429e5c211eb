"""A lean slice of the coverage sweep (benchmarks/coverage.py) in the zoo group."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parents[2]


def test_lean_coverage_slice_applies_everywhere_without_raw_errors(tmp_path):
    # one model per class that failed before: a Linear subclass (GhostNet's classifier), fused
    # heads (DeiT, GPT-NeoX, Phi-3 with a fused gate/up), layer scale with a stored shape
    # (PoolFormer), shape constants in a forward (LeViT), T5's weight dtype reads and its heads
    # tied across a stack, a GroupNorm without bias (PoolFormerV2), an MoE router returning a
    # tuple (PhiMoE), attention sinks (gpt-oss), einsum attention over 3-D parameters (XLNet),
    # a state_dict version a module insists on (MNASNet)
    models = (
        "timm:ghostnet_050,timm:deit_tiny_patch16_224,timm:poolformer_s12,timm:levit_128s,"
        "timm:poolformerv2_s12,hf:t5,hf:gpt_neox,hf:phi3,hf:phimoe,hf:gpt_oss,hf:xlnet,"
        "torchvision:mnasnet0_5"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "coverage.py"), "--only", models],
        capture_output=True,
        text=True,
        env={**os.environ, "NNSLIM_BENCH_RESULTS": str(tmp_path)},
        cwd=ROOT / "benchmarks",
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "coverage-quick.json").read_text())
    rows = {r["model"]: r for r in payload["models"]}
    assert all(r["built"] and not r.get("crashed") for r in rows.values()), rows
    for model, r in rows.items():
        for column, cell in r["cells"].items():
            where = f"{model} {column}: {cell}"
            assert cell["status"] == "applied", where
            assert cell["same_shape"] and cell["finite"], where
            assert cell["save_load"] == "exact", where
    assert rows["hf:t5"]["cells"]["prune-ratio"]["macs"] <= 0.8  # heads go, with the bias
