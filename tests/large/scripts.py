"""Subprocess entry points for the streaming tests (torchrun)."""

import sys

import torch

import nnslim


def main(src: str, out: str, what: str = "gptq") -> None:
    torch.set_num_threads(1)
    calib = [
        {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(s))}
        for s in range(4)
    ]
    transform = (
        nnslim.Quantize(scheme="int4", group_size=32, method="gptq")
        if what == "gptq"
        else nnslim.Auto(target={"bytes": 0.45}, candidates=("int8", "int4-g64", "int4-g32"))
    )
    nnslim.compress_checkpoint(src, out, transform, calib, progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
