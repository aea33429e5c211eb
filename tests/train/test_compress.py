import dataclasses

import pytest
import torch
from torch import nn

import nnslim
from nnslim.train.loop import schedule
from tests.train.test_trainer import QUIET, accuracy, blobs


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )


def trained():
    m = mlp()
    nnslim.Trainer(lr=0.2, options=QUIET).fit(m, blobs(), epochs=5)
    return m


X = torch.randn(1, 8)


def test_schedule_splits_prune_geometrically():
    parts = schedule(nnslim.Prune(ratio=0.75), 2)
    assert [round(p.ratio, 4) for p in parts] == [0.5, 0.5]
    parts = schedule(nnslim.Compose([nnslim.Prune(macs=0.25), nnslim.Quantize()]), 2)
    assert [type(p).__name__ for p in parts] == ["Prune", "Prune", "Quantize"]
    assert parts[0].macs == pytest.approx(0.5)
    assert [
        p.ratio for p in schedule(nnslim.Prune(ratio=0.6, structure="unstructured"), 3)
    ] == pytest.approx([0.2, 0.4, 0.6])


def test_reaches_the_target_within_tolerance():
    m = trained()
    data = blobs()
    result = nnslim.compress(
        m,
        nnslim.Prune(macs=0.4),
        evaluate=lambda mm: accuracy(mm, data),
        target={"macs": 0.45},
        tolerance=0.2,
        example_inputs=X,
        steps=3,
    )
    assert result.reached
    assert len(result.history) <= 3 and all(h["kept"] for h in result.history)
    assert result.history[-1]["macs"] <= 0.45 * result.baseline["macs"]
    assert nnslim.profile(result.model, X).macs == result.history[-1]["macs"]
    assert nnslim.profile(m, X).macs == result.baseline["macs"]  # the caller's model as it was
    assert "target reached" in str(result)


def test_stops_when_the_metric_drops_too_far_and_keeps_the_best():
    m = trained()
    scores = iter([1.0, 0.95, 0.5, 0.4])  # baseline, step 1 ok, step 2 bad, halved retry bad
    result = nnslim.compress(
        m,
        nnslim.Prune(ratio=0.9),
        evaluate=lambda mm: next(scores),
        target={"params": 0.05},
        tolerance=0.1,
        example_inputs=X,
        steps=3,
    )
    assert not result.reached
    assert [h["kept"] for h in result.history] == [True, False, False]
    assert "ratio=0.268" in result.history[2]["transform"]  # the step was retried at half size
    assert nnslim.profile(result.model, X).params == result.history[0]["params"]


def test_every_transform_has_a_gentler_retry():
    assert nnslim.Factorize(params=0.6).gentler().params == pytest.approx(0.8)
    assert nnslim.Factorize(ratio=0.5).gentler().ratio == pytest.approx(0.75)
    assert nnslim.Factorize(rank=8).gentler().rank == 16
    assert nnslim.ShareWeights(clusters=16).gentler().clusters == 32
    q = nnslim.Quantize(scheme="int4", method="gptq", group_size=64).gentler()
    assert (q.scheme, q.method) == ("int8", "gptq")
    assert nnslim.Quantize(scheme="int8").gentler() is None
    assert nnslim.Prune(structure="2:4").gentler() is None
    assert nnslim.Prune(ratio=0.4).gentler().ratio == pytest.approx(0.2)
    assert nnslim.Prune(macs=0.4).gentler().macs == pytest.approx(0.7)
    assert nnslim.Compose([nnslim.Prune(ratio=0.4)]).gentler() is None  # split part by part


@dataclasses.dataclass(frozen=True)
class ScaleLast(nnslim.Transform):
    """A user's transform: scales the last layer's weight by ``factor``; in steps, by the
    ``steps``-th root each step; gentler: halfway to 1."""

    factor: float = 1.0

    def _apply(self, model, ctx, report):
        last = model[-1]
        last.weight = nn.Parameter(last.weight.detach() * self.factor)
        report.changed("4", "scaled", factor=self.factor)

    def split(self, steps):
        return [dataclasses.replace(self, factor=self.factor ** (1 / steps))] * steps

    def gentler(self):
        return dataclasses.replace(self, factor=(1 + self.factor) / 2)


def test_a_user_transform_is_stepped_and_adjusted():
    m = mlp()
    tried = []

    def evaluate(mm):  # the metric: how much of the last layer's weight is left
        with torch.no_grad():
            s = float(mm[-1].weight.abs().sum() / m[-1].weight.abs().sum())
        tried.append(round(s, 4))
        return s

    result = nnslim.compress(
        m,
        ScaleLast(factor=0.25),
        evaluate=evaluate,
        target={"params": 0.5},  # never reached: the transform removes no parameter
        tolerance=0.35,
        example_inputs=X,
        steps=2,
    )
    # split in two steps of 0.5: the first keeps 0.5 of the metric (a drop of 0.5 > 0.35),
    # so it is retried gentler, at 0.75 (drop 0.25); the second step again drops too far
    # (0.375 of the original), retried at 0.75 * 0.75 = 0.5625 (drop 0.44): the loop stops
    assert tried == [1.0, 0.5, 0.75, 0.375, 0.5625]
    assert [h["kept"] for h in result.history] == [False, True, False, False]
    assert [h["transform"] for h in result.history] == [
        "ScaleLast(factor=0.5)",
        "ScaleLast(factor=0.75)",
        "ScaleLast(factor=0.5)",
        "ScaleLast(factor=0.75)",
    ]
    assert torch.allclose(result.model[-1].weight, m[-1].weight * 0.75)
    assert not result.reached


def test_a_split_that_is_not_a_list_of_transforms_is_named():
    class Broken(ScaleLast):
        def split(self, steps):
            return None

    with pytest.raises(TypeError, match=r"Broken.split\(2\) returned None"):
        nnslim.compress(
            mlp(),
            Broken(),
            evaluate=lambda mm: 1.0,
            target={"params": 0.5},
            tolerance=0.1,
            example_inputs=X,
            steps=2,
        )


def test_a_failed_int4_step_is_retried_as_int8():
    m = trained()
    x = torch.randn(64, 8)
    with torch.no_grad():
        ref = m(x)

    def closeness(mm):  # 1 - relative output error: int4 loses 0.014, int8 0.002
        with torch.no_grad():
            return 1 - float((mm(x) - ref).norm() / ref.norm())

    result = nnslim.compress(
        m,
        nnslim.Quantize(scheme="int4", group_size=32, select=["2"]),
        evaluate=closeness,
        target={"bytes": 0.5},
        tolerance=0.006,
        example_inputs=X,
    )
    assert [h["kept"] for h in result.history] == [False, True]
    assert "int4" in result.history[0]["transform"] and "int4" not in result.history[1]["transform"]
    assert result.reached
    assert type(result.model[2]).__name__ == "Int8Linear"
    assert type(m[2]) is nn.Linear  # the caller's model as it was


def test_fine_tunes_between_steps():
    m = trained()
    data = blobs()
    calls = []

    class Spy(nnslim.Trainer):
        def fit(self, model, data, **kw):
            calls.append(1)
            return super().fit(model, data, **kw)

    nnslim.compress(
        m,
        nnslim.Prune(ratio=0.5),
        evaluate=lambda mm: accuracy(mm, data),
        target={"macs": 0.3},
        tolerance=1.0,
        example_inputs=X,
        steps=2,
        trainer=Spy(lr=0.1, options=QUIET),
        train_data=data,
    )
    assert len(calls) == 2


def test_target_already_met_returns_at_once():
    m = mlp()
    result = nnslim.compress(
        m,
        nnslim.Prune(ratio=0.5),
        evaluate=lambda mm: 1.0,
        target={"macs": 1.0},
        tolerance=0.0,
        example_inputs=X,
    )
    assert result.reached and result.history == []


def test_bytes_is_an_alias_of_param_bytes():
    m = mlp()
    result = nnslim.compress(
        m,
        nnslim.Quantize(scheme="int8"),
        evaluate=lambda mm: 1.0,
        target={"bytes": 0.5},
        tolerance=0.0,
        example_inputs=X,
    )
    assert result.reached
    assert result.history[-1]["param_bytes"] <= 0.5 * result.baseline["param_bytes"]


def test_bad_arguments():
    m = mlp()
    kw = dict(evaluate=lambda mm: 1.0, example_inputs=X)
    with pytest.raises(
        ValueError, match=r"tolerance=...\): expected a number in \[0.0, inf\), got -0.1"
    ):
        nnslim.compress(m, nnslim.Prune(ratio=0.5), target={"macs": 0.5}, tolerance=-0.1, **kw)
    with pytest.raises(ValueError, match="unknown key 'flops'"):
        nnslim.compress(m, nnslim.Prune(ratio=0.5), target={"flops": 0.5}, tolerance=0.1, **kw)
    with pytest.raises(ValueError, match="needs train_data"):
        nnslim.compress(
            m,
            nnslim.Prune(ratio=0.5),
            target={"macs": 0.5},
            tolerance=0.1,
            trainer=nnslim.Trainer(),
            **kw,
        )


def test_plot_needs_matplotlib_or_draws(tmp_path):
    m = trained()
    result = nnslim.compress(
        m,
        nnslim.Prune(ratio=0.5),
        evaluate=lambda mm: 1.0,
        target={"macs": 0.5},
        tolerance=0.1,
        example_inputs=X,
        steps=1,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            result.plot()
        return
    result.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_schedule_halves_share_weights_clusters_down_to_the_target():
    parts = schedule(nnslim.ShareWeights(clusters=16), 3)
    assert [p.clusters for p in parts] == [64, 32, 16]
    assert len(schedule(nnslim.ShareWeights(clusters=16, select={"0": 8}), 3)) == 1
    assert len(schedule(nnslim.ShareWeights(clusters=16, across_layers="auto"), 3)) == 1


def test_share_weights_in_steps_stops_at_the_first_step_that_meets_the_target():
    m = trained()
    data = blobs()
    result = nnslim.compress(
        m,
        nnslim.ShareWeights(clusters=4),
        evaluate=lambda mm: accuracy(mm, data),
        target={"bytes": 0.21},  # 64 clusters keep 0.25 of the bytes, 32 keep 0.20 (float biases)
        tolerance=0.5,
        example_inputs=X,
        steps=5,
    )
    assert result.reached
    assert [h["transform"] for h in result.history] == [
        "ShareWeights(clusters=64)",
        "ShareWeights(clusters=32)",
    ]
    assert {mod.clusters for mod in result.model.modules() if hasattr(mod, "clusters")} == {32}


def test_a_failed_share_step_whose_retry_cannot_apply_keeps_the_best():
    m = trained()
    scores = iter([1.0, 1.0, 0.0])  # baseline, 8 clusters fine, 4 clusters too far
    result = nnslim.compress(
        m,
        nnslim.ShareWeights(clusters=4),
        evaluate=lambda mm: next(scores),
        target={"bytes": 0.01},
        tolerance=0.1,
        example_inputs=X,
        steps=2,
    )
    # the retry (8 clusters again) has nothing left to do: the 8-cluster model is the result
    assert not result.reached
    assert [h["kept"] for h in result.history] == [True, False]
    assert {mod.clusters for mod in result.model.modules() if hasattr(mod, "clusters")} == {8}


def test_schedule_splits_factorize_geometrically():
    parts = schedule(nnslim.Factorize(params=0.49), 2)
    assert [round(p.params, 4) for p in parts] == [0.7, 0.7]
    assert [round(p.ratio, 4) for p in schedule(nnslim.Factorize(ratio=0.25), 2)] == [0.5, 0.5]
    assert len(schedule(nnslim.Factorize(rank=4), 3)) == 1
    assert len(schedule(nnslim.Factorize(energy=0.9), 3)) == 1


def test_factorize_in_steps_lowers_ranks_until_the_target():
    m = trained()
    data = blobs()
    result = nnslim.compress(
        m,
        nnslim.Factorize(params=0.3, select=["2"]),
        evaluate=lambda mm: accuracy(mm, data),
        target={"params": 0.6},
        tolerance=0.5,
        example_inputs=X,
        steps=3,
    )
    assert result.reached and len(result.history) >= 2
    assert all(h["params"] < prev["params"] for prev, h in zip(result.history, result.history[1:]))
    best = result.model
    assert type(best[2]).__name__ == "FactorizedLinear" and type(best[2].first) is nn.Linear


def test_a_share_step_that_does_not_apply_is_skipped_with_a_note():
    """With codebooks of 64 weights, the first steps (256 and 128 clusters) cannot apply; the
    loop notes them and goes on to the steps that do."""
    m = trained()
    data = blobs()
    result = nnslim.compress(
        m,
        nnslim.ShareWeights(clusters=16, granularity="channel", select=["2"]),
        evaluate=lambda mm: accuracy(mm, data),
        target={"bytes": 0.01},
        tolerance=0.5,
        example_inputs=X,
        steps=5,
    )
    assert [h["transform"] for h in result.history][:1] == [
        "ShareWeights(clusters=64, granularity='channel', select=['2'])"
    ]
    assert len(result.notes) == 2 and "clusters=256" in result.notes[0]
    assert result.model[2].clusters == 16
    assert "note: ShareWeights(clusters=256" in str(result)


def cnn64():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 4),
    )  # fmt: skip


def test_steps_to_a_macs_target_end_at_it_not_below():
    """Each step is aimed from where the model is along the geometric path to ``target`` of
    the model before the first step, in the steps left, not at ``target ** (1 / steps)`` of
    the model it is given: the channel rounding of one step is not carried into the next, so
    three steps to half the MACs end at half (0.499 here), where compounding them ended at
    0.456 (and five at 0.436)."""
    model = cnn64()
    x = torch.randn(1, 3, 16, 16)
    result = nnslim.compress(
        model,
        nnslim.Prune(macs=0.5),
        evaluate=lambda m: 0.0,
        target={"macs": 0.5},
        tolerance=1.0,
        example_inputs=x,
        steps=3,
    )
    fractions = [h["macs"] / result.baseline["macs"] for h in result.history]
    assert result.reached and len(fractions) == 3
    # each step at its point of the geometric path, the last at the target
    for k, f in enumerate(fractions, 1):
        assert 0.5 ** (k / 3) - 0.04 <= f <= 0.5 ** (k / 3) + 1e-9, fractions
    assert fractions[-1] >= 0.49


def test_a_compose_part_with_a_target_is_aimed_and_auto_plans_step_through():
    model = cnn64()
    x = torch.randn(1, 3, 16, 16)
    kw = dict(evaluate=lambda m: 0.0, tolerance=1.0, example_inputs=x, steps=3)
    result = nnslim.compress(
        model,
        nnslim.Compose([nnslim.Prune(macs=0.5), nnslim.Quantize()]),
        target={"macs": 0.5},
        **kw,
    )
    assert result.history[-1]["macs"] / result.baseline["macs"] >= 0.49
    # an Auto with a plan and no target of its own is one step (its _target raises)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    auto = nnslim.Auto(plan={"0": "int8"}, candidates=("int8",))
    out = nnslim.compress(
        mlp, [auto], target={"param_bytes": 0.9}, evaluate=lambda m: 0.0, tolerance=1.0,
        example_inputs=torch.randn(2, 8), calibration=[torch.randn(4, 8)],
    )  # fmt: skip
    assert out.reached
