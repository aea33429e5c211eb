"""Profiler side by side: nnslim vs FlopCounterMode, fvcore and torch-pruning's counter.

For each model: each tool's MAC count, its error against the ground truth (torchvision's
published MACs for the vision models; the analytic count for the language models, attention
counted dense), and its time relative to one forward pass (medians of ``--repeat`` runs, each
tool's runs in turns with forward passes under ``no_grad``).

    python benchmarks/profiler.py            # prints the table, writes benchmarks/results/profiler.json
    python benchmarks/profiler.py --quick    # small models only
    python benchmarks/profiler.py --threads 1 --repeat 7   # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings
from typing import Any

import torch
from _common import median_time, print_table, write_json

import nnslim


def gpt2(seq: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, d, vocab = 4, 256, 8000
    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=vocab, n_positions=512)
    model = GPT2LMHeadModel(cfg).eval()
    truth = layers * (12 * seq * d * d + 2 * seq * seq * d) + seq * d * vocab
    return model, {"input_ids": torch.randint(0, vocab, (1, seq))}, truth


def llama(seq: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, d, f, h, kvh, vocab = 4, 256, 688, 8, 2, 8000
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=h,
        num_key_value_heads=kvh,
        vocab_size=vocab,
    )
    model = LlamaForCausalLM(cfg).eval()
    hd = d // h
    per_layer = 2 * seq * d * d + 2 * seq * d * kvh * hd + 2 * seq * seq * d + 3 * seq * d * f
    truth = layers * per_layer + seq * d * vocab
    return model, {"input_ids": torch.randint(0, vocab, (1, seq))}, truth


def vision(name: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    size = weights.transforms().crop_size[0]
    model = torchvision.models.get_model(name, weights=None).eval()
    return model, torch.randn(1, 3, size, size), round(weights.meta["_ops"] * 1e9)


def call(model: torch.nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def count_nnslim(model, inputs, fast: bool = False):
    return nnslim.profile(model, inputs, memory=False, fast=fast).macs


def count_flop_counter(model, inputs, grad: bool):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as fc:
        call(model, inputs)
    return fc.get_total_flops() // 2


def count_fvcore(model, inputs):
    from fvcore.nn import FlopCountAnalysis

    args = tuple(inputs.values()) if isinstance(inputs, dict) else (inputs,)
    with torch.no_grad():
        fca = FlopCountAnalysis(model, args)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        return int(fca.total())


def count_torch_pruning(model, inputs):
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model, inputs)
    return int(macs)


TOOLS = {
    "nnslim": count_nnslim,
    "nnslim (fast=True)": lambda m, x: count_nnslim(m, x, fast=True),
    "FlopCounterMode (grad)": lambda m, x: count_flop_counter(m, x, True),
    "FlopCounterMode (no_grad)": lambda m, x: count_flop_counter(m, x, False),
    "fvcore": count_fvcore,
    "torch-pruning": count_torch_pruning,
}


def forward_time(model: torch.nn.Module, inputs: Any) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        call(model, inputs)
        return time.perf_counter() - t0


def run(models: dict[str, Any], repeat: int) -> list[dict[str, Any]]:
    records = []
    for name, build in models.items():
        model, inputs, truth = build()
        with torch.no_grad():
            median_time(lambda: call(model, inputs), repeat=3)  # warm-up
        for tool, fn in TOOLS.items():
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    # the forward is timed in turns with the tool, so that a change in the
                    # machine's speed during the run moves both
                    times, forwards = [], []
                    for _ in range(repeat):
                        forwards.append(forward_time(model, inputs))
                        t0 = time.perf_counter()
                        macs = fn(model, inputs)
                        times.append(time.perf_counter() - t0)
                    elapsed = statistics.median(times)
                    fwd = statistics.median(forwards)
                err = (macs - truth) / truth
                records.append(
                    {
                        "model": name,
                        "tool": tool,
                        "gmacs": macs / 1e9,
                        "truth_gmacs": truth / 1e9,
                        "error": err,
                        "seconds": elapsed,
                        "forward_seconds": fwd,
                    }
                )
            except Exception as e:  # a peer that fails is a result too
                records.append(
                    {"model": name, "tool": tool, "failed": f"{type(e).__name__}: {e}"[:120]}
                )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per tool (median)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models: dict[str, Any] = {
        "mobilenet_v3_small": lambda: vision("mobilenet_v3_small"),
        "gpt2-tiny (seq %d)" % args.seq: lambda: gpt2(args.seq),
        "llama-tiny-gqa (seq %d)" % args.seq: lambda: llama(args.seq),
    }
    if not args.quick:
        models = {
            "resnet50": lambda: vision("resnet50"),
            "vit_b_16": lambda: vision("vit_b_16"),
            **models,
        }
    records = run(models, args.repeat)
    rows = []
    for r in records:
        if "failed" in r:
            rows.append([r["model"], r["tool"], "failed", "-", r["failed"][:50]])
            continue
        rows.append(
            [
                r["model"],
                r["tool"],
                f"{r['gmacs']:.4f}",
                f"{100 * r['error']:+.2f}%",
                f"{r['seconds']:.2f} s ({r['seconds'] / r['forward_seconds']:.1f}x fwd)",
            ]
        )
    print_table(["model", "tool", "GMACs", "error vs truth", "time"], rows, title="MAC counts")
    path = write_json("profiler", {"records": records})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
