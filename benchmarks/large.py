"""Large models: compress a Llama-shaped checkpoint that does not fit the memory budget.

Generates a Llama-shaped checkpoint with random weights (one safetensors shard per layer,
written layer by layer, never held whole) into a temporary folder, then compresses it with
int4 GPTQ through ``nnslim.compress_checkpoint`` in a child process, and reports the child's
peak resident memory and the time per block. Also plans (trace + groups) the pruning of a
32-layer Llama-7B-shaped model on the ``meta`` device.

    python benchmarks/large.py --size-gb 12   # the recorded run: about 12 GB of fp32 weights
    python benchmarks/large.py --quick        # about 1 GB

The free disk space is checked first (the checkpoint, plus about a fifth of it for the output).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import print_table, write_json
from prune import plan_7b


def config_for(size_gb: float):
    import transformers

    # 7B-like widths; the number of layers sets the size
    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter  # q,k,v,o (MHA) + gate,up,down
    fixed = 2 * vocab * hidden
    layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    if size_gb < 3:  # smaller widths for quick runs
        hidden, inter, vocab = 2048, 5504, 32000
        per_layer = 4 * hidden * hidden + 3 * hidden * inter
        fixed = 2 * vocab * hidden
        layers = max(1, round((size_gb * 2**30 / 4 - fixed) / per_layer))
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def generate(cfg, root: Path) -> int:
    """Write a random checkpoint shard by shard; returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    root.mkdir(parents=True)
    cfg.save_pretrained(root)
    with torch.device("meta"):
        shapes = {
            k: (tuple(v.shape), v.dtype) for k, v in LlamaForCausalLM(cfg).state_dict().items()
        }
    groups: dict[str, dict] = {}
    for k, (shape, dtype) in shapes.items():
        parts = k.split(".")
        g = ".".join(parts[:3]) if k.startswith("model.layers.") else "rest"
        groups.setdefault(g, {})[k] = (shape, dtype)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, entries in enumerate(groups.values()):
        tensors = {}
        for k, (shape, dtype) in entries.items():
            if k.endswith("norm.weight"):
                tensors[k] = torch.ones(shape, dtype=dtype)
            else:
                tensors[k] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def child(src: str, out: str, batches: int, seq: int) -> None:
    import nnslim

    calib = [
        {"input_ids": torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(s))}
        for s in range(batches)
    ]
    t = nnslim.Quantize(scheme="int4", group_size=128, method="gptq")
    report = nnslim.compress_checkpoint(src, out, t, calib, progress=True)
    print(
        json.dumps(
            {
                "notes": report.notes,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=12.0)
    parser.add_argument("--quick", action="store_true", help="about 1 GB")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--dir", default=None, help="where to put the checkpoints (default: a temp dir)"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batches, args.seq)
        return
    size = 1.0 if args.quick else args.size_gb
    cfg = config_for(size)
    work = Path(tempfile.mkdtemp(prefix="nnslim-large-", dir=args.dir))
    free = shutil.disk_usage(work).free
    need = int(size * 2**30 * 1.25)
    if free < need:
        print(f"skipped: {free / 2**30:.1f} GB free in {work}, {need / 2**30:.1f} GB needed")
        shutil.rmtree(work)
        sys.exit(0)
    try:
        t0 = time.perf_counter()
        total = generate(cfg, work / "src")
        gen_s = time.perf_counter() - t0
        print(
            f"generated {total / 2**30:.2f} GB ({cfg.num_hidden_layers} layers, width {cfg.hidden_size}) in {gen_s:.0f} s",
            flush=True,
        )
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(work / "src"),
                str(work / "out"),
                "--batches",
                str(args.batches),
                "--seq",
                str(args.seq),
            ],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            sys.exit(1)
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        out_size = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plan = plan_7b()["seconds"]  # the same planning run as benchmarks/prune.py
    rows = [
        [
            "checkpoint (fp32)",
            f"{total / 2**30:.2f} GB, {cfg.num_hidden_layers} layers x {cfg.hidden_size} wide",
        ],
        [
            "compressed (int4 GPTQ g128)",
            f"{out_size / 2**30:.2f} GB ({total / out_size:.1f}x smaller)",
        ],
        ["peak resident memory", f"{peak / 1024:.2f} GB"],
        [
            "time",
            f"{seconds:.0f} s ({seconds / cfg.num_hidden_layers:.1f} s per block, {args.batches} x {args.seq} calibration tokens)",
        ],
        ["plan 32-layer Llama-7B on meta", f"{plan:.1f} s"],
    ]
    print_table(["", ""], rows, title="compress_checkpoint, block by block")
    path = write_json(
        "large" + ("-quick" if args.quick else ""),
        {
            "size_bytes": total,
            "output_bytes": out_size,
            "peak_rss_mb": peak,
            "seconds": seconds,
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "child_notes": info["notes"],
            "plan_7b_seconds": plan,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
