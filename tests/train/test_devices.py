"""The Trainer's device-dependent parts, checked without a GPU: autocast follows the model's
device, NCCL processes each take their own GPU, CUDA random state is saved where it exists."""

import torch
from torch import nn

from nnslim.base import distributed
from nnslim.train.checkpoint import rng_state, set_rng_state
from nnslim.train.trainer import _device_type


def test_autocast_device_is_the_models():
    assert _device_type(nn.Linear(2, 2)) == "cpu"
    assert _device_type(nn.Linear(2, 2, device="meta")) == "meta"
    assert _device_type(nn.ReLU()) == "cpu"


def test_rng_state_round_trips_and_old_checkpoints_without_cuda_state_load():
    state = rng_state()
    if not torch.cuda.is_available():
        assert "cuda" not in state
    a = torch.rand(3)
    set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    set_rng_state({k: v for k, v in state.items() if k != "cuda"})  # a CPU-run checkpoint
    assert torch.equal(torch.rand(3), a)


def test_each_nccl_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    import torch.distributed as dist

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda backend: calls.setdefault("backend", backend)
    )
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "_started_here", True)  # no exit hook from a test
    assert distributed.rank_world() == (1, 2)
    assert calls == {"device": 1, "backend": "nccl"}
