"""Properties over random models with state: BatchNorm in train mode, a forward that counts
its calls in a buffer, a weight tied between two layers, frozen layers. Every transform either
succeeds without touching state it does not own, or raises with the model bit-identical."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.core.report import Report
from nnslim.testing import assert_same_state, model_state


class Counter(nn.Module):
    """Counts its forwards in a buffer (a stateful module nnslim does not own)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


class Net(nn.Module):
    def __init__(self, widths: list[int], bn: list[bool], frozen: list[bool], tie: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            lin = nn.Linear(a, b)
            lin.requires_grad_(not frozen[i])
            layers += [lin, nn.BatchNorm1d(b) if bn[i] else nn.Identity(), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.count = Counter()
        w = widths[-1]
        self.a, self.b = nn.Linear(w, w), nn.Linear(w, w)
        if tie:
            self.b.weight = self.a.weight
        self.head = nn.Linear(w, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.count(self.body(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(h)))))


TRANSFORMS = [
    nnslim.Prune(ratio=0.5),
    nnslim.Prune(macs=0.7),
    nnslim.Prune(ratio=0.5, structure="unstructured"),
    nnslim.Quantize(),
    nnslim.Quantize(scheme="int8-dynamic"),
    nnslim.Factorize(ratio=0.5),
    nnslim.ShareWeights(clusters=4),
]

models = st.builds(
    lambda n, widths, bn, frozen, tie, train: (widths[: n + 1], bn, frozen, tie, train),
    n=st.integers(1, 3),
    widths=st.lists(st.integers(4, 24), min_size=4, max_size=4),
    bn=st.lists(st.booleans(), min_size=3, max_size=3),
    frozen=st.lists(st.booleans(), min_size=3, max_size=3),
    tie=st.booleans(),
    train=st.booleans(),
)


def _build(spec: tuple) -> tuple[nn.Module, torch.Tensor]:
    widths, bn, frozen, tie, train = spec
    torch.manual_seed(0)
    model = Net(widths, bn, frozen, tie)
    with torch.no_grad():  # running statistics that are not the defaults
        model.train()
        model(torch.randn(8, widths[0]))
    model.train(train)
    return model, torch.randn(4, widths[0])


def _outside_state(model: nn.Module) -> dict[str, object]:
    """State no transform owns: modes, BatchNorm statistics, the counter, requires_grad."""
    out: dict[str, object] = {}
    for p, m in model.named_modules():
        out[f"{p}:training"] = m.training
        for n, b in m.named_buffers(recurse=False):
            if isinstance(m, (nn.BatchNorm1d, Counter)):
                out[f"{p}.{n}"] = b.clone()
    return out


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: repr(t)[:40])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=models)
def test_a_transform_keeps_the_state_it_does_not_own(transform, spec):
    model, x = _build(spec)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    before = _outside_state(model)
    with torch.no_grad():
        shape = model.eval()(x).shape
    model.train(spec[-1])
    before = _outside_state(model)
    transform.apply(model, x)
    after = _outside_state(model)
    for key, value in before.items():
        if key not in after:
            continue  # a module the transform removed
        got = after[key]
        if isinstance(value, torch.Tensor) and got.shape != value.shape:
            continue  # channels the transform pruned (with their statistics)
        same = torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
        assert same, f"{transform}: {key} changed"
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad, f"{transform}: {n} was frozen"
    if spec[3] and isinstance(model.a, nn.Linear) and isinstance(model.b, nn.Linear):
        assert model.a.weight is model.b.weight, f"{transform}: the tie was split"
    with torch.no_grad():
        assert model.eval()(x).shape == shape


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: repr(t)[:40])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=models)
def test_a_transform_that_fails_leaves_the_model_bit_identical(transform, spec):
    model, x = _build(spec)
    before = model_state(model)
    calls = []
    original = Report.changed

    def fail_after_the_first_change(self, *args, **kwargs):  # a fault mid-apply
        calls.append(1)
        original(self, *args, **kwargs)
        raise ValueError("injected fault")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Report, "changed", fail_after_the_first_change)
        try:
            transform.apply(model, x)
        except ValueError as e:
            assert "injected fault" in str(e)
    if calls:
        assert_same_state(before, model_state(model), f"{transform} after a fault")
