"""Issue 20's peer: NNCF's ``compress_weights`` (int4/int8 mixed precision by sensitivity) on
SmolLM2-135M, at the bytes ``auto.py`` gives nnslim's Auto (uniform int4 g64's).

    pip install nncf
    python benchmarks/peer_nncf.py            # 32 eval windows, 16 calibration windows
    python benchmarks/peer_nncf.py --quick    # 2 and 2

The same model, windows and calibration windows as ``auto.py`` and ``real_llm.py``; NNCF
compresses the transformer blocks' Linear layers (the embedding and the tied head are left
float, as in nnslim's rows: ``ignored_scope``). Rows: NNCF int4 asymmetric groups of 64
everywhere (``ratio=1``), data-free and data-aware (AWQ + scale estimation, NNCF's recipe for
LLMs), and NNCF's mixed precision: ``ratio`` of the layers in int4 g64 chosen by its
sensitivity metric (the Hessian-input-activation default), the rest int8 per channel, the
ratio set so the model's bytes do not exceed nnslim's uniform int4 g64 model's, with AWQ and
scale estimation. Bytes: the model's parameters and NNCF's buffers (packed codes, fp16
scales, packed zero points) over the fp32 model's parameter bytes, the fraction ``auto.py``
reports. Perplexity with ``nnslim.evaluate`` on NNCF's torch model (it decompresses the
weights in a hook on every forward: the exact arithmetic of its codes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from typing import Any

import torch
from _common import print_table, write_json
from real_llm import smollm2_windows

import nnslim
from nnslim.evaluate import perplexity

#: nnslim's uniform int4 g64 on the blocks (bf16 scale and minimum per group: 4.5 bits a
#: weight) as a fraction of the fp32 model's bytes, measured by ``auto.py`` (results/auto.json)
NNSLIM_INT4_G64 = 0.32172
#: NNCF's bits per weight: int4 g64 asymmetric (4 + a 16-bit scale and a 4-bit zero point per
#: 64) and int8 per output channel (8 + a scale and a zero point per row: ~8)
NNCF_INT4_BITS, NNCF_INT8_BITS = 4 + 20 / 64, 8.0


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, each storage once (NNCF's packed codes
    are the Linear's weight, its scales and zero points buffers of its hooks)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def compress(base: torch.nn.Module, calib: list[dict] | None, **options: Any) -> torch.nn.Module:
    import nncf

    m = copy.deepcopy(base)
    dataset = (
        None if calib is None else nncf.Dataset([{"input_ids": b["input_ids"]} for b in calib])
    )
    return nncf.compress_weights(
        m,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        group_size=64,
        dataset=dataset,
        ignored_scope=nncf.IgnoredScope(patterns=[".*embed_tokens.*", ".*lm_head.*"]),
        **options,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    try:
        import nncf
    except ImportError:
        print("skipped: pip install nncf")
        sys.exit(0)
    torch.manual_seed(0)
    base, evals, calib = smollm2_windows(*((2, 2) if args.quick else (32, 16)))
    full = nnslim.profile(base, calib[0], memory=False).param_bytes
    fp32_bytes = model_bytes(base)
    blocks = sum(
        m.weight.numel()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    )
    # the ratio whose bytes meet nnslim's int4 g64 (float parts as in the fp32 model)
    budget_bits = (NNSLIM_INT4_G64 * full - (fp32_bytes - 4 * blocks)) * 8 / blocks
    ratio = (NNCF_INT8_BITS - budget_bits) / (NNCF_INT8_BITS - NNCF_INT4_BITS)
    ratio = min(1.0, max(0.0, ratio))
    print(f"  NNCF mixed ratio for {NNSLIM_INT4_G64:.4f} of the bytes: {ratio:.3f}")
    rows = []

    def row(name: str, make) -> None:
        t0 = time.perf_counter()
        try:
            m = make()
        except Exception as e:  # the peer failing is a result too
            rows.append({"variant": name, "failed": f"{type(e).__name__}: {e}"[:300]})
            print(f"  {name}: failed: {rows[-1]['failed']}", flush=True)
            return
        seconds = time.perf_counter() - t0
        ppl = perplexity(m, evals).value
        rows.append(
            {
                "variant": name,
                "perplexity": ppl,
                "bytes_fraction": model_bytes(m) / fp32_bytes,
                "seconds": seconds,
            }
        )
        print(f"  {name}: ppl {ppl:.3f} bytes {rows[-1]['bytes_fraction']:.4f} ({seconds:.0f} s)")

    row("fp32", lambda: base)
    # NNCF traces a torch model on the dataset's first element: given, but with no data-aware
    # option this row rounds to nearest
    row("NNCF int4 g64 asym, ratio 1, round to nearest", lambda: compress(base, calib, ratio=1.0))
    row(
        "NNCF int4 g64 asym, ratio 1, AWQ + scale estimation",
        lambda: compress(base, calib, ratio=1.0, awq=True, scale_estimation=True),
    )
    row(
        f"NNCF mixed int4 g64 / int8, ratio {ratio:.2f}, AWQ + scale estimation",
        lambda: compress(base, calib, ratio=ratio, awq=True, scale_estimation=True),
    )
    row(
        f"NNCF mixed int4 g64 / int8, ratio {ratio:.2f}, GPTQ + scale estimation",
        lambda: compress(base, calib, ratio=ratio, gptq=True, scale_estimation=True),
    )
    fp = rows[0]["perplexity"]
    print_table(
        ["variant", "perplexity", "vs fp32", "bytes", "seconds"],
        [
            [
                r["variant"],
                f"{r['perplexity']:.3f}" if "perplexity" in r else r["failed"][:60],
                f"{r['perplexity'] / fp - 1:+.1%}" if "perplexity" in r else "",
                f"{r['bytes_fraction']:.4f}" if "bytes_fraction" in r else "",
                f"{r['seconds']:.0f}" if "seconds" in r else "",
            ]
            for r in rows
        ],
        title=f"SmolLM2-135M-Instruct, NNCF {nncf.__version__} compress_weights, "
        f"{evals.describe()}",
    )
    name = "peer_nncf" + ("-quick" if args.quick else "")
    print(f"wrote {write_json(name, {'rows': rows, 'ratio': ratio, 'nncf': nncf.__version__})}")


if __name__ == "__main__":
    main()
