"""Quantization side by side: latency, size and output error, in one run.

Models: a 4-layer 4096x4096 MLP (batch 1 and 32) and a Llama-shaped model from config. Rows:
fp32, bf16, torch.ao ``quantize_dynamic`` (the peer; deprecated), torchao int8 (peer, where it
runs), and each nnslim scheme. Latency is the median of repeated runs after warm-up, on one
thread and on the default thread count, reported as a ratio to fp32 in the same run. Size is
the bytes of the Linear weights (scales included). Error is the relative L2 error of the output
against fp32 on random inputs (Gaussian weights for the MLP).

    python benchmarks/quantize.py            # writes benchmarks/results/quantize.json
    python benchmarks/quantize.py --quick    # 1024-wide MLP, smaller Llama
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from _common import print_table, write_json
from torch import nn

import nnslim
from nnslim.base.inputs import as_inputs, first_tensor
from nnslim.profiling import measure_latency


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        lin = nn.Linear(width, width)
        nn.init.normal_(lin.weight, std=width**-0.5)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def llama(quick: bool) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=512 if quick else 1024,
        intermediate_size=1408 if quick else 2816,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8000,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights of Linear-like layers (packed storage and scales included).

    The LM head is left out for every variant: nnslim keeps it in float by default while the
    torch.ao peer quantizes it, and counting it would compare different things.
    """
    total = 0
    for path, m in model.named_modules():
        if path.split(".")[-1] == "lm_head":
            continue
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        info = getattr(m, "nnslim_weight_buffers", None)
        if callable(info):
            total += sum(m._buffers[n].numel() * m._buffers[n].element_size() for n in info())
        if hasattr(m, "_packed_params") and hasattr(m, "weight") and callable(m.weight):
            w = m.weight()
            total += (
                w.int_repr().numel() + w.q_per_channel_scales().numel() * 8
                if w.qscheme() != torch.per_tensor_affine
                else w.int_repr().numel() + 8
            )
    return total


def variants(base: nn.Module, calib) -> dict:
    out = {"fp32": lambda: base}

    def bf16():
        return copy.deepcopy(base).to(torch.bfloat16)

    def ao_dynamic():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8
            )

    def torchao_int8():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        m = copy.deepcopy(base)
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
        return m

    def ours(**kw):
        def build():
            m = copy.deepcopy(base)
            nnslim.Quantize(**kw).apply(
                m, calibration=calib if kw.get("method") == "gptq" else None
            )
            return m

        return build

    out.update(
        {
            "bf16": bf16,
            "torch.ao quantize_dynamic (peer)": ao_dynamic,
            "torchao int8-dynamic (peer, eager)": torchao_int8,
            "nnslim int8": ours(scheme="int8"),
            "nnslim int8-dynamic": ours(scheme="int8-dynamic"),
            "nnslim int4 g128": ours(scheme="int4", group_size=128),
        }
    )
    return out


def run_case(name: str, base: nn.Module, x, calib, repeat: int) -> list[dict]:
    inputs = as_inputs(x)
    with torch.no_grad():
        ref = first_tensor(inputs.call(base)).float()
    rows = []
    fp32_ms = {}
    for label, build in variants(base, calib).items():
        try:
            model = build()
            xin = inputs
            if label == "bf16":
                xin = (
                    as_inputs({k: v for k, v in inputs.kwargs.items()})
                    if inputs.kwargs
                    else as_inputs(x.to(torch.bfloat16))
                )
            with torch.no_grad():
                out = first_tensor(xin.call(model)).float()
            err = float((out - ref).norm() / ref.norm())
            lat = {}
            for threads in (1, None):
                lat[threads] = measure_latency(
                    model, xin, warmup=2, repeat=repeat, threads=threads
                ).median_ms
            if label == "fp32":
                fp32_ms = dict(lat)
            rows.append(
                {
                    "case": name,
                    "variant": label,
                    "latency_ms_1": lat[1],
                    "latency_ms_default": lat[None],
                    "speedup_1": fp32_ms[1] / lat[1],
                    "speedup_default": fp32_ms[None] / lat[None],
                    "linear_bytes": linear_bytes(model),
                    "rel_error": err,
                }
            )
        except Exception as e:  # peers that do not run here are a result too
            rows.append(
                {"case": name, "variant": label, "failed": f"{type(e).__name__}: {e}"[:100]}
            )
    return rows


def layer_errors(width: int) -> list[dict]:
    """Relative output error of one ``width x width`` Linear (Gaussian weights, 32 inputs): the
    per-layer figure the error goals are stated for (errors compound through the MLP's 4)."""
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(width, width)).eval()
    nn.init.normal_(base[0].weight, std=width**-0.5)
    x = torch.randn(32, width)
    with torch.no_grad():
        ref = base(x)
    rows = []
    for label, build in variants(base, [torch.randn(32, width)]).items():
        if label == "fp32" or "torchao" in label:
            continue
        model = build()
        with torch.no_grad():
            xin = x.to(torch.bfloat16) if label == "bf16" else x
            out = model(xin).float()
        err = float((out - ref).norm() / ref.norm())
        rows.append({"case": f"one Linear {width}x{width}", "variant": label, "rel_error": err})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    width = 1024 if args.quick else 4096
    repeat = 5 if args.quick else 15
    records = []
    base = mlp(width)
    calib = [torch.randn(32, width) for _ in range(2)]
    for bs in (1, 32):
        records += run_case(f"MLP 4x{width} bs{bs}", base, torch.randn(bs, width), calib, repeat)
    lm = llama(args.quick)
    ids = {"input_ids": torch.randint(0, 8000, (1, 128))}
    records += run_case("Llama-shaped seq128", lm, ids, None, repeat)
    table = []
    for r in records:
        if "failed" in r:
            table.append([r["case"], r["variant"], "failed", "", "", "", r["failed"][:40]])
            continue
        fp = next(x for x in records if x["case"] == r["case"] and x["variant"] == "fp32")
        table.append(
            [
                r["case"],
                r["variant"],
                f"{r['latency_ms_1']:.2f} ({r['speedup_1']:.2f}x)",
                f"{r['latency_ms_default']:.2f} ({r['speedup_default']:.2f}x)",
                f"{r['linear_bytes'] / 2**20:.1f} MiB",
                f"{fp['linear_bytes'] / max(r['linear_bytes'], 1):.2f}x",
                f"{100 * r['rel_error']:.2f}%",
            ]
        )
    print_table(
        [
            "case",
            "variant",
            "ms 1 thread (speedup)",
            "ms default threads (speedup)",
            "Linear weights",
            "smaller",
            "rel. error",
        ],
        table,
        title="Quantize: latency vs fp32 (same run), size, output error",
    )
    per_layer = layer_errors(width)
    print_table(
        ["case", "variant", "rel. error"],
        [[r["case"], r["variant"], f"{100 * r['rel_error']:.2f}%"] for r in per_layer],
        title="Quantize: output error of one layer",
    )
    path = write_json(
        "quantize" + ("-quick" if args.quick else ""),
        {"records": records, "layer_errors": per_layer},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
