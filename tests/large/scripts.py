"""Subprocess entry points for the streaming tests (torchrun)."""

import sys

import torch

import nnslim


def main(src: str, out: str) -> None:
    torch.set_num_threads(1)
    calib = [
        {"input_ids": torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(s))}
        for s in range(4)
    ]
    nnslim.compress_checkpoint(
        src,
        out,
        nnslim.Quantize(scheme="int4", group_size=32, method="gptq"),
        calib,
        progress=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
