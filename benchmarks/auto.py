"""Issue 20: nnslim.Auto against uniform int4 at the same bytes, SmolLM2-135M perplexity.

Budgets: the bytes of uniform int4 g64 on the transformer blocks (the embeddings and the
tied head stay float), and 0.5x / 0.35x the bytes of the int8 model (every block layer and
the embedding with its tied head in int8). Auto searches the blocks alone (as the uniform
rows quantize them) and the whole model (the embedding too, the head tied to it taking its
setting); a uniform row with the embedding in int8 and Auto at its bytes stand beside. The
model's weights come from a Q4_1 GGUF (4-bit, groups of 32), so int4 g32 is lossless on it:
uniform int4 g32 GPTQ is a reference row, and the whole-model searches are repeated without the
int4 g32 candidate (the same table, that option removed). Rows: uniform RTN,
uniform GPTQ, Auto with RTN and with GPTQ (candidates int8, int4 g64, int4 g32, palettes of
16 and 8 values; 576 and 1536 are not multiples of 128, so g128 is g64 here). The table
(Auto's per-layer measurement) is made once per method (with GPTQ it measures the int
candidates by GPTQ on each layer's input Gram) and each Auto row applies its plan
(``Auto(plan=...)``); its time is printed beside one uniform GPTQ pass's. Perplexity with
``nnslim.evaluate`` on the same windows as ``real_llm.py``; each row names its measured bytes
and the time it took to apply.

    python benchmarks/auto.py            # 32 eval windows, 16 calibration windows
    python benchmarks/auto.py --quick    # 2 and 2
    python benchmarks/auto.py --latency 0.6   # a latency budget instead (see latency_budget)
    python benchmarks/auto.py --blocks-only   # the searches of the blocks alone
    python benchmarks/auto.py --streamed      # the blocks' search from a checkpoint, streamed
    python benchmarks/auto.py --channels      # channel candidates at structured 20%'s MACs
    python benchmarks/auto.py --sparsity      # packed sparsity at uniform 50% SparseGPT's bytes

``--streamed`` saves the float model with ``save_pretrained`` and searches its blocks from that
checkpoint with ``nnslim.checkpoint_table`` and ``nnslim.compress_checkpoint(...,
Auto(plan=...))`` (one block in memory at a time): the same budget and candidates as the
in-memory blocks-only rows (labelled calibration batches: the model's own loss).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import print_table, write_json
from real_llm import smollm2_windows

import nnslim
from nnslim.evaluate import perplexity
from nnslim.transforms.auto import AutoTable

BLOCKS = "re:model\\.layers\\..*"
EMBED = "model.embed_tokens"
#: the blocks and the embedding (the head is tied to it: chosen with it)
WHOLE = [BLOCKS, EMBED]


def latency_budget(args: argparse.Namespace, base, evals, calib) -> None:
    """``--latency F``: Auto under a budget of F of the model's eager forward time on one
    512-token window (one thread), candidates int8-dynamic, int4 g64 and low rank 1/2 and 1/4,
    against uniform int8-dynamic; each row's time measured after applying (median of 20 runs,
    one thread), beside the time Auto predicted."""
    torch.set_num_threads(1)
    example = calib[0]
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in calib]
    cands = ("int8-dynamic", "int4-g64", "rank-0.5", "rank-0.25")
    rows = []

    def measure(name: str, m, predicted: float | None, seconds: float) -> None:
        ms = nnslim.profile(m, example, memory=False, latency=True, repeat=20).latency.median_ms
        ppl = perplexity(m, evals).value
        rows.append(
            {
                "variant": name,
                "perplexity": ppl,
                "ms": ms,
                "predicted": predicted,
                "seconds": seconds,
            }
        )
        print(f"  {name}: ppl {ppl:.3f}, {ms:.1f} ms ({seconds:.0f} s)", flush=True)

    measure("fp32", base, None, 0.0)
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    nnslim.Quantize(scheme="int8-dynamic", select=BLOCKS).apply(m)
    measure("uniform int8-dynamic", m, None, time.perf_counter() - t0)
    t0 = time.perf_counter()
    auto = nnslim.Auto(target={"latency": args.latency}, candidates=cands, select=BLOCKS)
    table = auto.table(base, labelled, example)
    search = time.perf_counter() - t0
    plan = table.allocate(args.latency)
    m = copy.deepcopy(base)
    nnslim.Auto(plan=plan, candidates=cands, select=BLOCKS).apply(m, calibration=labelled)
    counts: dict[str, int] = {}
    for n in plan.values():
        counts[n] = counts.get(n, 0) + 1
    print(f"  Auto's plan: {counts} of {len(table.options)} layers; table {search:.0f} s")
    measure(f"Auto latency {args.latency:g}", m, table.cost_of(plan), search)
    fp_ms, fp = rows[0]["ms"], rows[0]["perplexity"]
    print_table(
        ["variant", "perplexity", "vs fp32", "latency ms", "x fp32 time", "predicted ms"],
        [
            [
                r["variant"],
                f"{r['perplexity']:.3f}",
                f"{r['perplexity'] / fp - 1:+.1%}",
                f"{r['ms']:.1f}",
                f"{r['ms'] / fp_ms:.3f}",
                f"{r['predicted']:.1f}" if r["predicted"] is not None else "",
            ]
            for r in rows
        ],
        title=f"SmolLM2-135M-Instruct, latency budget {args.latency:g} (1 thread, eager), "
        f"{evals.describe()}",
    )
    name = f"auto-latency{args.latency:g}" + ("-quick" if args.quick else "")
    payload = {"rows": rows, "plan": plan, "counts": counts, "table_seconds": search}
    print(f"wrote {write_json(name, payload)}")


def channel_budget(args: argparse.Namespace, base, evals, calib) -> None:
    """``--channels``: the MACs of uniform structured pruning (20% of every attention's heads
    and every MLP's units, Wanda, the residual width kept: ``real_llm.py``'s structured row),
    and Auto at those MACs with channel candidates (a quarter or half of a group's heads or
    units) and low rank (a half or a quarter of a layer's parameters), no fine-tuning."""
    example = calib[0]
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in calib]
    full = nnslim.profile(base, example, memory=False)
    rows = []

    def measure(name: str, m, seconds: float, plan: str = "") -> float:
        prof = nnslim.profile(m, example, memory=False)
        ppl = perplexity(m, evals).value
        macs = prof.macs / full.macs
        rows.append(
            {
                "variant": name,
                "perplexity": ppl,
                "macs_fraction": macs,
                "bytes_fraction": prof.param_bytes / full.param_bytes,
                "seconds": seconds,
                "plan": plan,
            }
        )
        print(f"  {name}: ppl {ppl:.3f}, MACs {macs:.4f} ({seconds:.0f} s)", flush=True)
        return macs

    measure("fp32", base, 0.0)
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    units = "re:model\\.layers\\.\\d+\\.(self_attn\\.q_proj|mlp\\.up_proj)"
    nnslim.Prune(ratio=0.2, importance="wanda", select=units).apply(m, calibration=calib)
    budget = measure(
        "uniform structured 20% (heads and MLP units, Wanda)", m, time.perf_counter() - t0
    )
    del m
    cands = ("channels-0.25", "channels-0.5", "rank-0.5", "rank-0.25")
    t0 = time.perf_counter()
    auto = nnslim.Auto(target={"macs": budget}, candidates=cands, select=BLOCKS)
    table = auto.table(base, labelled, example)
    search = time.perf_counter() - t0
    plan = table.allocate(budget)
    counts: dict[str, int] = {}
    for n in plan.values():
        counts[n] = counts.get(n, 0) + 1
    print(
        f"  Auto's plan: {counts}; {len(table.groups)} groups, {len(table.options)} layers "
        f"alone; table {search:.0f} s",
        flush=True,
    )
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    nnslim.Auto(plan=plan, candidates=cands, select=BLOCKS).apply(m, calibration=labelled)
    measure(f"Auto at {budget:.4f} of the MACs", m, search + time.perf_counter() - t0, str(counts))
    fp = rows[0]["perplexity"]
    print_table(
        ["variant", "perplexity", "vs fp32", "MACs", "bytes", "s"],
        [
            [
                r["variant"],
                f"{r['perplexity']:.3f}",
                f"{r['perplexity'] / fp:.2f}x",
                f"{r['macs_fraction']:.4f}",
                f"{r['bytes_fraction']:.4f}",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
        ],
        title=f"SmolLM2-135M-Instruct, MACs budget, {evals.describe()}, no fine-tuning",
    )
    name = "auto-channels" + ("-quick" if args.quick else "")
    payload = {"rows": rows, "plan": plan, "counts": counts, "table_seconds": search}
    print(f"wrote {write_json(name, payload)}")


def sparsity_budget(args: argparse.Namespace, base, evals, calib) -> None:
    """``--sparsity``: the bytes of uniform 50% unstructured SparseGPT stored packed on the
    blocks (``Prune(pack=True)``: the kept weights and a bitmask), and Auto at those bytes with
    the sparsity candidates (50% unstructured and 2:4, SparseGPT, packed) and low rank 1/2: a
    per-layer allocation of sparsity against the uniform one, no fine-tuning."""
    example = calib[0]
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in calib]
    full = nnslim.profile(base, example, memory=False).param_bytes
    rows = []

    def measure(name: str, m, seconds: float, plan: str = "") -> float:
        size = nnslim.profile(m, example, memory=False).param_bytes / full
        ppl = perplexity(m, evals).value
        rows.append(
            {
                "variant": name,
                "perplexity": ppl,
                "bytes_fraction": size,
                "seconds": seconds,
                "plan": plan,
            }
        )
        print(f"  {name}: ppl {ppl:.3f}, bytes {size:.4f} ({seconds:.0f} s)", flush=True)
        return size

    measure("fp32", base, 0.0)
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    nnslim.Prune(
        ratio=0.5, structure="unstructured", importance="sparsegpt", select=BLOCKS, pack=True
    ).apply(m, calibration=calib)
    budget = measure("uniform 50% unstructured SparseGPT, packed", m, time.perf_counter() - t0)
    del m
    cands = ("sparse-0.5", "sparse-2:4", "rank-0.5")
    t0 = time.perf_counter()
    auto = nnslim.Auto(target={"bytes": budget}, candidates=cands, select=BLOCKS)
    table = auto.table(base, labelled, example)
    search = time.perf_counter() - t0
    plan = table.allocate(budget)
    counts: dict[str, int] = {}
    for n in plan.values():
        counts[n] = counts.get(n, 0) + 1
    print(f"  Auto's plan: {counts} of {len(table.options)} layers; table {search:.0f} s")
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    nnslim.Auto(plan=plan, candidates=cands, select=BLOCKS).apply(m, calibration=labelled)
    measure(f"Auto at {budget:.4f} of the bytes", m, search + time.perf_counter() - t0, str(counts))
    fp = rows[0]["perplexity"]
    print_table(
        ["variant", "perplexity", "vs fp32", "bytes", "s"],
        [
            [
                r["variant"],
                f"{r['perplexity']:.3f}",
                f"{r['perplexity'] / fp:.2f}x",
                f"{r['bytes_fraction']:.4f}",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
        ],
        title=f"SmolLM2-135M-Instruct, bytes budget, sparsity packed, {evals.describe()}",
    )
    name = "auto-sparsity" + ("-quick" if args.quick else "")
    payload = {"rows": rows, "plan": plan, "counts": counts, "table_seconds": search}
    print(f"wrote {write_json(name, payload)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--latency", type=float, default=None, metavar="F")
    parser.add_argument(
        "--blocks-only", action="store_true", help="the rows that search the blocks alone"
    )
    parser.add_argument(
        "--streamed", action="store_true", help="the blocks' search from a checkpoint, streamed"
    )
    parser.add_argument(
        "--channels",
        action="store_true",
        help="Auto with channel candidates at uniform structured 20%%'s MACs",
    )
    parser.add_argument(
        "--sparsity",
        action="store_true",
        help="Auto with packed sparsity candidates at uniform 50%% SparseGPT's bytes",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base, evals, calib = smollm2_windows(*((2, 2) if args.quick else (32, 16)))
    if args.latency is not None:
        latency_budget(args, base, evals, calib)
        return
    if args.channels:
        channel_budget(args, base, evals, calib)
        return
    if args.sparsity:
        sparsity_budget(args, base, evals, calib)
        return
    example = calib[0]
    full = nnslim.profile(base, example, memory=False).param_bytes
    rows = []
    # Auto's loss estimate differentiates the model's own next-token loss: give it the labels
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in calib]

    def run(name: str, transform: nnslim.Transform | None, budget: str) -> float:
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        if transform is not None:
            data = labelled if isinstance(transform, nnslim.Auto) else calib
            report = transform.apply(m, calibration=data)
            notes = [n for n in report.notes if n.startswith("Auto:")]
        else:
            notes = []
        seconds = time.perf_counter() - t0
        result = perplexity(m, evals)
        size = nnslim.profile(m, example, memory=False).param_bytes
        rows.append(
            {
                "budget": budget,
                "variant": name,
                "perplexity": result.value,
                "bytes_fraction": size / full,
                "seconds": seconds,
                "plan": notes[0] if notes else "",
            }
        )
        print(f"  {budget} {name}: {result} bytes {size / full:.4f} ({seconds:.0f} s)", flush=True)
        return size / full

    run("fp32", None, "-")
    int4 = run(
        "uniform int4 g64 RTN",
        nnslim.Quantize(scheme="int4", group_size=64, select=BLOCKS),
        "int4 g64",
    )
    run(
        "uniform int4 g64 GPTQ",
        nnslim.Quantize(scheme="int4", group_size=64, method="gptq", select=BLOCKS),
        "int4 g64",
    )
    cands = ("int8", "int4-g64", "int4-g32", "palette-16", "palette-8")
    gptq_s = next(r["seconds"] for r in rows if r["variant"] == "uniform int4 g64 GPTQ")
    if args.streamed:
        streamed(args, base, rows, evals, calib, cands, int4, gptq_s, full)
        return
    tables, searches, plans = {}, {}, {}
    for method in ("rtn", "gptq"):
        # with GPTQ the table measures the int candidates by GPTQ on each layer's Gram
        t0 = time.perf_counter()
        auto = nnslim.Auto(target={"bytes": int4}, candidates=cands, method=method, select=BLOCKS)
        tables[method] = table = auto.table(base, labelled)
        searches[method] = search = time.perf_counter() - t0
        print(
            f"  Auto's table ({method}): {len(table.options)} layers x {len(cands)} candidates "
            f"in {search:.0f} s ({search / gptq_s:.2f}x one uniform GPTQ pass)"
        )
        plans[method] = plan = table.allocate(int4)
        run(
            f"Auto ({method})",
            nnslim.Auto(plan=plan, candidates=cands, method=method, select=BLOCKS),
            "int4 g64",
        )
    # int4 g32 rounds this model's Q4_1-sourced weights back exactly: the same search without it
    plans["gptq, no int4-g32"] = plan = without(tables["gptq"], "int4-g32").allocate(int4)
    run(
        "Auto, without int4-g32 (gptq)",
        nnslim.Auto(plan=plan, candidates=cands, method="gptq", select=BLOCKS),
        "int4 g64",
    )
    front = tables["gptq"].front()
    for point in front:
        print(f"  front: budget {point['budget']:.4f} estimated loss {point['loss']:.4g}")
    if args.blocks_only:
        finish(args, rows, evals, {"table_seconds": searches, "plans": plans, "front": front})
        return
    # the whole model: the embedding (and the head tied to it) searched too
    t0 = time.perf_counter()
    whole = nnslim.Auto(
        target={"bytes": int4}, candidates=cands, method="gptq", select=WHOLE
    ).table(base, labelled)
    whole_s = time.perf_counter() - t0
    print(f"  Auto's table with the embedding: {whole_s:.0f} s; {whole.options[EMBED]}")
    # this model's weights come from a Q4_1 file (4-bit, groups of 32): int4 g32 rounds them
    # back exactly, so the same searches without that candidate say what the rest is worth
    no_g32 = without(whole, "int4-g32")
    whole_plans: dict[str, dict[str, str]] = {}

    def whole_row(budget: str, fraction: float, without_g32: bool = False) -> None:
        name = "Auto with the embedding" + (", without int4-g32" if without_g32 else "")
        try:
            plan = (no_g32 if without_g32 else whole).allocate(fraction)
        except ValueError as e:  # below the smallest reachable: say so
            print(f"  {budget}: {e}")
            rows.append({"budget": budget, "variant": name, "failed": str(e)})
            return
        whole_plans[f"{budget}{', no int4-g32' if without_g32 else ''}"] = plan
        run(
            name + " (gptq)",
            nnslim.Auto(plan=plan, candidates=cands, method="gptq", select=WHOLE),
            budget,
        )

    whole_row("int4 g64", int4)
    whole_row("int4 g64", int4, without_g32=True)
    # uniform int4 GPTQ on the blocks with the embedding (and tied head) in int8, and Auto at
    # those bytes
    mixed = run(
        "uniform int4 g64 GPTQ, embedding int8",
        nnslim.Compose(
            [
                nnslim.Quantize(scheme="int4", group_size=64, method="gptq", select=BLOCKS),
                nnslim.Quantize(scheme="int8", select=[EMBED]),
            ]
        ),
        "int4 + int8 embedding",
    )
    whole_row("int4 + int8 embedding", mixed)
    whole_row("int4 + int8 embedding", mixed, without_g32=True)
    run(
        "uniform int4 g32 GPTQ",
        nnslim.Quantize(scheme="int4", group_size=32, method="gptq", select=BLOCKS),
        "int4 g32 (reference)",
    )
    # the whole model in int8 (blocks, embedding and its tied head), and 0.5x / 0.35x of it
    m = copy.deepcopy(base)
    nnslim.Quantize(scheme="int8", select=WHOLE).apply(m, calibration=calib[:1])
    int8 = nnslim.profile(m, example, memory=False).param_bytes / full
    del m
    print(f"  the int8 model: {int8:.4f} of fp32; smallest reachable {whole.smallest():.4f}")
    for mult in (0.5, 0.35):
        whole_row(f"{mult}x int8", mult * int8)
        whole_row(f"{mult}x int8", mult * int8, without_g32=True)
    finish(
        args,
        rows,
        evals,
        {
            "table_seconds": searches,
            "whole_table_seconds": whole_s,
            "gptq_seconds": gptq_s,
            "plans": plans,
            "whole_plans": whole_plans,
            "int8_fraction": int8,
            "whole_smallest": whole.smallest(),
            "front": front,
        },
    )


def streamed(args, base, rows, evals, calib, cands, int4, gptq_s, full) -> None:
    """The blocks searched from a checkpoint, one block in memory at a time."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        # the GGUF-loaded model carries transformers' GGUF quantizer, which refuses to save:
        # the same weights in a plain model of its class
        config = copy.deepcopy(base.config)
        config.__dict__.pop("quantization_config", None)
        plain = type(base)(config)
        plain.load_state_dict(base.state_dict())
        plain.save_pretrained(src)
        del plain
        t0 = time.perf_counter()
        auto = nnslim.Auto(target={"bytes": int4}, candidates=cands, method="gptq")
        labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in calib]
        table = nnslim.checkpoint_table(src, auto, labelled, progress=False)
        search = time.perf_counter() - t0
        print(
            f"  streamed table: {len(table.options)} layers in {search:.0f} s "
            f"({search / gptq_s:.2f}x one uniform GPTQ pass in memory)"
        )
        plans = {"gptq": table.allocate(int4), "gptq, no int4-g32": without(table, "int4-g32")}
        plans["gptq, no int4-g32"] = plans["gptq, no int4-g32"].allocate(int4)
        for key, plan in plans.items():
            out = Path(d) / key.replace(",", "").replace(" ", "-")
            t0 = time.perf_counter()
            nnslim.compress_checkpoint(
                src,
                out,
                nnslim.Auto(plan=plan, candidates=cands, method="gptq"),
                calib,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(base.config)
            m = nnslim.load(out, skeleton).eval()
            result = perplexity(m, evals)
            size = nnslim.profile(m, calib[0], memory=False).param_bytes
            name = "Auto streamed" + (", without int4-g32" if "no" in key else "") + " (gptq)"
            rows.append(
                {
                    "budget": "int4 g64",
                    "variant": name,
                    "perplexity": result.value,
                    "bytes_fraction": size / full,
                    "predicted_fraction": table.cost_of(plan) / table.total,
                    "seconds": seconds,
                    "plan": f"{len(plan)} of {len(table.options)} layers changed",
                }
            )
            print(f"  int4 g64 {name}: {result} bytes {size / full:.4f} ({seconds:.0f} s)")
            del m
    finish(
        args,
        rows,
        evals,
        {"streamed_table_seconds": search, "gptq_seconds": gptq_s, "plans": plans},
    )


def without(table: AutoTable, name: str) -> AutoTable:
    """``table`` with the candidate ``name`` removed from every layer's options."""
    return AutoTable(
        table.metric_name,
        table.total,
        {p: [o for o in opts if o[0] != name] for p, opts in table.options.items()},
        table.unavailable,
        table.left,
    )


def finish(args: argparse.Namespace, rows: list[dict], evals, extra: dict) -> None:
    """The table, and the JSON (the rows, the windows and ``extra``)."""
    fp = rows[0]["perplexity"]
    print_table(
        ["budget", "variant", "perplexity", "vs fp32", "bytes", "search+apply s"],
        [
            [
                r["budget"],
                r["variant"],
                f"{r['perplexity']:.3f}",
                f"{r['perplexity'] / fp - 1:+.1%}",
                f"{r['bytes_fraction']:.4f}",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
            if "failed" not in r
        ],
        title=f"SmolLM2-135M-Instruct, {evals.describe()} (Wikipedia), Auto vs uniform",
    )
    if "front" in extra:  # the streamed rows have none
        extra = {
            **extra,
            "front": [{k: v for k, v in p.items() if k != "plan"} for p in extra["front"]],
        }
    name = (
        "auto"
        + ("-blocks-only" if args.blocks_only else "")
        + ("-streamed" if args.streamed else "")
    )
    name += "-quick" if args.quick else ""
    out = {"rows": rows, "windows": len(evals), "length": evals.length, **extra}
    print(f"wrote {write_json(name, out)}")


if __name__ == "__main__":
    main()
