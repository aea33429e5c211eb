"""nnslim.Auto: per-layer settings under a byte budget, from a K-FAC loss estimate."""

import copy
import dataclasses
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.core.report import Report
from nnslim.testing import assert_same_state, model_state
from nnslim.transforms.auto import CANDIDATES


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


class _Encoder(nn.Module):
    """Two Linears whose output is a hidden state (a Hugging Face encoder's output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 12), nn.Linear(12, 6)

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=self.b(self.a(x).relu()))


def test_an_encoders_output_gradients_are_the_gauss_newton_diagonals():
    """For a hidden-state output the K-FAC statistics come from a squared error to a Gaussian
    target drawn around the output (seed: the batch's index), not from a cross-entropy over
    hidden units: the squared output gradients are exactly ``(eps / numel) @ J``'s."""
    pytest.importorskip("transformers")
    from nnslim.core.calibrate import collect
    from nnslim.core.transform import calibration_batches

    torch.manual_seed(0)
    model = _Encoder().eval()
    data = [torch.randn(2, 5, 8) for _ in range(3)]
    layers = {"a": model.a, "b": model.b}
    stats = collect(model, calibration_batches(model, data), layers, out_grads=True)
    want_a, want_b = torch.zeros(12), torch.zeros(6)
    for i, x in enumerate(data):
        h = model.a(x)
        eps = torch.randn((2, 5, 6), generator=torch.Generator().manual_seed(i)) / (2 * 5 * 6)
        want_b += eps.pow(2).sum((0, 1))
        with torch.no_grad():
            g_a = (eps @ model.b.weight) * (h > 0)
        want_a += g_a.pow(2).sum((0, 1))
    torch.testing.assert_close(stats["b"].extra["out_grad_sq"], want_b, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["a"].extra["out_grad_sq"], want_a, rtol=1e-5, atol=0)
    # and the search runs on it
    report = nnslim.Auto(target={"bytes": 0.6}, select=["a", "b"]).apply(
        model, data[0], calibration=data
    )
    assert report.after.param_bytes <= 0.6 * report.before.param_bytes


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
        nnslim.Auto(target={"params": 0.5})
    with pytest.raises(ValueError, match="select"):
        nnslim.Auto(target={"bytes": 0.5}, candidates=(nnslim.Compose([nnslim.Quantize()]),))
    with pytest.raises(ValueError, match="not among the candidates"):
        nnslim.Auto(plan={"a": "int2"})
    with pytest.raises(ValueError, match="candidates"):
        nnslim.Auto(target={"bytes": 0.5}, candidates=("int3",))


@dataclasses.dataclass(frozen=True)
class HalfWeights(nnslim.Transform):
    """A transform of a user's own: the selected Linear layers' weights stored in fp16."""

    select: Any = None

    def _apply(self, model, ctx, report):
        eligible = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        for path, _ in self.resolve(model, self.select, eligible=eligible):
            layer = model.get_submodule(path)
            half = _HalfLinear(layer)
            report.changed(path, "fp16 weights")
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, half)


class _HalfLinear(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().half(), requires_grad=False)
        self.bias = layer.bias

    def forward(self, x):
        return F.linear(x, self.weight.float(), self.bias)


def test_a_transform_of_a_users_own_joins_the_search():
    """No method to write: Auto applies it to a copy of each layer, reads the new layer's
    bytes from the profiler and its weight back through the identity."""
    model, data = _trained()
    t = nnslim.Auto(target={"bytes": 0.6}, candidates=("int4-g32", HalfWeights()))
    table = t.table(model, data)
    name = repr(HalfWeights())
    for p, opts in table.options.items():
        by = {n: (c, loss) for n, c, loss in opts}
        w = getattr(model, p).weight
        assert by[name][0] == pytest.approx(by["keep"][0] - 2 * w.numel())  # fp16: half the bytes
        assert 0 < by[name][1] < by["int4-g32"][1]  # fp16 rounds far less than int4
    report = t.apply(model, calibration=data)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "_HalfLinear" in kinds
    note = next(n for n in report.notes if n.startswith("Auto:"))
    predicted = float(note.split("predicted ")[1].split(" ")[0])
    assert report.after.param_bytes / report.before.param_bytes == pytest.approx(
        predicted, rel=0.02
    )


def test_palettes_and_low_rank_join_and_a_macs_budget_is_met():
    """Below uniform int4 g64's bytes only palettes (and low rank) fit; under a MACs budget only
    low rank saves anything. Both budgets are met as predicted."""
    model, data = _trained()
    per_layer = tuple(c for c in CANDIDATES if not c.startswith("channels"))  # one by one
    table = nnslim.Auto(target={"bytes": 0.5}, candidates=per_layer).table(model, data)
    names = {n for opts in table.options.values() for n, _, _ in opts}
    assert {"palette-8", "palette-16", "palette-64", "palette-256", "rank-0.5"} <= names
    for opts in table.options.values():
        by = {n: c for n, c, _ in opts}
        assert by["palette-8"] < by["palette-16"] < by["int4-g64"] < by["int8"] < by["keep"]
        assert by["palette-16"] < by["palette-64"] < by["palette-256"]
    m = copy.deepcopy(model)
    report = nnslim.Auto(
        target={"bytes": 0.15}, candidates=("int4-g64", "palette-8", "palette-16")
    ).apply(m, calibration=data)
    assert report.after.param_bytes / report.before.param_bytes <= 0.15 + 1e-6
    assert any(type(x).__name__ == "PalettizedLinear" for x in m.modules())
    m = copy.deepcopy(model)
    t = nnslim.Auto(target={"macs": 0.7}, candidates=("int8", "rank-0.5", "rank-0.25"))
    report = t.apply(m, data[0][0], calibration=data)
    note = next(n for n in report.notes if n.startswith("Auto:"))
    predicted = float(note.split("predicted ")[1].split(" ")[0])
    measured = report.after.macs / report.before.macs
    assert measured <= 0.7 + 1e-6 and measured == pytest.approx(predicted, rel=0.02)
    assert not any(type(x).__name__.startswith("Int8") for x in m.modules())  # saves no MACs


def _fake_clock(module, inputs, runtime="eager", path=""):
    """A deterministic clock for the plumbing: each leaf's MACs on ``inputs``, int8-dynamic
    layers at half their MACs' time and int8 weight-only ones at 1.2x (as on CPUs without
    fast integer GEMMs for float activations), everything else at one unit a MAC."""
    prof = nnslim.profile(module, inputs, memory=False)
    factor = {"Int8DynamicLinear": 0.5, "Int8Linear": 1.2}
    total = 0.0
    for name, m in module.named_modules():
        if not list(m.children()) and name in prof.modules:
            total += prof.modules[name].macs * factor.get(type(m).__name__, 1.0)
    return total


def test_a_latency_budget_times_each_setting_on_its_rows(monkeypatch):
    """Under {"latency": f} a layer's cost is its time on the rows it sees in one forward,
    each candidate timed on a copy, the rest of the model timed once; with a clock that makes
    int8 weight-only slower and int8-dynamic faster, the search never picks the slower one and
    meets the budget as that clock measures the model afterwards."""
    import nnslim.transforms.auto as auto_mod

    monkeypatch.setattr(auto_mod, "_time_ms", _fake_clock)
    model, data = _trained()
    x = data[0][0]
    t = nnslim.Auto(target={"latency": 0.6}, candidates=("int8", "int8-dynamic", "rank-0.25"))
    table = t.table(model, data, x)
    assert table.metric_name == "latency"
    assert table.total == pytest.approx(_fake_clock(model, x))
    for opts in table.options.values():
        by = {n: c for n, c, _ in opts}
        assert by["int8"] == pytest.approx(1.2 * by["keep"])
        assert by["int8-dynamic"] == pytest.approx(0.5 * by["keep"])
    m = copy.deepcopy(model)
    report = t.apply(m, x, calibration=data)
    note = next(n for n in report.notes if n.startswith("Auto:"))
    predicted = float(note.split("predicted ")[1].split(" ")[0])
    measured = _fake_clock(m, x) / _fake_clock(model, x)
    assert measured <= 0.6 + 1e-6 and measured == pytest.approx(predicted, abs=1e-4)
    assert not any(type(x).__name__ == "Int8Linear" for x in m.modules())
    assert any(type(x).__name__ == "Int8DynamicLinear" for x in m.modules())


def test_a_latency_budget_runs_on_the_real_clock():
    """The same search on this machine's clock: every setting timed (no threshold on the
    times: the machine is shared), the plan within the budget it predicts."""
    model, data = _trained()
    table = nnslim.Auto(target={"latency": 0.9}, candidates=("int8-dynamic", "rank-0.25")).table(
        model, data, data[0][0]
    )
    assert table.total > 0 and all(c > 0 for o in table.options.values() for _, c, _ in o)
    plan = table.allocate(max(0.9, table.smallest()))
    assert table.cost_of(plan) <= max(0.9, table.smallest()) * table.total * (1 + 1e-9)


def test_the_table_is_cached_and_its_front_falls_with_the_budget():
    model, data = _trained()
    t = nnslim.Auto(target={"bytes": 0.3})
    table = t.table(model, data)
    assert nnslim.Auto(target={"bytes": 0.5}).table(model, data) is table  # same weights, data
    front = table.front()
    assert front[0]["budget"] == pytest.approx(table.smallest())
    losses = [p["loss"] for p in front]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(losses))
    assert front[-1]["plan"] == {} and front[-1]["loss"] == 0.0
    for p in front:
        assert p["cost"] <= p["budget"] + 1e-9
    # a plan applies as given, and the applied model is the one the search gives
    plan = table.allocate(0.3)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    nnslim.Auto(plan=plan).apply(a, calibration=data)
    t.apply(b, calibration=data)
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with torch.no_grad():
        model.a.weight.mul_(2)  # new weights: measured again
    assert nnslim.Auto(target={"bytes": 0.5}).table(model, data) is not table
    again = nnslim.Auto(plan=plan)
    assert nnslim.Transform.from_json(again.to_json()) == again


def _accuracy(data):
    def evaluate(model):
        with torch.no_grad():
            return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in data) / len(data)

    return evaluate


def test_compress_with_auto_keeps_the_first_round_within_the_tolerance():
    model, data = _trained()
    before = model_state(model)
    auto = nnslim.Auto(target={"bytes": 0.3})
    result = nnslim.compress(
        model, auto, evaluate=_accuracy(data), tolerance=0.5, example_inputs=data[0][0],
        calibration=data,
    )  # fmt: skip
    assert_same_state(before, model_state(model), "compress works on a copy")
    assert result.reached and len(result.history) == 1
    row = result.history[0]
    assert row["kept"] and result.plan == row["plan"] == auto.table(model, data).allocate(0.3)
    assert row["param_bytes"] / result.baseline["param_bytes"] == pytest.approx(
        row["predicted_cost"], rel=0.02
    )
    assert result.front and result.front[-1]["loss"] == 0.0
    assert "Auto round 1" in result.table()


def test_compress_with_auto_corrects_its_estimates_and_says_when_no_round_fits():
    """Tolerance 0 at a small budget: each round misses; between rounds the changed layers are
    put back group by group and the estimates rescaled by what that recovered; the model is
    left as it was, every round in the history."""
    model, data = _trained()
    calls = []
    acc = _accuracy(data)

    def evaluate(m):
        calls.append(1)
        return acc(m)

    result = nnslim.compress(
        model, nnslim.Auto(target={"bytes": 0.16}, candidates=("int4-g32", "palette-8")),
        evaluate=evaluate, tolerance=0.0, example_inputs=data[0][0], calibration=data, rounds=3,
    )  # fmt: skip
    assert not result.reached and result.plan == {}
    assert all(not r["kept"] for r in result.history) and 1 <= len(result.history) <= 3
    assert any("no round kept the metric" in n for n in result.notes)
    rounds = len(result.history)
    changed = len(result.history[0]["plan"])
    # the baseline, each round, and after each missed round that is not the last, one per
    # group put back (at most four); a round whose plan repeats is not run
    assert rounds == 3 or any("repeat an earlier plan" in n for n in result.notes)
    assert 1 + rounds < len(calls) <= 1 + rounds + min(4, changed) * rounds
    with torch.no_grad():
        assert torch.equal(result.model(data[0][0]), model(data[0][0]))
    with pytest.raises(ValueError, match="finite"):
        nnslim.compress(
            model, nnslim.Auto(target={"bytes": 0.5}), evaluate=lambda m: float("nan"),
            tolerance=0.1, example_inputs=data[0][0], calibration=data,
        )  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), fixed=st.floats(-50.0, 50.0))
def test_the_smallest_reachable_budget_is_always_allocatable(seed, fixed):
    """``allocate(smallest())`` fits whatever the float rounding of the fraction (a latency
    table's fixed part, the model's time less its layers' times, can even be negative)."""
    g = torch.Generator().manual_seed(seed)
    options = {
        f"l{i}": [("keep", 100.0 + float(torch.rand(1, generator=g)) * 50, 0.0)]
        + [(f"c{j}", float(torch.rand(1, generator=g)) * 90 + 1e-3, float(j + 1)) for j in range(3)]
        for i in range(5)
    }
    total = sum(o[0][1] for o in options.values()) + fixed
    table = nnslim.AutoTable("latency", total, options, {})
    plan = table.allocate(table.smallest())
    assert table.cost_of(plan) <= table.smallest() * table.total * (1 + 1e-9)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1, dilation=2),
        dict(kernel_size=(3, 5), padding="same", dilation=(2, 1)),
        dict(kernel_size=2, stride=3, padding_mode="reflect", padding=1, bias=False),
    ],
)
@pytest.mark.parametrize("candidate", ["keep", "rank-0.5", "palette-16", "int8"])
def test_a_convolutions_weight_is_read_back_whatever_its_geometry(conv, candidate):
    """The probe reads back the convolution a candidate leaves (a factorized pair, a palette,
    int8 codes) from impulses: convolving with it (and the layer's bias) gives the layer's
    output at every position, for any stride, padding and dilation."""
    from nnslim.transforms.auto import _LayerProbe

    torch.manual_seed(0)
    layer = nn.Conv2d(6, 10, **conv)
    probe = _LayerProbe(layer)
    if candidate == "keep":
        new, got = layer, probe._conv_weight(layer)
    else:
        cost_weight = probe.apply(CANDIDATES[candidate])
        assert cost_weight is not None
        holder = nn.Sequential(copy.deepcopy(layer))
        dataclasses.replace(CANDIDATES[candidate], select=["0"]).apply(holder, probe.x)
        new, got = holder[0], cost_weight[1]
    assert got.shape == layer.weight.shape
    x = torch.randn(2, 6, 11, 13)
    with torch.no_grad():
        want = new(x)
        bias = layer.bias if layer.bias is not None else None
        if candidate == "keep":
            torch.testing.assert_close(got, layer.weight.detach(), rtol=0, atol=1e-7)
        padded = (
            F.pad(x, (1, 1, 1, 1), mode="reflect") if conv.get("padding_mode") == "reflect" else x
        )
        kw = {k: v for k, v in conv.items() if k in ("stride", "dilation")}
        pad = 0 if conv.get("padding_mode") == "reflect" else conv.get("padding", 0)
        again = F.conv2d(padded, got, None, padding=pad, **kw)
    if bias is not None:
        b = new(torch.zeros(1, 6, 11, 13))
        again = again + b
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)


class _Pointwise(nn.Module):
    """The same network as 1x1 convolutions over an image or as Linears over its pixels."""

    def __init__(self, conv: bool):
        super().__init__()
        make = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.conv = conv
        self.a, self.b, self.head = make(8, 32), make(32, 32), make(32, 5)

    def forward(self, x):  # x: (N, 8, H, W)
        if not self.conv:
            x = x.permute(0, 2, 3, 1)
        y = self.head(F.relu(self.b(F.relu(self.a(x)))))
        return y.mean((2, 3)) if self.conv else y.mean((1, 2))


def test_a_pointwise_convolution_is_searched_as_the_linear_it_computes():
    """1x1 convolutions over an image and Linears over its pixels compute the same thing: the
    table is the same (costs and loss estimates), candidate by candidate; and the plan fits
    its budget as the profiler measures it afterwards."""
    torch.manual_seed(0)
    lin = _Pointwise(conv=False)
    conv = _Pointwise(conv=True)
    with torch.no_grad():
        for name in ("a", "b", "head"):
            getattr(conv, name).weight.copy_(getattr(lin, name).weight[:, :, None, None])
            getattr(conv, name).bias.copy_(getattr(lin, name).bias)
    data = [(torch.randn(4, 8, 6, 6), torch.randint(0, 5, (4,))) for _ in range(3)]
    # palettes compute the same in both; int8 Linears run a bf16 kernel, int8 convolutions
    # float (so their estimates differ by that rounding); Factorize leaves 1x1 convolutions
    cands = ("palette-16", "palette-8")
    sel = ["a", "b", "head"]
    t_lin = nnslim.Auto(target={"bytes": 0.5}, candidates=cands, select=sel).table(lin, data)
    t_conv = nnslim.Auto(target={"bytes": 0.5}, candidates=cands, select=sel).table(conv, data)
    assert set(t_conv.options) == set(sel)
    for p in sel:
        for (n1, c1, l1), (n2, c2, l2) in zip(t_lin.options[p], t_conv.options[p], strict=True):
            assert n1 == n2
            assert c2 == c1
            assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-12)
    m = copy.deepcopy(conv)
    report = nnslim.Auto(target={"bytes": 0.5}, candidates=cands, select=sel).apply(
        m, data[0][0], calibration=data
    )
    assert report.after.param_bytes <= 0.5 * report.before.param_bytes * (1 + 1e-6)


def test_a_cnn_gets_settings_for_its_convolutions_and_grouped_ones_are_named():
    """On a CNN, convolutions are searched by default (a depthwise one is reported as left,
    not silently passed over); MACs budgets see the convolutions' MACs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    table = nnslim.Auto(target={"macs": 0.6}, candidates=("rank-0.5", "rank-0.25")).table(
        model, data
    )
    assert {"0", "4"} <= set(table.options)
    assert "2" not in table.options
    m = copy.deepcopy(model)
    report = nnslim.Auto(target={"macs": 0.6}, candidates=("rank-0.5", "rank-0.25")).apply(
        m, data[0][0], calibration=data
    )
    assert any(s.path == "2" and "grouped" in s.reason for s in report.skips)
    after = nnslim.profile(m, data[0][0], memory=False).macs
    before = nnslim.profile(model, data[0][0], memory=False).macs
    assert after <= 0.6 * before * (1 + 1e-6)


class _TiedLM(nn.Module):
    """A token model whose output layer is (or copies) the embedding."""

    def __init__(self, tie: bool):
        super().__init__()
        torch.manual_seed(0)
        # width 24: int8 Linear layers take the float path (the bf16 kernel wants multiples
        # of 16), so the untied head's read-back weight is exactly the rounded rows
        self.emb = nn.Embedding(50, 24)
        self.mid = nn.Linear(24, 24)
        self.head = nn.Linear(24, 50, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(self.emb.weight)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + torch.tanh(self.mid(h)))


def _tokens(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 50, (4, 16), generator=g) for _ in range(n)]


def test_an_embedding_is_searched_and_a_tied_head_counts_in_its_estimate():
    """The embedding's estimate is the K-FAC one of a Linear on one-hot inputs (the Gram: the
    token counts); tied to the head, its rows change the head's by the same amounts, so its
    estimate is exactly its own plus the untied head's for the same setting (int8 rounds the
    same rows either way)."""
    calib = _tokens()
    names = ["int8", "int4-g32"]
    tied = nnslim.Auto(target={"bytes": 0.5}, candidates=names).table(_TiedLM(True), calib)
    apart = nnslim.Auto(target={"bytes": 0.5}, candidates=names, select=["emb", "mid", "head"])
    apart = apart.table(_TiedLM(False), calib)
    assert set(tied.options) == {"emb", "mid"}
    est = {n: loss for n, _, loss in tied.options["emb"]}
    own = {n: loss for n, _, loss in apart.options["emb"]}
    head = {n: loss for n, _, loss in apart.options["head"]}
    assert est["int8"] == pytest.approx(own["int8"] + head["int8"], rel=1e-5)
    assert est["int8"] > own["int8"] > 0
    # a tied pair costs one table
    assert dict((n, c) for n, c, _ in tied.options["emb"])["keep"] == 50 * 24 * 4


def test_a_plan_with_the_embedding_quantizes_the_tied_pair_at_the_predicted_bytes():
    from nnslim.modules.quantized import Int8Embedding, Int8Linear

    model = _TiedLM(True)
    calib = _tokens()
    auto = nnslim.Auto(target={"bytes": 0.35}, candidates=["int8"])
    table = auto.table(model, calib)
    report = auto.apply(model, calibration=calib)
    assert isinstance(model.emb, Int8Embedding) and isinstance(model.head, Int8Linear)
    assert model.emb.qweight is model.head.qweight
    measured = report.after.param_bytes / report.before.param_bytes
    assert measured == pytest.approx(table.cost_of(table.allocate(0.35)) / table.total, rel=1e-9)
    assert measured <= 0.35
    skipped = {s.path: s.reason for s in report.skips}
    assert skipped["head"] == "tied to embedding emb (one weight): chosen with it"


def test_with_gptq_the_quantization_candidates_are_measured_by_gptq():
    """``method="gptq"``: a Linear's int4 candidate is measured by GPTQ on the layer's input
    Gram, so its estimate is the K-FAC loss of the weight ``Quantize(method="gptq")`` gives,
    well under round to nearest's on correlated inputs."""
    from nnslim.base.inputs import as_inputs
    from nnslim.core.calibrate import collect

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 64, generator=g)
    batches = [
        torch.randn(32, 6, generator=g) @ mix + 0.01 * torch.randn(32, 64, generator=g)
        for _ in range(4)
    ]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    stats = collect(
        model, [as_inputs(b) for b in batches], {"0": model[0]}, gram=True, out_grads=True
    )
    stats = stats["0"]
    f = stats.extra["out_grad_sq"] / len(batches) ** 2

    def kfac(method):
        m = copy.deepcopy(model)
        nnslim.Quantize(scheme="int4", group_size=32, method=method).apply(m, calibration=batches)
        d = m[0].weight - model[0].weight.detach()
        return 0.5 * float(((d @ stats.gram) * d).sum(1) @ f)

    est = {
        method: nnslim.Auto(target={"bytes": 0.5}, candidates=["int4-g32"], method=method)
        .table(model, batches)
        .options["0"][1][2]
        for method in ("rtn", "gptq")
    }
    assert est["gptq"] == pytest.approx(kfac("gptq"), rel=1e-4)
    assert est["rtn"] == pytest.approx(kfac("rtn"), rel=1e-4)
    assert est["gptq"] < 0.5 * est["rtn"]


def test_an_embedding_with_a_forward_of_its_own_is_left_and_said():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 4.0

    model = _TiedLM(False)
    model.emb = Scaled(50, 24)
    report = Report(transform="Auto")
    table = nnslim.Auto(target={"bytes": 0.5}, candidates=["int8"]).table(
        model, _tokens(), report=report
    )
    assert "emb" not in table.options
    assert {s.path: s.reason for s in report.skips}["emb"].startswith("Scaled has a forward")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_bf16_model_is_searched_in_its_dtype(family):
    """The probe inputs take the layer's dtype (a bf16 layer refused the fp32 probe and the
    search failed on every bf16 model); the plan's bytes are the profiler's after applying."""
    transformers = pytest.importorskip("transformers")
    from tests import zoo

    cls, cfg = {
        "gpt2": (transformers.GPT2LMHeadModel, zoo.gpt2_config()),
        "llama": (transformers.LlamaForCausalLM, zoo.llama_config()),
    }[family]
    torch.manual_seed(0)
    model = cls(cfg).eval().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (2, 12), generator=g) for _ in range(2)]
    report = nnslim.Auto(target={"bytes": 0.5}).apply(model, data[0], calibration=data)
    note = next(n for n in report.notes if n.startswith("Auto:"))
    predicted = float(note.split("predicted ")[1].split(" ")[0])
    measured = report.after.param_bytes / report.before.param_bytes
    assert measured == pytest.approx(predicted, abs=1e-4) and measured <= 0.5 + 1e-6
    with torch.no_grad():
        assert torch.isfinite(model(data[0]).logits.float()).all()


def test_a_latency_budget_timed_in_onnxruntime(monkeypatch):
    """``Auto(runtime="onnxruntime")``: the model and each layer's candidates are exported and
    timed in ONNX Runtime (every timing goes there: recorded), the plan's prediction uses
    those times, and ``compress`` measures the result in ONNX Runtime too. Without a latency
    budget the runtime is refused."""
    pytest.importorskip("onnxruntime")
    import nnslim.io.export as engines

    seen: list[str] = []
    real = engines.onnxruntime_latency

    def recorded(model, *args, **kwargs):
        seen.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engines, "onnxruntime_latency", recorded)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 4))
    data = [(torch.randn(32, 64), torch.randint(0, 4, (32,))) for _ in range(2)]
    x = data[0][0]
    auto = nnslim.Auto(
        target={"latency": 0.9}, candidates=("int8-dynamic", "rank-0.25"), runtime="onnxruntime"
    )
    table = auto.table(model, data, x)
    assert seen[0] == "Sequential"  # the whole model first, then layers and candidates
    assert {"Linear", "Int8DynamicLinear"} <= set(seen)
    for path, opts in table.options.items():  # each candidate exported and timed
        assert {n for n, _, _ in opts} == {"keep", "int8-dynamic", "rank-0.25"}, path
    assert table.metric_name == "latency" and table.total > 0
    result = nnslim.compress(
        model, auto, example_inputs=x, evaluate=lambda m: 0.0, calibration=data, tolerance=1.0
    )
    assert seen.count("Sequential") >= 3  # the table's total, then compress's two profiles
    assert result.history[-1]["latency_ms"] > 0
    with pytest.raises(ValueError, match="latency budget"):
        nnslim.Auto(target={"bytes": 0.5}, runtime="onnxruntime")
    with pytest.raises(ValueError, match="runtime"):
        nnslim.Auto(target={"latency": 0.5}, runtime="tensorrt")
