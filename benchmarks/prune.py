"""Pruning: MACs and measured CPU latency before and after, and planning time at 7B scale.

* resnet50 pruned to 50% of its MACs;
* a Llama-shaped model from config (GQA) with half its heads and MLP width pruned;
* a 32-layer Llama-7B-shaped model built on the ``meta`` device: trace + plan time.

Latency: median of repeated runs after warm-up, 1 thread and the default thread count, as
ratios against the unpruned model measured in the same run.

    python benchmarks/prune.py            # writes benchmarks/results/prune.json
    python benchmarks/prune.py --quick    # smaller inputs, fewer repeats
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from _common import print_table, write_json

import nnslim
from nnslim.base.inputs import as_inputs
from nnslim.profiling import measure_latency


def resnet50(quick: bool):
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    size = 128 if quick else 224
    return model, torch.randn(1, 3, size, size), nnslim.Prune(macs=0.5, round_to=8)


def llama(quick: bool):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=512 if quick else 1024,
        intermediate_size=1408 if quick else 2816,
        num_hidden_layers=4 if quick else 8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8000,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    seq = 64 if quick else 128
    return (
        model,
        {"input_ids": torch.randint(0, 8000, (1, seq))},
        nnslim.Prune(ratio=0.5, round_to=8),
    )


def measure(name, build, quick):
    model, x, transform = build(quick)
    base = copy.deepcopy(model)
    t0 = time.perf_counter()
    report = transform.apply(model, x)
    seconds = time.perf_counter() - t0
    inputs = as_inputs(x)
    row = {
        "model": name,
        "transform": repr(transform),
        "prune_seconds": seconds,
        "macs_before": report.before.macs,
        "macs_after": report.after.macs,
        "params_before": report.before.params,
        "params_after": report.after.params,
    }
    for threads in (1, None):
        key = "1" if threads == 1 else "default"
        lat = {}
        for label, m in (("before", base), ("after", model)):
            lat[label] = measure_latency(
                m,
                inputs,
                warmup=3,
                repeat=5 if quick else 15,
                threads=threads,
                min_time_s=0 if quick else 2.0,
            )
        row[f"latency_ms_before_{key}"] = lat["before"].median_ms
        row[f"latency_ms_after_{key}"] = lat["after"].median_ms
        row[f"threads_{key}"] = lat["before"].threads
    return row


def plan_7b():
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    plan = nnslim.Prune(ratio=0.25, round_to=64).plan(
        model, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta")}
    )
    return {
        "seconds": time.perf_counter() - t0,
        "groups": len(plan.channels),
        "attention": len(plan.heads),
        "heads": plan.heads[0][1:3],
        "mlp_width": plan.channels[0][1:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = [
        measure("resnet50", resnet50, args.quick),
        measure("llama-gqa (from config)", llama, args.quick),
    ]
    table = []
    for r in rows:
        macs = r["macs_after"] / r["macs_before"]
        for key in ("1", "default"):
            lat = r[f"latency_ms_after_{key}"] / r[f"latency_ms_before_{key}"]
            table.append(
                [
                    r["model"],
                    r[f"threads_{key}"],
                    f"{r['macs_before'] / 1e9:.3f} -> {r['macs_after'] / 1e9:.3f}",
                    f"{macs:.3f}",
                    f"{r[f'latency_ms_before_{key}']:.2f} -> {r[f'latency_ms_after_{key}']:.2f}",
                    f"{lat:.3f}",
                    f"{(1 / lat) / (1 / macs):.2f}",
                ]
            )
    print_table(
        [
            "model",
            "threads",
            "GMACs",
            "MACs ratio",
            "latency ms",
            "latency ratio",
            "speedup / MACs speedup",
        ],
        table,
        title="Prune: MACs and CPU latency (median, same run)",
    )
    plan = plan_7b()
    print(
        f"\nLlama-7B-shaped (32 layers, GQA 32/8 heads) on meta: trace + plan in {plan['seconds']:.1f} s; "
        f"{plan['attention']} attention modules ({plan['heads'][0]} -> {plan['heads'][1]} heads), "
        f"{plan['groups']} MLP groups ({plan['mlp_width'][0]} -> {plan['mlp_width'][1]})"
    )
    path = write_json("prune" + ("-quick" if args.quick else ""), {"rows": rows, "plan_7b": plan})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
