"""The torchrun process group, joined once and left cleanly.

The Trainer and the streaming compressor both run under ``torchrun``. Whichever of them
starts the process group also ends it when the interpreter exits: a gloo group left to
the C++ destructors at exit aborts the process now and then (``terminate called without an
active exception``) after all the work is done, and torchrun reports the run as failed.
Before the group ends, unreachable objects are collected: FSDP's sharded copy of a model sits
in reference cycles that hold the group's pending work handles, and left to the interpreter's
last collection they are destroyed while it tears its modules down (the abort above, seen
once in CI on an FSDP run). A group the user started is the user's to end.
"""

from __future__ import annotations

import atexit
import gc
import os

import torch

__all__ = ["rank_world"]

_started_here = False


def rank_world(backend: str | None = None) -> tuple[int, int]:
    """``(rank, world size)``; under torchrun (``WORLD_SIZE`` > 1) joins the process group.

    ``backend`` defaults to NCCL where CUDA is available and gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # one GPU per process: torchrun's LOCAL_RANK (else all share GPU 0)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        global _started_here
        if not _started_here:
            _started_here = True
            atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size()


def _leave() -> None:
    """Destroy the group nnslim started (registered at exit; a no-op if already gone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # FSDP's cycles (and the work handles they hold) go while all is alive
        dist.destroy_process_group()
