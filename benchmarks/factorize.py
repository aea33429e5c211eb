"""Factorize: MACs, parameters and CPU latency before/after, and output error plain vs aware.

* resnet50: Tucker-2 on the 3x3 convolutions (``select="re:.*conv2$"``);
* a BERT-shaped and a Llama-shaped model from config: SVD on every Linear except the LM head,
  plain and activation-aware (whitened with calibration on random token batches; the
  real-text comparison lives in the real-data benchmarks).

Each at 50% and 70% of the factorized layers' parameters kept. Latency: median, one thread,
same run, as a ratio to the original.

    python benchmarks/factorize.py           # writes benchmarks/results/factorize.json
    python benchmarks/factorize.py --quick
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from _common import print_table, write_json

import nnslim
from nnslim.base.inputs import as_inputs, first_tensor
from nnslim.profiling import measure_latency


def ids(seed: int) -> dict[str, torch.Tensor]:
    """A batch of random token ids (2 x 128)."""
    return {
        "input_ids": torch.randint(0, 8000, (2, 128), generator=torch.Generator().manual_seed(seed))
    }


def resnet50(quick):
    import torchvision

    m = torchvision.models.resnet50(weights=None).eval()
    s = 128 if quick else 224
    return m, torch.randn(1, 3, s, s), None, "re:.*conv2$"


def bert(quick):
    import transformers

    torch.manual_seed(0)
    d = 256 if quick else 512
    cfg = transformers.BertConfig(
        hidden_size=d,
        num_hidden_layers=4,
        num_attention_heads=8,
        intermediate_size=4 * d,
        vocab_size=8000,
    )
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    return m, ids(99), [ids(s) for s in range(4)], torch.nn.Linear


def llama(quick):
    import transformers

    torch.manual_seed(0)
    d = 256 if quick else 512
    cfg = transformers.LlamaConfig(
        hidden_size=d,
        intermediate_size=int(2.75 * d),
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
    )
    m = transformers.LlamaForCausalLM(cfg).eval()
    return m, ids(99), [ids(s) for s in range(4)], "re:model\\.layers\\..*"


def run(name, build, quick):
    base, x, calib, select = build(quick)
    inputs = as_inputs(x)
    with torch.no_grad():
        ref = first_tensor(inputs.call(base)).float()
    rows = []
    base_lat = measure_latency(base, inputs, repeat=5 if quick else 10, threads=1).median_ms
    variants = [(False, r) for r in (0.5, 0.7)]
    if calib is not None:
        variants += [(True, r) for r in (0.5, 0.7)]
    for aware, ratio in variants:
        m = copy.deepcopy(base)
        report = nnslim.Factorize(ratio=ratio, select=select, activation_aware=aware).apply(
            m, x, calibration=calib if aware else None
        )
        with torch.no_grad():
            out = first_tensor(inputs.call(m)).float()
        lat = measure_latency(m, inputs, repeat=5 if quick else 10, threads=1).median_ms
        rows.append(
            {
                "model": name,
                "ratio": ratio,
                "activation_aware": aware,
                "layers": len(report.changes),
                "macs_ratio": report.after.macs / report.before.macs,
                "params_ratio": report.after.params / report.before.params,
                "latency_ratio": lat / base_lat,
                "rel_error": float((out - ref).norm() / ref.norm()),
            }
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    records = []
    for name, build in (
        ("resnet50 (Tucker-2, 3x3 convs)", resnet50),
        ("BERT-shaped", bert),
        ("Llama-shaped", llama),
    ):
        records += run(name, build, args.quick)
    print_table(
        [
            "model",
            "params kept (layers)",
            "aware",
            "factorized",
            "MACs ratio",
            "params ratio",
            "latency ratio (1 thread)",
            "latency / MACs",
            "output error",
        ],
        [
            [
                r["model"],
                r["ratio"],
                "yes" if r["activation_aware"] else "no",
                r["layers"],
                f"{r['macs_ratio']:.3f}",
                f"{r['params_ratio']:.3f}",
                f"{r['latency_ratio']:.3f}",
                f"{r['latency_ratio'] / r['macs_ratio']:.2f}",
                f"{100 * r['rel_error']:.1f}%",
            ]
            for r in records
        ],
        title="Factorize",
    )
    print(
        f"wrote {write_json('factorize' + ('-quick' if args.quick else ''), {'records': records})}"
    )


if __name__ == "__main__":
    main()
