import pytest
import torch
from torch import nn

from nnslim.base.snapshot import Snapshot
from nnslim.testing import assert_same_state, model_state
from tests.zoo import TinyCNN


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
    assert_same_state(before, model_state(m), "after restore")


def test_restores_in_place_writes_when_copying():
    m = TinyCNN()
    before = model_state(m)
    snap = Snapshot(m, copy_tensors=True)
    with torch.no_grad():
        m.conv1.weight.add_(1)
        m.bn1.running_var.mul_(3)
    snap.restore()
    assert_same_state(before, model_state(m), "after restore")


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
    assert_same_state(before, model_state(m), "after restore")


def test_replace_module_frees_old_weights_only_without_rollback():
    from nnslim.base.modules import replace_module
    from nnslim.base.snapshot import no_rollback, rollback_enabled

    shared = nn.Linear(4, 4)
    m = nn.Sequential(nn.Linear(4, 4), shared, shared)
    first = m[0]
    replace_module(m, "0", nn.Linear(4, 4))  # rollback on: nothing is freed
    assert first.weight.shape == (4, 4)
    assert rollback_enabled()
    with no_rollback():
        assert not rollback_enabled()
        old = m[0]
        keep_bias = nn.Linear(4, 4)
        keep_bias.bias = old.bias  # the new module reuses the old bias: kept
        replace_module(m, "0", keep_bias)
        assert old.weight.numel() == 0 and old.bias.shape == (4,)
        new = nn.Linear(4, 4)
        replace_module(m, "1", new)  # one layer used at "1" and "2": replaced at both
        assert m[1] is new and m[2] is new
        assert shared.weight.numel() == 0
    assert rollback_enabled()


@pytest.mark.parametrize("which", ["gptq", "factorize", "share"])
def test_transforms_without_rollback_give_the_same_model_and_record(which):
    import nnslim
    from nnslim.base.snapshot import no_rollback
    from nnslim.core.transform import RECORD_ATTR

    torch.manual_seed(0)
    x = torch.randn(16, 32)
    t = {
        "gptq": nnslim.Quantize(scheme="int4", group_size=32, method="gptq"),
        "factorize": nnslim.Factorize(rank=8),
        "share": nnslim.ShareWeights(clusters=8),
    }[which]

    def build():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))

    a, b = build(), build()
    originals = [b[0].weight, b[2].weight]
    t.apply(a, x, calibration=[x])
    with no_rollback():
        t.apply(b, x, calibration=[x])
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert [w.numel() for w in originals] == [0, 0]  # released as they were replaced
    assert a.__dict__[RECORD_ATTR]["entries"] == b.__dict__[RECORD_ATTR]["entries"]


def test_one_snapshot_restores_again_after_each_new_attempt():
    """Prune retries and restores the same snapshot after every attempt: a config written in
    place (Phi-4-multimodal's head counts) and a weight written in place on the second attempt
    must come back as on the first (the restore used to hand the snapshot's own copies to the
    model, so the second attempt wrote into them)."""
    m = WithConfig()
    m.child = WithConfig()
    m.child.config = m.config  # one config shared by two modules stays shared
    before = model_state(m)
    snap = Snapshot(m, copy_tensors=True)
    for attempt in range(3):
        m.config.hidden = 100 + attempt
        m.num_heads = 7
        with torch.no_grad():
            m.lin.weight.add_(1)
        snap.restore()
        assert m.config.hidden == 8 and m.child.config is m.config
        assert_same_state(before, model_state(m), f"after restore {attempt}")


def test_preserve_modes_gives_each_module_its_own_flag_back():
    from nnslim.base.snapshot import preserve_modes

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    model.train()
    model[1].eval()  # a BatchNorm frozen for fine-tuning
    with preserve_modes(model):
        model.eval()
    assert [m.training for m in model] == [True, False, True] and model.training
    with preserve_modes(model):
        model.train()
    assert not model[1].training
