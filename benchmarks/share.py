"""Weight sharing: size on disk, profiler bytes, output error and CPU latency, in one run.

Models: torchvision resnet50 (``weights=None``) and a BERT-shaped encoder from a small
``transformers.BertConfig``. Rows: the dense fp32 model, then ``ShareWeights`` with 16, 64 and
256 clusters per tensor, and on the BERT model cross-layer sharing of the encoder layers
(``across_layers="encoder.layer"``) alone and with 16 clusters.

* size: bytes of the file written by ``nnslim.save`` (and its ratio to the dense file);
* weight bytes: the profiler's ``param_bytes`` (packed indices and codebooks at their real
  size, tied parameters once);
* error: relative L2 error of the model output against the dense model on the example inputs
  (random weights: a stress test of the clustering, not an accuracy figure);
* latency: median of repeated runs after warm-up on one thread (steadier than the default count
  on a shared machine; read it as a ratio to the dense model in the same run), with the weight
  rebuilt from the codebook in every forward and with the rebuilt weight cached (``set_cache``);
* apply: seconds ``ShareWeights.apply`` took (k-means included).

    python benchmarks/share.py            # writes benchmarks/results/share.json
    python benchmarks/share.py --quick    # smaller inputs and BERT, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings

import torch
from _common import print_table, write_json

import nnslim
from nnslim.base.inputs import as_inputs, output_tensors
from nnslim.modules.shared import set_cache
from nnslim.profiling import measure_latency
from nnslim.transforms.share import ShareWeights

CLUSTERS = (16, 64, 256)


def resnet50(quick: bool):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    size = 128 if quick else 224
    return model, torch.randn(1, 3, size, size)


def bert(quick: bool):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=256 if quick else 512,
        num_hidden_layers=4 if quick else 8,
        num_attention_heads=4 if quick else 8,
        intermediate_size=1024 if quick else 2048,
        vocab_size=8000,
        max_position_embeddings=512,
    )
    model = transformers.BertModel(cfg).eval()
    seq = 64 if quick else 128
    g = torch.Generator().manual_seed(0)
    return model, {"input_ids": torch.randint(0, 8000, (1, seq), generator=g)}


def outputs(model, inputs):
    with torch.no_grad():
        return [t.float() for t in output_tensors(inputs.call(model)) if t.is_floating_point()]


def rel_error(got, ref) -> float:
    num = sum(float((g - r).pow(2).sum()) for g, r in zip(got, ref))
    den = sum(float(r.pow(2).sum()) for r in ref)
    return (num / den) ** 0.5


def file_size(model) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        nnslim.save(model, path)
        return os.path.getsize(path)


def latency(model, inputs, quick: bool) -> float:
    return measure_latency(
        model,
        inputs,
        warmup=2,
        repeat=5 if quick else 15,
        threads=1,
        min_time_s=0 if quick else 2.0,
    ).median_ms


def measure(name, build, configs, quick):
    base, x = build(quick)
    inputs = as_inputs(x)
    ref = outputs(base, inputs)
    dense = {
        "model": name,
        "config": "dense fp32",
        "file_bytes": file_size(base),
        "param_bytes": nnslim.profile(base, x).param_bytes,
        "params": nnslim.profile(base, x).params,
        "error": 0.0,
        "latency_ms": latency(base, inputs, quick),
        "latency_cached_ms": None,
        "apply_s": None,
    }
    rows = [dense]
    for label, transform in configs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = transform.apply(model, x)
        seconds = time.perf_counter() - t0
        row = {
            "model": name,
            "config": label,
            "transform": repr(transform),
            "file_bytes": file_size(model),
            "param_bytes": report.after.param_bytes,
            "params": report.after.params,
            "error": rel_error(outputs(model, inputs), ref),
            "latency_ms": latency(model, inputs, quick),
            "apply_s": seconds,
            "changed": len(report.changes),
            "left_alone": len(report.skips),
        }
        set_cache(model, True)
        row["latency_cached_ms"] = latency(model, inputs, quick)
        rows.append(row)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    palettize = [(f"{k} clusters", ShareWeights(clusters=k)) for k in CLUSTERS]
    rows = measure("resnet50", resnet50, palettize, args.quick)
    rows += measure(
        "bert (from config)",
        bert,
        [
            *palettize,
            (
                "tie encoder layers",
                ShareWeights(clusters=None, across_layers="encoder.layer"),
            ),
            ("tie + 16 clusters", ShareWeights(clusters=16, across_layers="encoder.layer")),
        ],
        args.quick,
    )
    dense = {r["model"]: r for r in rows if r["config"] == "dense fp32"}
    table = []
    for r in rows:
        d = dense[r["model"]]
        cached = r["latency_cached_ms"]
        table.append(
            [
                r["model"],
                r["config"],
                f"{r['file_bytes'] / 1e6:.2f} MB ({d['file_bytes'] / r['file_bytes']:.2f}x)",
                f"{r['param_bytes'] / 1e6:.2f} MB ({d['param_bytes'] / r['param_bytes']:.2f}x)",
                f"{r['error']:.4f}",
                f"{r['latency_ms']:.1f} ({r['latency_ms'] / d['latency_ms']:.2f}x)",
                "-" if cached is None else f"{cached:.1f} ({cached / d['latency_ms']:.2f}x)",
                "-" if r["apply_s"] is None else f"{r['apply_s']:.1f}",
            ]
        )
    print_table(
        [
            "model",
            "config",
            "file (smaller by)",
            "weight bytes (smaller by)",
            "rel. error",
            "latency ms",
            "cached ms",
            "apply s",
        ],
        table,
        title="ShareWeights: size, error and CPU latency (1 thread, median, same run)",
    )
    path = write_json("share" + ("-quick" if args.quick else ""), {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
