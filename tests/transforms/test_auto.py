"""nnslim.Auto: per-layer settings under a byte budget, from a K-FAC loss estimate."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.testing import assert_same_state, model_state


class _Net(nn.Module):
    """A classifier whose layers matter unequally: the first reads inputs with a few large
    channels, the last feeds the logits."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 128)
        self.c = nn.Linear(128, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


_RULE = torch.randn(64, 10, generator=torch.Generator().manual_seed(123))


def _data(n=4, seed=0):
    """A learnable task: the class is the argmax of a fixed linear map of the input."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(64, 64, generator=g)
        x[:, :3] *= 20
        out.append((x, (x @ _RULE).argmax(1)))
    return out


def _loss(model, data):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def _trained():
    torch.manual_seed(0)
    model = _Net()
    train = _data(40, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(6):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), _data(8)


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.3, 0.2])
def test_the_budget_is_met_as_predicted(fraction):
    model, data = _trained()
    report = nnslim.Auto(target={"bytes": fraction}).apply(model, calibration=data)
    note = next(n for n in report.notes if n.startswith("Auto:"))
    predicted = float(note.split("predicted ")[1].split(" ")[0])
    measured = report.after.param_bytes / report.before.param_bytes
    assert measured <= fraction + 1e-6
    assert measured == pytest.approx(predicted, rel=0.02)


def test_output_gradient_statistics_are_the_k_fac_factor():
    """``collect(out_grads=True)``: per output channel, the squared gradient of each batch's
    loss with respect to the layer's output, summed over rows and batches, as autograd gives
    it directly."""
    from nnslim.core.calibrate import collect
    from nnslim.core.transform import calibration_batches

    model, data = _trained()
    data = data[:3]
    before = {n: None if t.grad is None else t.grad.clone() for n, t in model.named_parameters()}
    layers = {"b": model.b, "head": model.head}
    stats = collect(model, calibration_batches(model, data), layers, gram=True, out_grads=True)
    want = {p: torch.zeros(m.out_features) for p, m in layers.items()}
    for x, y in data:
        outs: dict = {}
        hs = [
            m.register_forward_hook(lambda _m, _a, o, p=p, outs=outs: outs.__setitem__(p, o))
            for p, m in layers.items()
        ]
        loss = F.cross_entropy(model(x), y)
        for h in hs:
            h.remove()
        grads = torch.autograd.grad(loss, [outs[p] for p in layers])
        for p, g in zip(layers, grads, strict=True):
            want[p] += g.pow(2).sum(0)
    for p in layers:
        torch.testing.assert_close(stats[p].extra["out_grad_sq"], want[p], rtol=1e-4, atol=1e-12)
    for n, t in model.named_parameters():  # .grad as it was
        assert (t.grad is None and before[n] is None) or torch.equal(t.grad, before[n])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 4), frac=st.floats(0.2, 1.0))
def test_the_allocation_is_the_knapsack_optimum_or_close(seed, layers, frac):
    """Against brute force over every combination: the chosen plan fits the budget and its
    loss is within 5% (plus a tiny absolute slack) of the optimum."""
    import itertools

    from nnslim.transforms.auto import _allocate

    g = torch.Generator().manual_seed(seed)
    options = {}
    for i in range(layers):
        sizes = sorted(torch.rand(4, generator=g).tolist(), reverse=True)
        losses = sorted(torch.rand(4, generator=g).tolist())
        losses[0] = 0.0
        options[f"l{i}"] = [(f"c{j}", sizes[j], losses[j]) for j in range(4)]
    smallest = sum(o[-1][1] for o in options.values())
    largest = sum(o[0][1] for o in options.values())
    budget = smallest + frac * (largest - smallest)
    choice = _allocate(options, budget)
    size = sum(options[p][i][1] for p, i in choice.items())
    loss = sum(options[p][i][2] for p, i in choice.items())
    assert size <= budget + 1e-9
    best = min(
        sum(options[p][i][2] for p, i in zip(options, combo, strict=True))
        for combo in itertools.product(range(4), repeat=layers)
        if sum(options[p][i][1] for p, i in zip(options, combo, strict=True)) <= budget + 1e-9
    )
    assert loss <= best + 1e-9 or loss <= best * 1.02 + 0.01


def test_saves_loads_round_trips_and_refuses_bad_input(tmp_path):
    model, data = _trained()
    t = nnslim.Auto(target={"bytes": 0.4}, candidates=("int8", "int4-g32"), method="gptq")
    assert nnslim.Transform.from_json(t.to_json()) == t
    m = copy.deepcopy(model)
    t.apply(m, calibration=data)
    nnslim.save(m, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(back(data[0][0]), m(data[0][0]))
    before = model_state(model)
    with pytest.raises(ValueError, match="smallest reachable is 0\\.1"):
        nnslim.Auto(target={"bytes": 0.05}).apply(model, calibration=data)
    with pytest.raises(ValueError, match="calibration"):
        nnslim.Auto(target={"bytes": 0.5}).apply(model, data[0][0])
    assert_same_state(before, model_state(model), "after refused budgets")
    with pytest.raises(ValueError, match="\\{'bytes': fraction\\}"):
        nnslim.Auto(target={"macs": 0.5})
    with pytest.raises(ValueError, match="candidates"):
        nnslim.Auto(target={"bytes": 0.5}, candidates=("int3",))
