"""Transforms on models with shared modules, tied weights, user hooks, meta tensors and NaN
weights: correct behaviour or a clear refusal, never silently wrong."""

import pytest
import torch
from torch import nn

import nnslim
from nnslim.base.modules import _HOOK_TABLES

X = torch.randn(5, 16)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )


REPLACING = {
    "int8": lambda: nnslim.Quantize(scheme="int8"),
    "factorize": lambda: nnslim.Factorize(rank=2),
    "share": lambda: nnslim.ShareWeights(clusters=4),
}


@pytest.mark.parametrize("name", list(REPLACING))
def test_a_module_used_at_two_paths_is_replaced_at_both(name):
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(16, 4))

    def stored(m):
        return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

    before = stored(model)
    REPLACING[name]().apply(model, X)
    assert model[0] is model[2] and type(model[0]) is not nn.Linear
    assert stored(model) < before  # grew when only the first use was replaced


@pytest.mark.parametrize("name", list(REPLACING))
def test_user_hooks_fire_on_the_replacement_and_their_handles_remove_them(name):
    model = _mlp()
    calls = []
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    pre = model[2].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    REPLACING[name]().apply(model, X)
    calls.clear()
    model(X)
    assert calls == [type(model[0]).__name__, "pre"]
    handle.remove()
    pre.remove()
    calls.clear()
    model(X)
    assert calls == []


def test_hook_tables_exist_upstream():
    # share_hooks moves these private tables of nn.Module; this fails when torch renames them
    m = nn.Linear(2, 2)
    for t in _HOOK_TABLES:
        assert isinstance(getattr(m, t), dict), t


def test_a_tie_the_transform_breaks_is_reported():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    model[2].weight = model[0].weight
    rep = nnslim.Quantize(scheme="int8").apply(model, X)
    assert any("were one shared parameter" in n and "0.weight, 2.weight" in n for n in rep.notes)
    rep = nnslim.Quantize(scheme="int8").apply(_mlp(), X)
    assert not any("shared parameter" in n for n in rep.notes)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nnslim.Quantize(scheme="int8"),
        lambda: nnslim.Factorize(ratio=0.5),
        lambda: nnslim.ShareWeights(clusters=4),
        lambda: nnslim.Prune(ratio=0.3),
    ],
)
def test_meta_models_are_refused_by_name(make):
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ValueError, match=r"0\.weight is on the meta device.*Prune\.plan"):
        make().apply(model, torch.randn(5, 16, device="meta"))


@pytest.mark.parametrize("structure", ["channels", "unstructured"])
def test_prune_refuses_nan_weights_and_leaves_the_model(structure):
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"module 2 \(Linear 32->16\) has NaN or Inf in weight"):
        nnslim.Prune(ratio=0.3, structure=structure).apply(model, X)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, state[k], equal_nan=True, rtol=0, atol=0)


def test_factorize_one_rank_skips_layers_smaller_than_it():
    model = _mlp()
    rep = nnslim.Factorize(rank=5).apply(model, X)
    skipped = {s.path: s.reason for s in rep.skips}
    assert "4" in skipped  # 16 -> 4: at most rank 4
    assert type(model[0]).__name__ == "FactorizedLinear"
    with pytest.raises(ValueError, match="at most 4"):  # an explicit per-layer rank is refused
        nnslim.Factorize(select={"4": 5}).apply(_mlp(), X)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nnslim.Quantize(scheme="int8-dynamic", smooth=0.5),
        lambda: nnslim.Prune(ratio=0.3, importance="wanda"),
        lambda: nnslim.Factorize(ratio=0.5, activation_aware=True),
    ],
)
def test_a_calibration_batch_of_the_wrong_shape_is_named(make):
    model = _mlp()
    with pytest.raises(ValueError, match=r"calibration batch 1 \(tensor shapes \[\(5, 7\)\]\)"):
        make().apply(model, X, calibration=[torch.randn(5, 16), torch.randn(5, 7)])


class _ChunkCat(nn.Module):
    """Chunks and splits joined again by concatenation, some around the whole tensor: the
    graphs that made torch-pruning's index mapping raise a TypeError or loop."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.c1(x)
        a, b = x.chunk(2, 1)
        y = {
            "conv-one-half": lambda: torch.cat([self.c2(a), b], 1),
            "swap": lambda: torch.cat([b, a], 1),
            "repeat": lambda: torch.cat([a, b, a], 1)[:, :16],
            "around-whole": lambda: torch.cat([a, x, b], 1)[:, 8:24],
            "sum-of-quarters": lambda: torch.cat(
                [x.chunk(4, 1)[0] + x.chunk(4, 1)[1], *x.chunk(4, 1)[2:], x.chunk(4, 1)[0]], 1
            ),
            "split-by-sizes": lambda: torch.cat(list(torch.split(x, [4, 12], 1))[::-1], 1),
        }[self.variant]()
        return self.c3(y)


@pytest.mark.parametrize(
    "variant",
    ["conv-one-half", "swap", "repeat", "around-whole", "sum-of-quarters", "split-by-sizes"],
)
def test_chunk_then_cat_prunes_or_keeps_with_a_reason(variant):
    torch.manual_seed(0)
    model, x = _ChunkCat(variant).eval(), torch.randn(1, 3, 8, 8)
    reference = model(x)
    rep = nnslim.Prune(ratio=0.5).apply(model, x)
    assert model(x).shape == reference.shape
    reasons = {s.path: s.reason for s in rep.skips}
    if model.c1.out_channels == 16:  # the group through the chunk stays, and says why
        assert "c1" in reasons
    else:
        assert torch.isfinite(model(x)).all()
