"""Packed sparse layers (``Prune(pack=True)``): bytes in memory and on disk, and the time the
unpacking costs, against the masked (dense) layer in the same run.

Model: a 4-layer 4096x4096 MLP (Gaussian weights), fp32 and bf16 (ONNX: fp32 only), pruned by magnitude to 50%
unstructured and 2:4 (the output layer included: every layer selected). Rows: dense, masked
(``pack=False``: the weight with its zeros and a ``weight_mask``), packed. Columns: the
profiler's weight bytes and the ``nnslim.save`` file size as ratios to dense, the output's
largest difference from the masked model (0: the same math), and latency at batch 1 and 32 on
one thread as a ratio to dense (median of repeated runs after warm-up); then the same for the
ONNX file ``nnslim.export`` writes, run in ONNX Runtime (one thread), against the dense
model's file.

    python benchmarks/sparse_pack.py            # writes benchmarks/results/sparse_pack.json
    python benchmarks/sparse_pack.py --quick    # 1024 wide
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
from _common import print_table, write_json
from torch import nn

import nnslim
from nnslim.base.inputs import as_inputs
from nnslim.profiling import measure_latency


def mlp(width: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, std=width**-0.5)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval().to(dtype)


def file_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        nnslim.save(model, path)
        return os.path.getsize(path)


def onnx_run(model: nn.Module, width: int, dtype: torch.dtype, repeat: int) -> tuple[int, dict]:
    """The exported file's size and ONNX Runtime's median time at batch 1 and 32 (ms)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = nnslim.export(model, torch.randn(2, width, dtype=dtype), os.path.join(d, "m.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        size = os.path.getsize(path)
    name = session.get_inputs()[0].name
    ms = {}
    for b in (1, 32):
        feed = {name: torch.randn(b, width, dtype=dtype).float().numpy()}
        for _ in range(3):
            session.run(None, feed)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append(time.perf_counter() - t0)
        ms[b] = statistics.median(times) * 1e3
    return size, ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    width = 1024 if args.quick else 4096
    repeat = 10 if args.quick else 30
    rows, table = [], []
    for dtype in (torch.float32, torch.bfloat16):
        base = mlp(width, dtype)
        x = torch.randn(1, width, dtype=dtype)
        layers = [str(i) for i in range(0, 7, 2)]
        dense_bytes = nnslim.profile(base, x, memory=False).param_bytes
        dense_file = file_bytes(base)
        onnx0 = onnx_run(base, width, dtype, repeat) if dtype == torch.float32 else None
        lat0 = {
            b: measure_latency(
                base, as_inputs(torch.randn(b, width, dtype=dtype)), repeat=repeat, threads=1
            ).median_ms
            for b in (1, 32)
        }
        for structure, ratio in (("unstructured", 0.5), ("2:4", None)):
            masked = copy.deepcopy(base)
            nnslim.Prune(structure=structure, ratio=ratio, select=layers).apply(masked, x)
            for pack in (False, True):
                m = copy.deepcopy(base)
                nnslim.Prune(structure=structure, ratio=ratio, select=layers, pack=pack).apply(m, x)
                with torch.no_grad():
                    diff = float((m(x).float() - masked(x).float()).abs().max())
                lat = {
                    b: measure_latency(
                        m, as_inputs(torch.randn(b, width, dtype=dtype)), repeat=repeat, threads=1
                    ).median_ms
                    / lat0[b]
                    for b in (1, 32)
                }
                row = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "sparsity": structure if ratio is None else f"{ratio:.0%} {structure}",
                    "storage": "packed" if pack else "masked",
                    "weight_bytes": nnslim.profile(m, x, memory=False).param_bytes / dense_bytes,
                    "file_bytes": file_bytes(m) / dense_file,
                    "max_diff_vs_masked": diff,
                    "latency_b1": lat[1],
                    "latency_b32": lat[32],
                }
                if onnx0 is not None:
                    size, ms = onnx_run(m, width, dtype, repeat)
                    row["onnx_file_bytes"] = size / onnx0[0]
                    row["ort_latency_b1"] = ms[1] / onnx0[1][1]
                    row["ort_latency_b32"] = ms[32] / onnx0[1][32]
                rows.append(row)
                table.append(
                    [
                        row["dtype"],
                        row["sparsity"],
                        row["storage"],
                        f"{row['weight_bytes']:.3f}x",
                        f"{row['file_bytes']:.3f}x",
                        f"{diff:.1e}",
                        f"{lat[1]:.2f}x",
                        f"{lat[32]:.2f}x",
                        *(
                            f"{row[k]:.2f}x"
                            for k in ("onnx_file_bytes", "ort_latency_b1", "ort_latency_b32")
                            if k in row
                        ),
                    ]
                )
    print_table(
        [
            "dtype",
            "sparsity",
            "storage",
            "weight bytes",
            "file bytes",
            "diff vs masked",
            "latency b1",
            "latency b32",
            "ONNX file",
            "ORT b1",
            "ORT b32",
        ],
        table,
        title=f"4 x Linear({width}, {width}), one thread; ratios to the dense model in this run",
    )
    print(f"wrote {write_json('sparse_pack' + ('-quick' if args.quick else ''), {'rows': rows})}")


if __name__ == "__main__":
    main()
