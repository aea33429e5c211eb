import pytest
import torch
from torch import nn

from nnslim.core.snapshot import Snapshot
from nnslim.testing import model_state
from nnslim.testing.checks import _assert_same_state
from tests.models import TinyCNN


class WithConfig(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"to_dict": lambda self: dict(vars(self))})()
        self.config.hidden = 8
        self.num_heads = 2
        self.lin = nn.Linear(4, 4)


def test_restores_replaced_modules_params_and_attributes():
    m = TinyCNN()
    before = model_state(m)
    snap = Snapshot(m, copy_tensors=False)
    m.conv1 = nn.Conv2d(3, 2, 1)
    m.fc.weight = nn.Parameter(torch.zeros(1))
    m.bn1.running_mean = torch.ones(8)
    m.new_attr = 3
    del m.pool
    snap.restore()
    _assert_same_state(before, model_state(m), "after restore")


def test_restores_in_place_writes_when_copying():
    m = TinyCNN()
    before = model_state(m)
    snap = Snapshot(m, copy_tensors=True)
    with torch.no_grad():
        m.conv1.weight.add_(1)
        m.bn1.running_var.mul_(3)
    snap.restore()
    _assert_same_state(before, model_state(m), "after restore")


def test_in_place_write_without_copy_is_detected():
    m = TinyCNN()
    snap = Snapshot(m, copy_tensors=False)
    with torch.no_grad():
        m.conv1.weight.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        snap.restore()


def test_restores_data_swaps_and_config_objects():
    m = WithConfig()
    before = model_state(m)
    snap = Snapshot(m, copy_tensors=False)
    m.lin.weight.data = torch.zeros(2, 2)
    m.config.hidden = 4
    m.num_heads = 1
    snap.restore()
    assert m.config.hidden == 8
    _assert_same_state(before, model_state(m), "after restore")
