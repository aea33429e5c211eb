"""Table 2: all-MiniLM-L6-v2 sentence embeddings after compression.

Quality: mean cosine between each compressed embedding and the fp32 one (Wikipedia sentences
from the gensim wheel's test data), and the Spearman correlation of word-pair similarities with
the human WordSim353 scores (gensim's test data). Calibration uses other Wikipedia sentences.
Embeddings: mean pooling over tokens, L2-normalised (how the model is meant to be used).

Rows: fp32, int8-dynamic, int4 (RTN and GPTQ, group 128), ShareWeights 16/64 clusters,
Factorize at 80% of the encoder's parameters (plain and activation-aware), Prune 25% (heads
and MLP width). Goals: int8 cosine >= 0.99 and WordSim within 0.01 of fp32; int4 GPTQ
cosine >= 0.97.

Auto rows (issue 20): ``nnslim.Auto`` over the encoder's Linear layers (default candidates,
GPTQ) at half the encoder's float bytes and at uniform int4 g128's bytes, against the uniform
rows; and over the encoder and the embedding tables at half the whole model's bytes. Recovery rows (issue 19, ``--recover N``): the pruned and factorized encoders fine-tuned
for N steps (16 sentences each, sentences after the evaluation and calibration ones) by
distillation from the fp32 model: every layer's output by its relative error
(``Distillation.for_blocks``) beside the KL term on the output, AdamW, cosine schedule.

    python benchmarks/real_minilm.py           # 512 sentences
    python benchmarks/real_minilm.py --quick   # 64 sentences, 100 word pairs
    python benchmarks/real_minilm.py --recover 300 --only "Prune,Factorize"
    python benchmarks/real_minilm.py --recover 300 --recover-loss mean_cosine --only "Prune"
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import warnings

import real_data as rd
import torch
from _common import print_table, write_json
from real_llm import recover

import nnslim


def sentences(text: str, n: int, skip: int = 0) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 300]
    return parts[skip : skip + n]


def embed(model, tok, texts: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(
                texts[i : i + batch],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out)


def token_batches(tok, texts: list[str], size: int = 16) -> list[dict]:
    """``texts`` tokenized in batches of ``size`` (padded, at most 128 tokens)."""
    return [
        dict(
            tok(
                texts[i : i + size],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
        )
        for i in range(0, len(texts), size)
    ]


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        t = torch.tensor(v)
        r = torch.empty_like(t)
        r[t.argsort()] = torch.arange(len(v), dtype=t.dtype)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--recover", type=int, default=0, metavar="STEPS")
    parser.add_argument("--recover-lr", type=float, default=1e-4)
    parser.add_argument(
        "--recover-loss",
        default="auto",
        choices=["auto", "mean_cosine"],
        help="the distillation's output term: each token's relative error (auto) or the "
        "cosine of the mean-pooled sentence embeddings (mean_cosine)",
    )
    parser.add_argument(
        "--recover-features",
        type=float,
        default=1.0,
        metavar="WEIGHT",
        help="the weight of the block outputs' terms beside the output term",
    )
    parser.add_argument(
        "--only", default=None, help="fp32 and the rows whose name holds one of these texts"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    loaded, pairs, text = (
        rd.minilm(),
        rd.wordsim353(),
        rd.wiki_text(max_chars=None if args.recover else 400_000),
    )
    if loaded is None or pairs is None or text is None:
        print(f"skipped: {rd.MISSING}")
        sys.exit(0)
    base, tok = loaded
    n = 64 if args.quick else 512
    evals = sentences(text, n)
    cal_text = sentences(text, 64 if args.quick else 256, skip=n)
    calib = token_batches(tok, cal_text)
    training = token_batches(tok, sentences(text, 16 * args.recover, skip=n + len(cal_text)))
    if args.recover and len(training) < args.recover:
        print(f"  note: the text holds {len(training)} training batches, not {args.recover}")
    if args.quick:
        pairs = pairs[:100]
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    ref = embed(base, tok, evals)
    human = [s for _, _, s in pairs]
    example = calib[0]
    encoder = "re:encoder\\..*"

    def wordsim(model) -> float:
        e = dict(zip(words, embed(model, tok, words)))
        return spearman([float(e[a] @ e[b]) for a, b, _ in pairs], human)

    rows = []

    def run(name, transform, data):
        if args.only and transform is not None and not any(w in name for w in args.only.split(",")):
            return
        m = copy.deepcopy(base)
        if transform is not None:
            transform.apply(m, example, calibration=calib if data else None)
        add(name, m)
        channels = isinstance(transform, nnslim.Auto) and any(
            str(c).startswith("channels") for c in transform.candidates
        )
        if training and (isinstance(transform, (nnslim.Prune, nnslim.Factorize)) or channels):
            torch.manual_seed(0)
            fit = recover(
                m, base, training, args.recover_lr, args.recover_loss, args.recover_features
            )
            add(f"{name} + {fit.steps} steps distilled", m)

    def add(name, m):
        e = embed(m, tok, evals)
        p = nnslim.profile(m, example, memory=False)
        rows.append(
            {
                "variant": name,
                "cosine": float((e * ref).sum(-1).mean()),
                "min_cosine": float((e * ref).sum(-1).min()),
                "wordsim": wordsim(m),
                "param_bytes": p.param_bytes,
                "macs": p.macs,
            }
        )
        print(
            f"  {name}: cosine {rows[-1]['cosine']:.4f}, wordsim {rows[-1]['wordsim']:.4f}",
            flush=True,
        )

    run("fp32", None, False)
    run("int8-dynamic", nnslim.Quantize(scheme="int8-dynamic", select=encoder), False)
    run("int4 g128 RTN", nnslim.Quantize(scheme="int4", group_size=128, select=encoder), False)
    run(
        "int4 g128 GPTQ",
        nnslim.Quantize(scheme="int4", group_size=128, method="gptq", select=encoder),
        True,
    )
    run("ShareWeights 16 clusters", nnslim.ShareWeights(clusters=16, select=encoder), False)
    run("ShareWeights 64 clusters", nnslim.ShareWeights(clusters=64, select=encoder), False)
    run(
        "Factorize 80% params, plain",
        nnslim.Factorize(ratio=0.8, select=encoder, activation_aware=False),
        False,
    )
    run("Factorize 80% params, activation-aware", nnslim.Factorize(ratio=0.8, select=encoder), True)
    # each layer's second factor then refit toward the fp32 encoder's outputs, layer group
    # after layer group (left out of --quick, which the tests run)
    if not args.quick or args.only:
        run(
            "Factorize 80% params, activation-aware + refit",
            nnslim.Factorize(ratio=0.8, select=encoder, refit=True),
            True,
        )
    run("Prune 25% (heads and MLP width)", nnslim.Prune(ratio=0.25), False)
    # activation-aware channel importance (|w| times the input's norm, summed per group)
    run(
        "Prune 25% (heads and MLP width), Wanda importance",
        nnslim.Prune(ratio=0.25, importance="wanda"),
        True,
    )
    # the same channels, the layers reading them then refit by least squares to the fp32
    # encoder's outputs on the calibration sentences (left out of --quick, which the tests run)
    if not args.quick or args.only:
        run(
            "Prune 25% (heads and MLP width), Wanda + refit",
            nnslim.Prune(ratio=0.25, importance="wanda", refit=True),
            True,
        )
    # issue 19's pruned encoder, non-uniform: Auto chooses each block's heads and MLP units
    # (a quarter or half of them, or none) at the uniform 25% prune's bytes (a recovery
    # experiment: left out of --quick, which the test suite runs)
    if not args.quick and (not args.only or "Auto channels" in args.only):
        uniform = copy.deepcopy(base)
        nnslim.Prune(ratio=0.25, importance="wanda").apply(uniform, example, calibration=calib)
        share = (
            nnslim.profile(uniform, example, memory=False).param_bytes
            / nnslim.profile(base, example, memory=False).param_bytes
        )
        del uniform
        run(
            "Auto channels at uniform Prune 25%'s bytes (Wanda)",
            nnslim.Auto(
                target={"bytes": share},
                candidates=("channels-0.25", "channels-0.5"),
                select=encoder,
            ),
            True,
        )
    full = rows[0]["param_bytes"]
    linears = sum(
        sum(t.numel() * t.element_size() for t in m.parameters())
        for p, m in base.named_modules()
        if p.startswith("encoder.") and isinstance(m, torch.nn.Linear)
    )
    int4 = next((r for r in rows if r["variant"] == "int4 g128 GPTQ"), None)
    budgets = {"half the encoder's bytes": 1 - 0.5 * linears / full}
    if int4 is not None:
        budgets["uniform int4 g128's bytes"] = int4["param_bytes"] / full
    for label, fraction in budgets.items():
        run(
            f"Auto at {label} (GPTQ)",
            nnslim.Auto(target={"bytes": fraction}, method="gptq", select=encoder),
            True,
        )
    # the whole model at half its bytes: the embedding tables searched too (the word
    # embeddings are 51% of MiniLM's weights)
    run(
        "Auto at half the model's bytes, embeddings searched (GPTQ)",
        nnslim.Auto(target={"bytes": 0.5}, method="gptq", select=[encoder, "re:embeddings\\..*"]),
        True,
    )
    fp = rows[0]
    print_table(
        ["variant", "cosine to fp32 (mean / min)", "WordSim353 Spearman", "weight bytes", "MACs"],
        [
            [
                r["variant"],
                f"{r['cosine']:.4f} / {r['min_cosine']:.4f}",
                f"{r['wordsim']:.4f} ({r['wordsim'] - fp['wordsim']:+.4f})",
                f"{r['param_bytes'] / 2**20:.1f} MiB",
                f"{r['macs'] / fp['macs']:.2f}x",
            ]
            for r in rows
        ],
        title=f"all-MiniLM-L6-v2: {len(evals)} Wikipedia sentences, {len(pairs)} WordSim353 pairs",
    )
    name = "real_minilm" + ("-quick" if args.quick else "")
    name += f"-recover{args.recover}" if args.recover else ""
    name += f"-{args.recover_loss}" if args.recover and args.recover_loss != "auto" else ""
    name += (
        f"-features{args.recover_features:g}" if args.recover and args.recover_features != 1 else ""
    )
    name += "-only-" + "".join(c if c.isalnum() else "_" for c in args.only) if args.only else ""
    recipe = {
        "recovery_steps": args.recover,
        "recovery_loss": args.recover_loss,
        "feature_weight": args.recover_features,
    }
    print(f"wrote {write_json(name, {'rows': rows, **recipe})}")


if __name__ == "__main__":
    main()
