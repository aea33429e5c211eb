"""nnslim.Auto with channel candidates: a coupled channel group is one item of the search."""

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnslim
from nnslim.testing import assert_same_state, model_state

CHANNELS = ("channels-0.25", "channels-0.5")


class _CNN(nn.Module):
    """conv-BN-ReLU twice, pooled, then a small MLP: the groups c1 -> c2 (through b1),
    c2 -> fc1 (through b2) and fc1 -> fc2."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32, 48), nn.Linear(48, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x))).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def _cnn():
    torch.manual_seed(0)
    model = _CNN().eval()
    with torch.no_grad():
        for b in (model.b1, model.b2):  # statistics a trained network would have
            b.running_mean.normal_()
            b.running_var.uniform_(0.5, 2.0)
            b.weight.normal_()
            b.bias.normal_()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(3)
    ]
    return model, data


def _apply(model, plan, candidates, data):
    m = copy.deepcopy(model)
    x = data[0][0] if isinstance(data[0], tuple) else data[0]
    nnslim.Auto(plan=plan, candidates=candidates).apply(m, x, calibration=data)
    return m


def test_a_group_removes_the_channels_prune_removes_at_the_predicted_cost():
    """Each channel setting removes exactly the channels ``Prune`` removes with that
    importance (the root's surviving rows and the reader's surviving columns are the
    originals at the table's kept indices); the BatchNorm shrinks with them; the predicted
    MACs and bytes are the profiler's after the plan is applied, exactly."""
    model, data = _cnn()
    x = data[0][0]
    cands = (*CHANNELS, "int8", "rank-0.5")
    for metric in ("macs", "bytes"):
        table = nnslim.Auto(target={metric: 0.5}, candidates=cands).table(model, data)
        # one chain c1 -> c2 -> fc1: c2 reads c1's channels and writes its own, fc1 the same
        assert table.chains() == [["c1", "c2", "fc1"]]
        assert table.groups["c1"].members == ["c1"]
        assert table.groups["c2"].members == ["c2"] and table.groups["c2"].shared == ["c2"]
        assert table.groups["fc1"].members == ["fc1", "fc2"]
        for setting in CHANNELS:
            gone = table.groups["c1"].removed[setting]
            assert len(gone) == {"channels-0.25": 4, "channels-0.5": 8}[setting]
            m = _apply(model, {"c1": setting}, cands, data)
            kept = [i for i in range(16) if i not in gone]
            assert torch.equal(m.c1.weight, model.c1.weight[kept])
            assert torch.equal(m.c2.weight, model.c2.weight[:, kept])
            assert torch.equal(m.b1.running_mean, model.b1.running_mean[kept])
        before = nnslim.profile(model, x, memory=False)
        for fraction in (0.9, 0.6, 0.4):
            plan = table.allocate(fraction)
            m = _apply(model, plan, cands, data)
            after = nnslim.profile(m, x, memory=False)
            field = "macs" if metric == "macs" else "param_bytes"
            measured = getattr(after, field) / getattr(before, field)
            assert measured == pytest.approx(table.cost_of(plan) / table.total, rel=1e-9)
            assert measured <= fraction * (1 + 1e-9)
            with torch.no_grad():
                assert m(x).shape == (8, 10)


@dataclasses.dataclass(frozen=True)
class ZeroColumns(nnslim.Transform):
    """A user's transform: the selected layers' input columns ``cols`` set to zero."""

    cols: tuple[int, ...] = ()
    select: Any = None

    def _apply(self, model, ctx, report):
        eligible = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        for path, _ in self.resolve(model, self.select, eligible=eligible):
            with torch.no_grad():
                model.get_submodule(path).weight[:, list(self.cols)] = 0
            report.changed(path, "columns zeroed")


def test_the_removal_estimate_is_the_empirical_fisher_of_the_readers_inputs():
    """A removal's estimate is ``1/2 * N / B^2 * sum over samples of (sum over the removed
    channels of x * dL/dx)^2`` at the layer reading them (N samples in B batches): checked
    against autograd on the calibration loss (the batches' labels)."""
    model, data = _cnn()
    table = nnslim.Auto(target={"bytes": 0.5}, candidates=CHANNELS).table(model, data)
    group = table.groups["fc1"]
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, a):
        seen["x"] = a[0].detach().requires_grad_()
        return (seen["x"],)

    for setting in CHANNELS:
        gone = group.removed[setting]
        total, n = 0.0, 0
        for x, y in data:
            h = model.fc2.register_forward_pre_hook(grab)
            try:
                loss = F.cross_entropy(model(x), y)
            finally:
                h.remove()
            (g,) = torch.autograd.grad(loss, [seen["x"]])
            z = (seen["x"].detach() * g)[:, gone].sum(1)
            total += float(z.pow(2).sum())
            n += x.shape[0]
        want = 0.5 * n / len(data) ** 2 * total
        assert group.settings[setting][1] == pytest.approx(want, rel=1e-4)


def test_the_removal_estimate_follows_the_measured_loss_closer_than_k_fac():
    """On a trained classifier, removing a quarter and half of the first layer's channels:
    the estimate is within 1.5x of the loss measured on the calibration batches, where
    K-FAC's factored form of the same change (the reader's columns zeroed, through the
    per-layer path) is 3x below at a quarter: its diagonal output factor misses how a removal
    moves every output at once."""
    from tests.transforms.test_auto import _loss, _trained

    model, data = _trained()
    base = _loss(model, data)
    table = nnslim.Auto(target={"bytes": 0.5}, candidates=CHANNELS).table(model, data)
    group = table.groups["a"]
    for setting in CHANNELS:
        m = _apply(model, {"a": setting}, CHANNELS, data)
        measured = _loss(m, data) - base
        est = group.settings[setting][1]
        zero = ZeroColumns(cols=tuple(group.removed[setting]))
        per_layer = nnslim.Auto(target={"bytes": 0.99}, candidates=(zero,), select=["b"])
        kfac = {n: v for n, _, v in per_layer.table(model, data).options["b"]}[repr(zero)]
        assert measured / 1.5 < est < measured * 1.5
        if setting == "channels-0.25":  # K-FAC's factored form: 3x below
            assert kfac < measured / 2


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mlps_and_heads_in_a_transformer_are_groups_and_the_hidden_width_is_left(kv_heads):
    """In a Llama, each MLP's hidden units (gate, up, down) and each attention's heads (the
    query rows, the key/value rows without GQA, the output projection's columns) are groups
    with the layers' own settings in them; the hidden width (through the RMSNorms and the
    embedding) is left and said. The heads removed are the ones Prune removes; a plan below
    what int4 alone reaches prunes some groups and meets its bytes exactly."""
    transformers = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    cfg = llama_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads)
    model = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (2, 16), generator=g) for _ in range(2)]
    cands = ("channels-0.25", "channels-0.5", "int8", "int4-g32")
    table = nnslim.Auto(target={"bytes": 0.35}, candidates=cands).table(model, data)
    mlp, att = "model.layers.0.mlp", "model.layers.0.self_attn"
    assert table.groups[f"{mlp}.gate_proj"].members == [
        f"{mlp}.gate_proj",
        f"{mlp}.up_proj",
        f"{mlp}.down_proj",
    ]
    kv = [f"{att}.k_proj", f"{att}.v_proj"] if kv_heads == 4 else []
    assert table.groups[f"{att}.q_proj"].members == [f"{att}.q_proj", *kv, f"{att}.o_proj"]
    if kv_heads == 2:  # GQA: keys and values stay, chosen one by one
        assert f"{att}.k_proj" in table.options
    why = table.unavailable[f"{att}.o_proj"]["channels-0.5"]
    assert "Norm" in why or "Embedding" in why
    hd = model.config.head_dim
    for setting in ("channels-0.25", "channels-0.5"):
        m = _apply(model, {f"{att}.q_proj": setting}, cands, data)
        gone = table.groups[f"{att}.q_proj"].removed[setting]
        kept = [h * hd + d for h in range(4) if h not in gone for d in range(hd)]
        assert torch.equal(
            m.get_submodule(f"{att}.q_proj").weight,
            model.get_submodule(f"{att}.q_proj").weight[kept],
        )
        assert torch.equal(
            m.get_submodule(f"{att}.o_proj").weight,
            model.get_submodule(f"{att}.o_proj").weight[:, kept],
        )
    low = table.smallest() + 0.01  # below what int4 alone reaches: some groups lose channels
    plan = table.allocate(low)
    m = copy.deepcopy(model)
    report = nnslim.Auto(plan=plan, candidates=cands).apply(m, data[0], calibration=data)
    assert report.after.param_bytes / report.before.param_bytes == pytest.approx(
        table.cost_of(plan) / table.total, rel=1e-9
    )
    assert report.after.param_bytes / report.before.param_bytes <= low * (1 + 1e-9)
    assert any(n.startswith("channels") for n in plan.values())
    with torch.no_grad():
        assert torch.isfinite(m(data[0]).logits).all()


def test_a_plan_with_settings_round_trips_and_scales_steer_the_search():
    """A plan naming a channel setting with the root's own option applies both; the Auto
    round-trips JSON with it; a large scale on a group's root (how ``compress`` corrects an
    estimate after measuring) moves the search to low rank instead."""
    model, data = _cnn()
    cands = (*CHANNELS, "int8")
    plan = {"fc1": "channels-0.5+int8", "fc2": "int8"}
    auto = nnslim.Auto(plan=plan, candidates=cands)
    assert nnslim.Transform.from_json(auto.to_json()) == auto
    m = _apply(model, plan, cands, data)
    assert m.fc1.out_features == 24 and m.fc2.in_features == 24
    assert {type(m.fc1).__name__, type(m.fc2).__name__} == {"Int8Linear"}
    cands = (*CHANNELS, "rank-0.5")  # low rank reaches the budget too
    table = nnslim.Auto(target={"macs": 0.5}, candidates=cands).table(model, data)
    plain = table.allocate(0.7)
    assert any(n.startswith("channels") for n in plain.values())
    root = next(p for p, n in plain.items() if n.startswith("channels"))
    steered = table.allocate(0.7, scale={root: 1e6})
    assert not steered.get(root, "keep").startswith("channels")


def test_bad_channel_candidates_and_budgets_are_refused_before_any_change():
    model, data = _cnn()
    before = model_state(model)
    for bad in (
        nnslim.Prune(macs=0.5),
        nnslim.Prune(structure="2:4"),
        nnslim.Prune(ratio=0.3, select=["c1"]),
        nnslim.Prune(ratio=0.3, steps=2),
    ):
        with pytest.raises(ValueError, match="(channel|sparsity) candidate"):
            nnslim.Auto(target={"bytes": 0.5}, candidates=(bad,))
    with pytest.raises(ValueError, match="not among the candidates"):
        nnslim.Auto(plan={"c1": "channels-0.5+int3"}, candidates=CHANNELS)
    assert_same_state(before, model_state(model), "after refusals")
    # a Prune of the user's own (its importance and ratio) is a channel candidate too
    own = nnslim.Prune(ratio=0.4, importance="l2")
    table = nnslim.Auto(target={"macs": 0.8}, candidates=(own,)).table(model, data)
    assert repr(own) in table.groups["c1"].settings


def test_a_depthwise_convolution_inside_a_group_shrinks_with_it():
    """An inverted-residual shape (expand, depthwise, project): the expanded channels pass
    through the depthwise convolution and its BatchNorm, which map each channel to itself,
    so the group expand -> project is searched and they shrink with it; the predicted MACs
    and bytes are the profiler's after applying."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 8, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 3, 10, 10, generator=g), torch.randint(0, 4, (4,), generator=g))
        for _ in range(2)
    ]
    x = data[0][0]
    for metric, field in (("macs", "macs"), ("bytes", "param_bytes")):
        table = nnslim.Auto(target={metric: 0.5}, candidates=CHANNELS).table(model, data)
        assert table.chains() == [["0", "6"]]  # 6 reads the expansion, writes the projection
        assert table.groups["0"].members == ["0"]
        assert table.groups["6"].members == ["6", "9"]
        for plan in ({"0": "channels-0.5"}, {"0": "channels-0.5", "6": "channels-0.25"}):
            m = _apply(model, plan, CHANNELS, data)
            assert m[3].groups == m[3].in_channels == m[3].out_channels == 16
            before = getattr(nnslim.profile(model, x, memory=False), field)
            after = getattr(nnslim.profile(m, x, memory=False), field)
            assert after / before == pytest.approx(table.cost_of(plan) / table.total, rel=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_transformers_under_a_macs_budget_get_the_macs_predicted(family):
    """The predicted MACs are the profiler's after applying on GPT-2 (Conv1D MLPs: a per-layer
    ratio on them was dropped before, the plan silently not pruned), BERT and Llama (a
    head's own products, scores and weighted values, fall with it)."""
    transformers = pytest.importorskip("transformers")
    from tests import zoo

    torch.manual_seed(0)
    cls, cfg = {
        "gpt2": (transformers.GPT2LMHeadModel, zoo.gpt2_config()),
        "bert": (transformers.BertForMaskedLM, zoo.bert_config()),
        "llama": (transformers.LlamaForCausalLM, zoo.llama_config()),
    }[family]
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (2, 12), generator=g) for _ in range(2)]
    cands = (*CHANNELS, "rank-0.5")
    table = nnslim.Auto(target={"macs": 0.6}, candidates=cands).table(model, data)
    plan = table.allocate(0.6)
    assert any(n.startswith("channels") for n in plan.values())
    m = copy.deepcopy(model)
    report = nnslim.Auto(plan=plan, candidates=cands).apply(m, data[0], calibration=data)
    assert report.after.macs / report.before.macs == pytest.approx(
        table.cost_of(plan) / table.total, rel=1e-9
    )


def test_a_latency_budget_times_each_groups_layers_pruned(monkeypatch):
    """Under {"latency": f} a group's layers are timed on copies pruned to each setting, on
    their inputs narrowed to the channels left, and its BatchNorms alone on what they
    receive in a forward; with a deterministic clock (each leaf's MACs, int8-dynamic at half)
    the predicted time of the plan is the clock's after applying it."""
    import nnslim.transforms.auto as auto_mod
    from tests.transforms.test_auto import _fake_clock

    monkeypatch.setattr(auto_mod, "_time_ms", _fake_clock)
    model, data = _cnn()
    x = data[0][0]
    cands = (*CHANNELS, "int8-dynamic")
    table = nnslim.Auto(target={"latency": 0.5}, candidates=cands).table(model, data, x)
    assert table.metric_name == "latency" and set(table.groups) == {"c1", "c2", "fc1"}
    assert table.total == pytest.approx(_fake_clock(model, x))
    chained = {"c1": "channels-0.5", "c2": "channels-0.25", "fc1": "channels-0.25+int8-dynamic"}
    for budget in (0.5, 0.7, chained):
        plan = table.allocate(budget) if isinstance(budget, float) else budget
        assert any(v.startswith("channels") for v in plan.values()), plan
        budget = table.cost_of(plan) / table.total if isinstance(budget, dict) else budget
        m = _apply(model, plan, cands, data)
        measured = _fake_clock(m, x) / table.total
        assert measured == pytest.approx(table.cost_of(plan) / table.total, abs=1e-6)
        assert measured <= budget + 1e-6


def test_a_latency_budget_prices_mlp_units_and_heads_in_a_transformer(monkeypatch):
    """The same on a Llama: the attention timed alone on the keyword arguments it receives
    (position embeddings, mask), its projections pruned to each setting; with the
    deterministic clock the plan's predicted time is the clock's after applying it."""
    transformers = pytest.importorskip("transformers")
    import nnslim.transforms.auto as auto_mod
    from tests.transforms.test_auto import _fake_clock
    from tests.zoo import llama_config

    monkeypatch.setattr(auto_mod, "_time_ms", _fake_clock)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=2)).eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (2, 12), generator=g) for _ in range(2)]
    cands = (*CHANNELS, "int8-dynamic")
    table = nnslim.Auto(target={"latency": 0.6}, candidates=cands).table(model, data, data[0])
    assert "model.layers.0.self_attn.q_proj" in table.groups
    plan = table.allocate(0.6)
    assert any(n.startswith("channels") for n in plan.values())
    m = _apply(model, plan, cands, data)
    assert _fake_clock(m, data[0]) / table.total == pytest.approx(
        table.cost_of(plan) / table.total, abs=1e-6
    )


def test_a_latency_budget_with_channels_runs_on_the_real_clock():
    """On this machine's clock (no threshold on times: the machine is shared): every setting
    timed, and the plan within the budget it predicts."""
    model, data = _cnn()
    table = nnslim.Auto(target={"latency": 0.8}, candidates=CHANNELS).table(model, data, data[0][0])
    assert table.groups and all(c > 0 for g in table.groups.values() for _, c, _ in g.choices())
    budget = max(0.8, table.smallest())
    plan = table.allocate(budget)
    assert table.cost_of(plan) <= budget * table.total * (1 + 1e-9)


def test_a_latency_table_leaves_a_training_model_as_it_was():
    model, data = _cnn()
    model.train()
    before = model_state(model)
    nnslim.Auto(target={"latency": 0.8}, candidates=CHANNELS).table(model, data, data[0][0])
    assert model.training
    assert_same_state(before, model_state(model), "after the latency table")


def test_a_chain_of_groups_is_allocated_as_well_as_every_plan_tried():
    """c1 -> c2 -> fc1 is one chain: c2's options are measured at both its groups' settings
    (its rows and columns pruned), and the allocation at each budget has the least estimated
    loss among every plan of the chain (27 channel settings x each layer kept or int8) whose
    predicted cost fits; each applied plan costs what was predicted (bytes, exactly)."""
    import itertools

    model, data = _cnn()
    x = data[0][0]
    cands = (*CHANNELS, "int8")
    table = nnslim.Auto(target={"bytes": 0.5}, candidates=cands).table(model, data)
    assert not table.options and table.chains() == [["c1", "c2", "fc1"]]
    c2 = table.groups["c2"]
    # c2 at its own 0.25 with c1 at 0.5: 24 of 32 rows, 8 of 16 columns, 3x3 fp32 weights + bias
    keep = [o for o in c2.joint["channels-0.5"]["channels-0.25"]["c2"] if o[0] == "keep"]
    assert keep[0][1] == (24 * 8 * 9 + 24) * 4
    plans = []
    settings = ["keep", *CHANNELS]
    for s1, s2, s3, *own in itertools.product(
        settings, settings, settings, *[["keep", "int8"]] * 4
    ):
        plan = {}
        for (path, s), o in zip((("c1", s1), ("c2", s2), ("fc1", s3), ("fc2", "keep")), own):
            name = "+".join(n for n in (s, o) if n != "keep")
            if name:
                plan[path] = name
        plans.append((table.cost_of(plan), table.loss_of(plan), plan))
    assert len(plans) == 27 * 16
    before = nnslim.profile(model, x, memory=False).param_bytes
    for fraction in (0.3, 0.45, 0.6, 0.8):
        best = min(v for c, v, _ in plans if c <= fraction * table.total)
        plan = table.allocate(fraction)
        assert table.loss_of(plan) == pytest.approx(best, rel=1e-9, abs=1e-12)
        m = _apply(model, plan, cands, data)
        after = nnslim.profile(m, x, memory=False).param_bytes
        assert after / before == pytest.approx(table.cost_of(plan) / table.total, rel=1e-9)
    # the front is the chain's: at the smallest reachable every group is at half its channels
    smallest = table.allocate(table.smallest())
    assert {smallest[p].split("+")[0] for p in ("c1", "c2", "fc1")} == {"channels-0.5"}


class _Branches(nn.Module):
    """c0's channels are read by c1 and c2, each the root of a group of its own: a branch."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 10), nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.c0(x))
        a, b = F.relu(self.c1(x)).mean((2, 3)), F.relu(self.c2(x)).mean((2, 3))
        return self.fc1(a) + self.fc2(b)


def test_a_branch_is_left_with_its_reason_and_the_rest_still_searched():
    """c0's group would chain to two groups downstream: it is left, said; c1's and c2's
    groups are searched and the plan costs what was predicted."""
    torch.manual_seed(0)
    model = _Branches().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,))) for _ in range(2)]
    table = nnslim.Auto(target={"macs": 0.6}, candidates=CHANNELS).table(model, data)
    assert set(table.groups) == {"c1", "c2"}
    assert "no branches" in table.unavailable["c0"]["channels-0.25"]
    plan = table.allocate(0.8)
    assert plan
    m = _apply(model, plan, CHANNELS, data)
    x = data[0][0]
    after = nnslim.profile(m, x, memory=False).macs / nnslim.profile(model, x, memory=False).macs
    assert after == pytest.approx(table.cost_of(plan) / table.total, rel=1e-9)


class _InvertedResidual(nn.Module):
    """MobileNetV2's block shape, each convolution in a module of its own (expand, depthwise,
    project): the expansion's channels pass a depthwise convolution in another module."""

    def __init__(self, c: int = 8, e: int = 32):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class _Mobile(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_InvertedResidual(), _InvertedResidual())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_an_expansion_through_a_depthwise_convolution_in_another_module_is_pruned():
    """The plan's expansions are pruned as predicted: the depthwise convolution after each,
    in a module of its own, follows its channels. (Prune took it for a second writer of
    them, in another module, and left every expansion whole: MobileNetV2 measured 0.92x MACs
    for a 0.60 prediction.)"""
    torch.manual_seed(0)
    model = _Mobile().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,))) for _ in range(2)]
    x = data[0][0]
    table = nnslim.Auto(target={"macs": 0.6}, candidates=CHANNELS).table(model, data)
    roots = {"blocks.0.expand.0", "blocks.1.expand.0"}
    assert roots <= set(table.groups)
    plan = {r: "channels-0.5" for r in roots}
    m = _apply(model, plan, CHANNELS, data)
    for r in ("blocks.0", "blocks.1"):
        assert m.get_submodule(r).expand[0].out_channels == 16
        assert m.get_submodule(r).dw[0].groups == m.get_submodule(r).dw[0].out_channels == 16
        assert m.get_submodule(r).project[0].in_channels == 16
    before = nnslim.profile(model, x, memory=False).macs
    after = nnslim.profile(m, x, memory=False).macs
    assert after / before == pytest.approx(table.cost_of(plan) / table.total, rel=1e-9)


def test_a_selected_layer_prune_cannot_shrink_is_said(monkeypatch):
    """Prune never leaves a selected layer whole in silence: a group torch-pruning leaves
    whole (here: pruning made a no-op) is a skip with its reason; a group held by a layer
    excluded by name is refused, said."""
    import nnslim.transforms.prune as prune_mod

    torch.manual_seed(0)
    model = _Mobile().eval()
    x = torch.randn(2, 3, 8, 8)
    with monkeypatch.context() as mp:
        mp.setattr(prune_mod, "_prune_model", lambda *a, **k: None)
        report = nnslim.Prune(select={"blocks.0.expand.0": 0.5}).apply(model, x)
    why = {s.path: s.reason for s in report.skips}
    assert why["blocks.0.expand.0"].startswith("selected, but its channels all stayed")
    assert model.blocks[0].expand[0].out_channels == 32
    # the depthwise convolution excluded by name: the expansion cannot lose channels alone
    with pytest.raises(ValueError, match=r"together with blocks\.1\.dw\.0"):
        nnslim.Prune(select={"blocks.1.expand.0": 0.5}, exclude=["blocks.1.dw.0"]).apply(model, x)
    assert model.blocks[1].expand[0].out_channels == 32


def test_a_depthwise_convolution_writing_the_model_output_does_not_follow():
    """A depthwise convolution that produces the model's output keeps its width unless it is
    selected: the root whose channels it carries is refused, said (it followed the root and
    halved the output, in silence)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU())
    model.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    model.forward = lambda x: model.b(model.a(x))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"together with b\.0"):
        nnslim.Prune(select={"a.0": 0.5}).apply(model, x)
    assert model(x).shape == (2, 8, 8, 8)
