"""Deployment side by side: nnslim models in eager torch, torch.compile, ONNX Runtime, OpenVINO.

Models: a 4-layer MLP (4096 wide; ``--quick``: 1024) at batch 1 and 32, a Llama-shaped
decoder built from its config (hidden 1024, 4 layers, 32000 tokens; 1 x 32 tokens; ``--llama``)
and resnet50 pruned to half its MACs (``--resnet``). Rows per case: torch fp32 (the baseline),
the torch.ao ``quantize_dynamic`` peer, fp32 in ONNX Runtime, and each nnslim variant
(int8-dynamic, int4 group 128; the pruned resnet) in eager torch, ``torch.compile``, ONNX
Runtime and OpenVINO (``nnslim.export``), plus int4 in ONNX Runtime with
``int4_compute="float"``. Latency is the median of repeated runs after warm-up, on 1 and 2
threads, as a ratio to torch fp32 in the same run (this machine is shared and noisy: compare
ratios, not milliseconds). ``file_mb`` is the exported file; ``rel_error`` the relative L2
error of the output against nnslim eager (the model exported), ``rel_error_math`` against
its math in float32 (the integer layers' dequantized weights, unrounded activations): an
engine can differ from eager by rounding activations differently, and be the closer of the
two to the math.

    python benchmarks/export.py                 # writes benchmarks/results/export.json
    python benchmarks/export.py --quick         # 1024-wide MLP
    python benchmarks/export.py --resnet        # also resnet50 pruned to 0.5x MACs
    python benchmarks/export.py --llama         # also the Llama-shaped decoder
    python benchmarks/export.py --int4-levels   # int4 in ONNX Runtime: group x accuracy level

``--int4-levels`` answers one question of issue 18 (int4 in ONNX Runtime at >= 3x fp32 and
within 1e-2 of eager, at once?): the MLP at batch 1, one thread, int4 with groups of 128, 64
and 32, exported at each ``MatMulNBits`` accuracy level (0: unset, 1: fp32, 2: fp16, 3: bf16,
4: int8 activations), speed-up over torch fp32, error against eager and the math, file size
as a fraction of fp32's.
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


#: OpenVINO computes in float32 here, as torch fp32 does (its default on CPUs with AMX is bf16;
#: OpenVINO 2026.4.1's CPU plugin also dies of a divide error (SIGFPE) compiling a Llama graph
#: at bf16 with one inference thread)
OPENVINO = {"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}

#: variants run in ONNX Runtime only, with these export options (the model of the variant named
#: before the comma)
ONNX_OPTIONS = {"nnslim int4 g128, float compute": {"int4_compute": "float"}}


def run_case(
    name: str, variants: dict[str, nn.Module], x: torch.Tensor, repeat: int, tmp: Path
) -> list[dict[str, Any]]:
    from nnslim.io.export import _dequantized

    rows: list[dict[str, Any]] = []
    fp32: dict[int, float] = {}
    labels = list(variants)
    labels += [o for o in ONNX_OPTIONS if o.split(",")[0] in variants]
    for label in labels:
        model = variants[label.split(",")[0]]
        options = ONNX_OPTIONS.get(label, {})
        with torch.no_grad():
            ref = model(x).float()
            math = _dequantized(model)(x).float()
        engines: list[str] = ["eager"]
        if options:
            engines = ["onnxruntime"]
        elif label.startswith("nnslim") or label == "fp32":
            engines += ["onnxruntime", "openvino"]
            if label.startswith("nnslim"):
                engines.append("torch.compile")
        for engine in engines:
            row: dict[str, Any] = {"case": name, "variant": label, "engine": engine}
            try:
                run, size, out = _engine(engine, model, x, tmp / f"{len(rows)}.onnx", options)
                row["file_mb"] = size
                row["rel_error"] = float((out.float() - ref).norm() / ref.norm())
                row["rel_error_math"] = float((out.float() - math).norm() / math.norm())
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


def _engine(
    engine: str, model: nn.Module, x: torch.Tensor, path: Path, options: dict[str, Any]
) -> Any:
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
                    str(xml), "CPU", {**OPENVINO, "INFERENCE_NUM_THREADS": threads}
                ),
            )
            return lambda: c([x.numpy()])

        size = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20
        return ov_run, size, torch.from_numpy(ov_run(1)()[0])
    nnslim.export(model, x, path, overwrite=True, **options)
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
    # every Linear by name, the LM head too (Quantize keeps a head in float unless named): the
    # layers the peer quantizes
    every = [p for p, m in base.named_modules() if isinstance(m, nn.Linear)]

    def ours(**kw: Any) -> nn.Module:
        m = copy.deepcopy(base)
        nnslim.Quantize(**kw, select=every).apply(m)
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


class Logits(nn.Module):
    """A causal LM's logits from token ids (one tensor in, one out, as the engines take it)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def llama_variants() -> tuple[dict[str, nn.Module], torch.Tensor]:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    base = Logits(transformers.LlamaForCausalLM(config)).eval()
    x = torch.randint(0, config.vocab_size, (1, 32))
    return mlp_variants(base), x


def resnet_variants() -> tuple[dict[str, nn.Module], torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    pruned = copy.deepcopy(base)
    nnslim.Prune(macs=0.5).apply(pruned, x)
    # channel counts in multiples of 8 (Torch-Pruning's round_to): the engines' convolution
    # kernels work in blocks of 8/16 channels, so odd counts waste part of each block
    rounded = copy.deepcopy(base)
    nnslim.Prune(macs=0.5, round_to=8).apply(rounded, x)
    return {
        "fp32": base,
        "nnslim pruned 0.5x MACs": pruned,
        "nnslim pruned 0.5x MACs, round_to=8": rounded,
    }, x


def _in_engine(
    rows: list[dict[str, Any]], variants: dict[str, nn.Module], x: torch.Tensor
) -> list[dict[str, Any]]:
    """Each pruned variant's speed-up inside each engine (one thread) over the same engine's
    fp32 model, against its MACs speed-up (the profiler's count)."""
    macs = {k: nnslim.profile(m, x, memory=False).macs for k, m in variants.items()}
    ms = {(r["variant"], r["engine"]): r.get("ms_1") for r in rows}
    out = []
    for (variant, engine), t in ms.items():
        base = ms.get(("fp32", engine))
        if variant == "fp32" or t is None or base is None:
            continue
        ratio = macs[variant] / macs["fp32"]
        out.append(
            {
                "variant": variant,
                "engine": engine,
                "macs_ratio": ratio,
                "speedup": base / t,
                "of_macs_speedup": (base / t) * ratio,
            }
        )
    return out


def int4_levels(width: int, repeat: int, tmp: Path) -> list[dict[str, Any]]:
    """The ``--int4-levels`` table (see the module docstring)."""
    import nnslim.io.export as ex
    from nnslim.io.export import _dequantized

    torch.set_num_threads(1)
    base = mlp(width)
    x = torch.randn(1, width)
    with torch.no_grad():
        fp32 = _median_ms(lambda: base(x), repeat)
    fp32_mb = sum(p.numel() * 4 for p in base.parameters()) / 2**20
    rows = []
    saved = dict(ex._INT4_LEVELS)
    try:
        for group in (128, 64, 32):
            m = copy.deepcopy(base)
            nnslim.Quantize(scheme="int4", group_size=group).apply(m, x)
            with torch.no_grad():
                ref, math = m(x).float(), _dequantized(m)(x).float()
            for level in (0, 1, 2, 3, 4):
                ex._INT4_LEVELS["float"] = level  # the export option's level, for this sweep
                path = tmp / f"int4-{group}-{level}.onnx"
                nnslim.export(m, x, path, format="onnx", int4_compute="float", check=False)
                sess = _ort_session(path, 1)
                name = sess.get_inputs()[0].name
                feed = {name: x.numpy()}
                out = torch.from_numpy(sess.run(None, feed)[0]).float()
                ms = _median_ms(lambda s=sess, f=feed: s.run(None, f), repeat)
                size = sum(f.stat().st_size for f in tmp.glob(f"int4-{group}-{level}.onnx*"))
                rows.append(
                    {
                        "group": group,
                        "level": level,
                        "speedup_1": fp32 / ms,
                        "rel_error": float((out - ref).norm() / ref.norm()),
                        "rel_error_math": float((out - math).norm() / math.norm()),
                        "file_fraction": size / 2**20 / fp32_mb,
                    }
                )
                r = rows[-1]
                print(
                    f"  g{group} level {level}: {r['speedup_1']:.2f}x, error {r['rel_error']:.4f}"
                    f" (math {r['rel_error_math']:.4f}), file {r['file_fraction']:.3f} of fp32",
                    flush=True,
                )
    finally:
        ex._INT4_LEVELS.clear()
        ex._INT4_LEVELS.update(saved)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resnet", action="store_true")
    parser.add_argument("--llama", action="store_true")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP cases")
    parser.add_argument("--int4-levels", action="store_true", help="only the int4 level sweep")
    args = parser.parse_args()
    width = 1024 if args.quick else 4096
    repeat = 5 if args.quick else 15
    if args.int4_levels:
        with tempfile.TemporaryDirectory() as d:
            rows = int4_levels(width, repeat, Path(d))
        print_table(
            [
                "group",
                "accuracy level",
                "x fp32 (1 thr, bs1)",
                "rel err vs eager",
                "vs math",
                "file",
            ],
            [
                [
                    r["group"],
                    r["level"],
                    f"{r['speedup_1']:.2f}",
                    f"{r['rel_error']:.4f}",
                    f"{r['rel_error_math']:.4f}",
                    f"{r['file_fraction']:.3f}",
                ]
                for r in rows
            ],
            title=f"int4 MLP 4x{width} in ONNX Runtime, MatMulNBits accuracy levels",
        )
        name = "export-int4-levels" + ("-quick" if args.quick else "")
        print(f"wrote {write_json(name, {'rows': rows})}")
        return
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = mlp(width)
        variants = mlp_variants(base)
        for bs in () if args.no_mlp else (1, 32):
            name = f"MLP 4x{width} bs{bs}"
            print(name)
            records += run_case(name, variants, torch.randn(bs, width), repeat, tmp)
        if args.llama:
            lv, x = llama_variants()
            print("Llama")
            records += run_case("Llama 4x1024 1x32", lv, x, repeat, tmp)
        in_engine: list[dict[str, Any]] = []
        if args.resnet:
            rv, x = resnet_variants()
            print("resnet50")
            rrows = run_case("resnet50 1x224", rv, x, repeat, tmp)
            records += rrows
            in_engine = _in_engine(rrows, rv, x)
    headers = [
        "case",
        "variant",
        "engine",
        "x fp32 (1 thr)",
        "x fp32 (2 thr)",
        "MB",
        "rel err",
        "vs math",
    ]
    table = [
        [
            r["case"],
            r["variant"],
            r["engine"],
            f"{r['speedup_1']:.2f}" if "speedup_1" in r else r.get("failed", ""),
            f"{r['speedup_2']:.2f}" if "speedup_2" in r else "",
            f"{r['file_mb']:.1f}" if r.get("file_mb") else "",
            f"{r['rel_error']:.4f}" if "rel_error" in r else "",
            f"{r['rel_error_math']:.4f}" if "rel_error_math" in r else "",
        ]
        for r in records
    ]
    print_table(headers, table, title="Deployment: speed-up over torch fp32 (same run)")
    if in_engine:
        print_table(
            ["variant", "engine", "MACs ratio", "speed-up (1 thr)", "of MACs speed-up"],
            [
                [
                    r["variant"],
                    r["engine"],
                    f"{r['macs_ratio']:.3f}",
                    f"{r['speedup']:.2f}x",
                    f"{r['of_macs_speedup']:.2f}",
                ]
                for r in in_engine
            ],
            title="Pruned resnet50 inside each engine: speed-up over the engine's own fp32",
        )
    # a run without the MLP cases does not overwrite a full run's file
    cases = ["llama"] * args.llama + ["resnet"] * args.resnet
    name = "-".join(["export", *cases]) if args.no_mlp else "export"
    print(f"wrote {write_json(name, {'rows': records, 'in_engine': in_engine})}")


if __name__ == "__main__":
    main()
