"""Deployment side by side: nnslim models in eager torch, torch.compile, ONNX Runtime, OpenVINO.

Models: a 4-layer MLP (4096 wide; ``--quick``: 1024) at batch 1 and 32, and resnet50 pruned to
half its MACs (``--resnet``). Rows per case: torch fp32 (the baseline), the torch.ao
``quantize_dynamic`` peer, fp32 in ONNX Runtime, and each nnslim variant (int8-dynamic, int4
group 128; the pruned resnet) in eager torch, ``torch.compile``, ONNX Runtime and OpenVINO
(``nnslim.export``). Latency is the median of repeated runs after warm-up, on 1 and 2
threads, as a ratio to torch fp32 in the same run (this machine is shared and noisy: compare
ratios, not milliseconds). ``file_mb`` is the exported ONNX file; ``rel_error`` the relative
L2 error of the output against nnslim eager (the model exported).

    python benchmarks/export.py                 # writes benchmarks/results/export.json
    python benchmarks/export.py --quick         # 1024-wide MLP
    python benchmarks/export.py --resnet        # also resnet50 pruned to 0.5x MACs
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _common import print_table, write_json
from torch import nn

import nnslim


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, std=width**-0.5)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _median_ms(fn: Any, repeat: int, min_s: float = 0.5) -> float:
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_case(
    name: str, variants: dict[str, nn.Module], x: torch.Tensor, repeat: int, tmp: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fp32: dict[int, float] = {}
    for label, model in variants.items():
        with torch.no_grad():
            ref = model(x).float()
        engines: dict[str, Any] = {"eager": model}
        if label.startswith("nnslim") or label == "fp32":
            engines["onnxruntime"] = None
            engines["openvino"] = None
            if label.startswith("nnslim"):
                engines["torch.compile"] = None
        for engine in engines:
            row: dict[str, Any] = {"case": name, "variant": label, "engine": engine}
            try:
                run, size, out = _engine(engine, model, x, tmp / f"{label}.onnx")
                row["file_mb"] = size
                row["rel_error"] = float((out.float() - ref).norm() / ref.norm())
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    fn = run(threads)
                    ms = _median_ms(fn, repeat)
                    row[f"ms_{threads}"] = ms
                    if label == "fp32" and engine == "eager":
                        fp32[threads] = ms
                    row[f"speedup_{threads}"] = fp32[threads] / ms
            except Exception as e:  # an engine that cannot run it is a result too
                row["failed"] = f"{type(e).__name__}: {e}"[:120]
            rows.append(row)
            print(
                f"  {label} / {engine}: "
                + (row.get("failed") or f"{row['speedup_1']:.2f}x, {row['speedup_2']:.2f}x")
            )
    return rows


def _engine(engine: str, model: nn.Module, x: torch.Tensor, path: Path) -> Any:
    """``(threads -> callable, file MB or None, output)`` for one engine."""
    if engine == "eager":

        def eager(threads: int) -> Any:
            return lambda: _no_grad(model, x)

        return eager, None, _no_grad(model, x)
    if engine == "torch.compile":
        torch._dynamo.reset()
        compiled = torch.compile(model)
        out = _no_grad(compiled, x)

        def comp(threads: int) -> Any:
            return lambda: _no_grad(compiled, x)

        return comp, None, out
    if engine == "openvino":
        import openvino as ov

        xml = path.with_suffix(".xml")
        nnslim.export(model, x, xml, format="openvino", overwrite=True)
        compiled: dict[int, Any] = {}

        def ov_run(threads: int) -> Any:
            c = compiled.setdefault(
                threads,
                ov.Core().compile_model(
                    str(xml), "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
                ),
            )
            return lambda: c([x.numpy()])

        size = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20
        return ov_run, size, torch.from_numpy(ov_run(1)()[0])
    nnslim.export(model, x, path, overwrite=True)
    feed = {"x": x.numpy()}
    sessions: dict[int, Any] = {}

    def ort_run(threads: int) -> Any:
        s = sessions.setdefault(threads, _ort_session(path, threads))
        name = s.get_inputs()[0].name
        return lambda: s.run(None, {name: feed["x"]})

    out = torch.from_numpy(ort_run(1)()[0])
    return ort_run, path.stat().st_size / 2**20, out


def _no_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def mlp_variants(base: nn.Module) -> dict[str, nn.Module]:
    def ours(**kw: Any) -> nn.Module:
        m = copy.deepcopy(base)
        nnslim.Quantize(**kw).apply(m)
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8
        )
    return {
        "fp32": base,
        "torch.ao quantize_dynamic (peer)": peer,
        "nnslim int8-dynamic": ours(scheme="int8-dynamic"),
        "nnslim int4 g128": ours(scheme="int4", group_size=128),
    }


def resnet_variants() -> tuple[dict[str, nn.Module], torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    pruned = copy.deepcopy(base)
    nnslim.Prune(macs=0.5).apply(pruned, x)
    return {"fp32": base, "nnslim pruned 0.5x MACs": pruned}, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resnet", action="store_true")
    args = parser.parse_args()
    width = 1024 if args.quick else 4096
    repeat = 5 if args.quick else 15
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = mlp(width)
        variants = mlp_variants(base)
        for bs in (1, 32):
            name = f"MLP 4x{width} bs{bs}"
            print(name)
            records += run_case(name, variants, torch.randn(bs, width), repeat, tmp)
        if args.resnet:
            rv, x = resnet_variants()
            print("resnet50")
            records += run_case("resnet50 1x224", rv, x, repeat, tmp)
    headers = ["case", "variant", "engine", "x fp32 (1 thr)", "x fp32 (2 thr)", "MB", "rel err"]
    table = [
        [
            r["case"],
            r["variant"],
            r["engine"],
            f"{r['speedup_1']:.2f}" if "speedup_1" in r else r.get("failed", ""),
            f"{r['speedup_2']:.2f}" if "speedup_2" in r else "",
            f"{r['file_mb']:.1f}" if r.get("file_mb") else "",
            f"{r['rel_error']:.4f}" if "rel_error" in r else "",
        ]
        for r in records
    ]
    print_table(headers, table, title="Deployment: speed-up over torch fp32 (same run)")
    print(f"wrote {write_json('export', {'rows': records})}")


if __name__ == "__main__":
    main()
