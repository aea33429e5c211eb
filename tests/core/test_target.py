"""``Target``: the one budget type behind Prune/Factorize ``macs=``/``params=`` and compress."""

import pytest
import torch
from torch import nn

import nnslim
from nnslim import Factorize, Prune, Target


def test_parse_resolves_aliases_and_checks():
    assert Target.parse("compress", {"macs": 0.5, "bytes": 0.25}) == (
        Target("macs", 0.5),
        Target("param_bytes", 0.25),
    )
    assert Target.parse("compress", {"latency": 1}) == (Target("latency_ms", 1.0),)
    t = Target("params", 0.3)
    assert Target.parse("compress", t) == (t,)
    assert Target.parse("compress", [t]) == (t,)
    with pytest.raises(ValueError, match=r"compress\(target=...\): unknown key 'flops'"):
        Target.parse("compress", {"flops": 0.5})
    with pytest.raises(ValueError, match="expected a dict"):
        Target.parse("compress", {})
    with pytest.raises(ValueError, match=r"target\['macs'\]"):
        Target.parse("compress", {"macs": 1.5})
    with pytest.raises(ValueError, match="unknown metric"):
        Target("flops", 0.5)
    with pytest.raises(ValueError, match=r"\(0.0, 1.0\]"):
        Target("macs", 0.0)


def test_of_reads_one_field_with_the_owners_name():
    assert Target.of("Prune", macs=None, params=None) is None
    assert Target.of("Prune", macs=0.5, params=None) == Target("macs", 0.5)
    with pytest.raises(ValueError, match=r"Prune\(params=...\)|Prune.*params"):
        Target.of("Prune", macs=None, params=2.0)
    with pytest.raises(ValueError, match="give one target, not macs=, params="):
        Target.of("Factorize", macs=0.5, params=0.5)


def test_steps_gentler_and_met():
    t = Target("macs", 0.25)
    assert t.per_step(2) == Target("macs", 0.5)
    assert t.gentler() == Target("macs", 0.625)
    assert t.as_field() == {"macs": 0.25}
    assert t.met(25, 100) and not t.met(26, 100)
    assert not t.met(None, 100)
    assert t.measure({"macs": 7}) == 7


@pytest.mark.parametrize(
    "transform, field",
    [(Prune(macs=0.25), "macs"), (Prune(params=0.25), "params"), (Factorize(macs=0.25), "macs")],
)
def test_transforms_step_and_soften_through_the_target(transform, field):
    steps = transform.split(2)
    assert [getattr(s, field) for s in steps] == [0.5, 0.5]
    assert getattr(transform.gentler(), field) == 0.625


def test_compress_takes_a_target():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    result = nnslim.compress(
        model,
        Prune(ratio=0.5),
        evaluate=lambda m: 0.0,
        target=Target("params", 0.75),
        tolerance=0.0,
        example_inputs=x,
        steps=1,
    )
    assert result.reached
    assert result.history[-1]["params"] <= 0.75 * result.baseline["params"]
