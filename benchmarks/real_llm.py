"""Table 3: SmolLM2-135M-Instruct perplexity on Wikipedia text after compression.

Rows: fp32; int8; int4 round-to-nearest vs GPTQ (group 64: the model's width 576 is not a
multiple of 128); 50% unstructured magnitude, Wanda, SparseGPT, each of the last two also with
OWL's per-block ratios; 2:4 Wanda vs SparseGPT; Factorize at 80% of the MLP/attention
parameters, plain vs activation-aware. Perplexity (``nnslim.evaluate``): fixed windows of 512
tokens with BOS, on the Wikipedia articles shipped in the gensim wheel (cleaned with gensim's
wiki filter); calibration on other windows of the same text.

Published anchors on LLaMA-2-7B (WikiText-2): dense 5.12, magnitude 50% 14.89, Wanda 50% 6.42,
SparseGPT 6.51, 2:4 SparseGPT 10.17; OWL at 70% 24.55 where uniform Wanda gives 85.77 (LLaMA-7B);
GPTQ 4-bit stays within a few percent of fp16 while RTN does not at 3 bits.

    python benchmarks/real_llm.py            # 32 eval windows, 16 calibration windows
    python benchmarks/real_llm.py --quick    # 2 eval windows, 2 calibration windows
    python benchmarks/real_llm.py --only "50%,2:4"   # fp32 and the sparsity rows
    python benchmarks/real_llm.py --recover 200 --only "50% unstructured Wanda,2:4 SparseGPT"

``--only`` takes comma-separated texts (semicolon-separated when one has a comma): a variant
whose name contains one runs (a text equal to a variant's whole name selects that variant
alone). ``--recover N`` fine-tunes each pruned or
factorized row afterwards for N steps (one window of 512 tokens each, windows after the
evaluation and calibration ones) by distillation from the uncompressed model: KL on the logits
at temperature 1 plus the relative error of every block's output (``Distillation.for_blocks``),
AdamW with a cosine schedule: the recovery recipe of docs/training.rst.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from typing import Any

import real_data as rd
import torch
from _common import print_table, write_json

import nnslim
from nnslim.evaluate import token_windows

WINDOW = 512


def smollm2_windows(n_eval: int, n_cal: int) -> tuple[Any, list[torch.Tensor], list[dict]]:
    """SmolLM2-135M, ``n_eval`` evaluation windows (``nnslim.evaluate.token_windows``: BOS +
    511 tokens each) and ``n_cal`` calibration batches after them from the Wikipedia text;
    exits cleanly (printing what is missing) without the packages."""
    loaded = rd.smollm2()
    text = rd.wiki_text()
    if loaded is None or text is None:
        print(f"skipped: {rd.MISSING}")
        sys.exit(0)
    base, tok = loaded
    evals = token_windows(tok, text, length=WINDOW, count=n_eval)
    cal = token_windows(tok, text, length=WINDOW, count=n_cal, offset=n_eval)
    return base, evals, [{"input_ids": w} for w in cal]


def train_windows(count: int, offset: int) -> list[dict]:
    """``count`` windows of the same text from window ``offset`` on, as training batches."""
    loaded, text = rd.smollm2(), rd.wiki_text()
    assert loaded is not None and text is not None  # smollm2_windows has checked
    wins = token_windows(loaded[1], text, length=WINDOW, count=count, offset=offset)
    return [{"input_ids": w} for w in wins]


def recover(
    model,
    teacher,
    data: list[dict],
    lr: float,
    output_loss: str = "auto",
    feature_weight: float = 1.0,
) -> nnslim.TrainResult:
    """Distil ``teacher`` into the compressed ``model`` (in place): the output at temperature 1
    (``output_loss``: see :class:`nnslim.Distillation`) and every block's output (weighted by
    ``feature_weight``), one batch per AdamW step, cosine schedule, gradients clipped at 1 (the
    recipe of this benchmark and of ``real_minilm.py``)."""
    trainer = nnslim.Trainer(
        optimizer=torch.optim.AdamW,
        lr=lr,
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, len(data)),
        teacher=teacher,
        distillation=nnslim.Distillation.for_blocks(
            teacher,
            temperature=1.0,
            alpha=1.0,
            output_loss=output_loss,
            feature_weight=feature_weight,
        ),
        options=nnslim.TrainOptions(verbose=False, clip_grad_norm=1.0),
    )
    model.train()
    try:
        return trainer.fit(model, data)
    finally:
        model.eval()


def perplexity(model, wins) -> float:
    return nnslim.evaluate.perplexity(model, wins).value


def _json_name(args: argparse.Namespace) -> str:
    """``real_llm[-quick][-only-<texts>]``: a partial run does not overwrite another's."""
    name = "real_llm" + ("-quick" if args.quick else "")
    if args.recover:
        name += f"-recover{args.recover}"
    if args.only:
        slug = "".join(c if c.isalnum() else "_" for c in args.only).strip("_")
        name += f"-only-{slug}"
    return name


def _wanted(name: str, texts: list[str], names: set[str]) -> bool:
    """``name`` is one of ``texts`` or contains one that is no variant's whole name."""
    return name in texts or any(t in name and t not in names for t in texts)


def _torchao_int8_dynamic(model: torch.nn.Module) -> None:
    """torchao's int8 dynamic-activation, int8-weight quantization of the block Linears (the
    peer of nnslim's int8-dynamic; ``pip install torchao``)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(
        model,
        Int8DynamicActivationInt8WeightConfig(),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers."),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--only",
        default=None,
        help="run fp32 and the variants whose name contains one of these comma-separated texts "
        "(semicolons when a text has a comma; a whole name selects that variant alone)",
    )
    parser.add_argument(
        "--recover",
        type=int,
        default=0,
        metavar="STEPS",
        help="fine-tune each pruned or factorized row for this many distillation steps",
    )
    parser.add_argument("--recover-lr", type=float, default=2e-4)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base, evals, calib = smollm2_windows(*((2, 2) if args.quick else (32, 16)))
    training = train_windows(args.recover, len(evals) + len(calib)) if args.recover else []
    blocks = "re:model\\.layers\\..*"
    # the roots of the head groups (q_proj) and the MLP unit groups (up_proj): the residual
    # stream (rooted at o_proj/down_proj, shared with the embedding) keeps its width
    heads_and_units = "re:model\\.layers\\.\\d+\\.(self_attn\\.q_proj|mlp\\.up_proj)"
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"]} for b in calib]
    rows = []

    specs: list[tuple[tuple, dict]] = []

    def run(*a: Any, **k: Any) -> None:  # declared first, measured below
        specs.append((a, k))

    def measure(
        name: str,
        transform: nnslim.Transform | None,
        data: bool,
        extended: bool = False,
        peer: Any = None,
    ) -> None:
        wanted = (
            None
            if args.only is None
            else [t for t in args.only.split(";" if ";" in args.only else ",") if t.strip()]
        )
        changes = transform is not None or peer is not None
        if wanted is not None and changes and not _wanted(name, wanted, names):
            return
        if extended and args.quick and wanted is None:
            return  # the variants of a method: full runs (or --only) measure them
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        if transform is not None:
            # Auto's loss estimate differentiates the model's own next-token loss: the labels
            cal = labelled if isinstance(transform, nnslim.Auto) else calib
            transform.apply(m, calibration=cal if data else None)
        if peer is not None:
            peer(m)
        seconds = time.perf_counter() - t0
        ppl = perplexity(m, evals)
        row = {"variant": name, "perplexity": ppl, "seconds": seconds}
        try:
            p = nnslim.profile(m, evals[0], memory=False)
            row.update(params=p.params, param_bytes=p.param_bytes, sparsity=p.sparsity)
        except Exception as e:  # a peer's tensor subclasses the profiler does not know
            row["profile_failed"] = f"{type(e).__name__}: {e}"[:120]
        print(f"  {name}: ppl {ppl:.3f} ({seconds:.0f} s)", flush=True)
        if training and isinstance(transform, (nnslim.Prune, nnslim.Factorize, nnslim.Auto)):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            fit = recover(m, base, training, args.recover_lr)
            row.update(
                recovered=perplexity(m, evals),
                recovery_steps=fit.steps,
                recovery_tokens=fit.steps * WINDOW,
                recovery_seconds=time.perf_counter() - t0,
                recovery_lr=args.recover_lr,
                recovery_loss_first_last=[fit.losses[0], fit.losses[-1]],
                recovered_sparsity=nnslim.profile(m, evals[0], memory=False).sparsity,
            )
            print(
                f"    after {fit.steps} recovery steps: ppl {row['recovered']:.3f} "
                f"({row['recovery_seconds']:.0f} s)",
                flush=True,
            )
        rows.append(row)

    run("fp32", None, False)
    run("int8 (weight-only, RTN)", nnslim.Quantize(scheme="int8", select=blocks), False)
    run(
        "int8-dynamic (weights and activations)",
        nnslim.Quantize(scheme="int8-dynamic", select=blocks),
        False,
        extended=True,
    )
    run(
        "int8-dynamic, smooth='auto' (SmoothQuant)",
        nnslim.Quantize(scheme="int8-dynamic", smooth="auto", select=blocks),
        True,
        extended=True,
    )
    run("int8-dynamic torchao (peer)", None, False, extended=True, peer=_torchao_int8_dynamic)
    # SmolLM2's width 576 is not a multiple of 128: group size 64
    run("int4 g64 RTN", nnslim.Quantize(scheme="int4", group_size=64, select=blocks), False)
    # the GGUF file is Q4_1: 4-bit, asymmetric, groups of 32; int4 g32 lands on its own grid
    run(
        "int4 g32 RTN (the GGUF's own grid)",
        nnslim.Quantize(scheme="int4", group_size=32, select=blocks),
        False,
    )
    run(
        "int4 g64 GPTQ",
        nnslim.Quantize(scheme="int4", group_size=64, method="gptq", select=blocks),
        True,
    )
    run(
        "int4 g64 GPTQ, no act-order",
        nnslim.Quantize(
            scheme="int4", group_size=64, method="gptq", act_order=False, select=blocks
        ),
        True,
        extended=True,
    )
    run(
        "int4 g64 GPTQ, block-parallel (not true-sequential)",
        nnslim.Quantize(
            scheme="int4", group_size=64, method="gptq", true_sequential=False, select=blocks
        ),
        True,
        extended=True,
    )
    run(
        "int4 g64 GPTQ, integer zero points",
        nnslim.Quantize(
            scheme="int4", group_size=64, method="gptq", zero_point="integer", select=blocks
        ),
        True,
        extended=True,
    )
    run(
        "int4 g64 AWQ (smooth='auto') + RTN",
        nnslim.Quantize(scheme="int4", group_size=64, smooth="auto", select=blocks),
        True,
        extended=True,
    )
    run(
        "int4 g64 AWQ (smooth='auto') + GPTQ",
        nnslim.Quantize(scheme="int4", group_size=64, method="gptq", smooth="auto", select=blocks),
        True,
        extended=True,
    )
    run(
        "50% unstructured magnitude",
        nnslim.Prune(ratio=0.5, structure="unstructured", select=blocks),
        False,
    )
    run(
        "50% unstructured Wanda",
        nnslim.Prune(ratio=0.5, structure="unstructured", importance="wanda", select=blocks),
        True,
    )
    run(
        "50% unstructured Wanda + OWL",
        nnslim.Prune(
            ratio=0.5,
            structure="unstructured",
            importance="wanda",
            allocation="owl",
            select=blocks,
        ),
        True,
        extended=True,
    )
    run(
        "50% unstructured SparseGPT",
        nnslim.Prune(ratio=0.5, structure="unstructured", importance="sparsegpt", select=blocks),
        True,
        extended=True,
    )
    run(
        "50% unstructured SparseGPT + OWL",
        nnslim.Prune(
            ratio=0.5,
            structure="unstructured",
            importance="sparsegpt",
            allocation="owl",
            select=blocks,
        ),
        True,
        extended=True,
    )
    run("2:4 Wanda", nnslim.Prune(structure="2:4", importance="wanda", select=blocks), True)
    run(
        "2:4 SparseGPT",
        nnslim.Prune(structure="2:4", importance="sparsegpt", select=blocks),
        True,
        extended=True,
    )
    run(
        "Factorize 80% params, plain",
        nnslim.Factorize(ratio=0.8, select=blocks, activation_aware=False),
        False,
    )
    run("Factorize 80% params, activation-aware", nnslim.Factorize(ratio=0.8, select=blocks), True)
    run(
        "Factorize 80% params, activation-aware + refit",
        nnslim.Factorize(ratio=0.8, select=blocks, refit=True),
        True,
        extended=True,
    )
    # the same parameters (0.8417 of the model's: the ratio row's count), ranks allocated
    # across the blocks' layers by their whitened singular values (each rank's share of its
    # layer's output error per parameter) instead of 80% of every layer
    run(
        "Factorize at the 80% row's params, global ranks + refit",
        nnslim.Factorize(params=0.8417, select=blocks, refit=True),
        True,
        extended=True,
    )
    run(
        "structured 20% heads and MLP units (Wanda)",
        nnslim.Prune(ratio=0.2, importance="wanda", select=heads_and_units),
        True,
    )
    run(
        "structured 20% heads and MLP units (Wanda + refit)",
        nnslim.Prune(ratio=0.2, importance="wanda", select=heads_and_units, refit=True),
        True,
        extended=True,
    )
    # the row above keeps 0.8127 of the MACs (benchmarks/auto.py --channels measured it): Auto
    # at those MACs choosing a quarter or half of each group's heads or units, or low rank
    run(
        "Auto at structured 20%'s MACs (channels 1/4 or 1/2, rank 1/2 or 1/4)",
        nnslim.Auto(
            target={"macs": 0.8127},
            candidates=("channels-0.25", "channels-0.5", "rank-0.5", "rank-0.25"),
            select=blocks,
        ),
        True,
        extended=True,
    )
    names = {a[0] for a, _ in specs}
    for a, k in specs:
        measure(*a, **k)
    fp = rows[0]["perplexity"]
    print_table(
        ["variant", "perplexity", "vs fp32", "weight bytes", "sparsity"]
        + (["after recovery", "vs fp32", "steps"] if training else []),
        [
            [
                r["variant"],
                f"{r['perplexity']:.3f}",
                f"{r['perplexity'] / fp:.3f}x",
                f"{r['param_bytes'] / 2**20:.1f} MiB" if "param_bytes" in r else "-",
                f"{r['sparsity']:.1%}" if "sparsity" in r else "-",
            ]
            + (
                [
                    f"{r['recovered']:.3f}",
                    f"{r['recovered'] / fp:.3f}x",
                    str(r["recovery_steps"]),
                ]
                if "recovered" in r
                else ["-"] * 3
                if training
                else []
            )
            for r in rows
        ],
        title=f"SmolLM2-135M-Instruct, Wikipedia (gensim test data), {len(evals)} windows of {WINDOW} tokens",
    )
    print(
        f"wrote {write_json(_json_name(args), {'rows': rows, 'windows': len(evals), 'calibration_windows': len(calib)})}"
    )


if __name__ == "__main__":
    main()
