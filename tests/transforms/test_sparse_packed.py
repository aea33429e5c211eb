"""Prune(pack=True): sparse layers stored as their kept weights and a bitmask."""

import copy
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.sparse import SparseConv2d, SparseLinear, pack_bits, unpack_bits


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).eval()


X = torch.randn(4, 64)
IMG = torch.randn(2, 4, 8, 8)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 37), st.floats(0.0, 1.0))
def test_bits_round_trip_for_any_shape(rows, cols, p):
    keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * 100 + cols)) < p
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(rows * cols / 8)
    assert torch.equal(unpack_bits(packed, rows * cols).reshape(rows, cols), keep)


@pytest.mark.parametrize(
    "structure, ratio", [("2:4", None), ("unstructured", 0.5), ("unstructured", 0.8)]
)
def test_packed_layers_compute_what_the_masked_ones_do_in_fewer_bytes(structure, ratio):
    masked, packed = _mlp(), _mlp()
    nnslim.Prune(structure=structure, ratio=ratio).apply(masked, X)
    report = nnslim.Prune(structure=structure, ratio=ratio, pack=True).apply(packed, X)
    assert [c.details["packed"] for c in report.changes] == [True, True]
    assert isinstance(packed[0], SparseLinear) and isinstance(packed[2], SparseLinear)
    assert isinstance(packed[4], nn.Linear)  # the output layer, left as Prune leaves it
    with torch.no_grad():
        assert torch.equal(packed(X), masked(X))
        assert torch.equal(packed[2].weight, masked[2].weight)
        assert torch.equal(packed[2].mask, masked[2].weight_mask)
    a, b = nnslim.profile(masked, X), nnslim.profile(packed, X)
    # the same weights, the same sparsity, the same MACs: fewer bytes
    assert (a.params, a.macs) == (b.params, b.macs)
    assert a.sparsity == pytest.approx(b.sparsity, abs=1e-12)
    layer = packed[2]
    kept = layer.values.numel()
    assert b.modules["2"].param_bytes == kept * 4 + 128 * 128 // 8 + 128 * 4
    assert kept == (128 * 128 // 2 if ratio in (None, 0.5) else round(128 * 128 * 0.2))


def test_saved_and_loaded_packed_and_smaller_on_disk(tmp_path):
    masked, packed = _mlp(), _mlp()
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(masked, X)
    nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(packed, X)
    nnslim.save(packed, tmp_path / "p.safetensors")
    nnslim.save(masked, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "p.safetensors", _mlp())
    assert isinstance(back[2], SparseLinear)
    with torch.no_grad():
        assert torch.equal(back(X), packed(X))
    small, big = (os.path.getsize(tmp_path / f) for f in ("p.safetensors", "m.safetensors"))
    # fp32 values of half the weights and a bit each, against the weights and a byte each
    assert small < 0.5 * big


def test_training_updates_the_kept_weights_only():
    model = _mlp()
    nnslim.Prune(structure="2:4", pack=True).apply(model, X)
    mask = model[2].mask
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[2].weight
    for _ in range(3):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    after = model[2].weight
    assert torch.equal(after[~mask], torch.zeros_like(after[~mask]))
    assert not torch.equal(after[mask], before[mask])
    assert model[2].values.grad is not None and model[2].values.grad.shape == (128 * 128 // 2,)


def test_sparsifying_a_packed_model_again_keeps_it_packed_and_its_zeros():
    model = _mlp()
    nnslim.Prune(ratio=0.3, structure="unstructured", pack=True).apply(model, X)
    first = model[2].mask
    report = nnslim.Prune(ratio=0.6, structure="unstructured").apply(model, X)  # pack not asked
    assert isinstance(model[2], SparseLinear)
    assert [c.details["packed"] for c in report.changes] == [True, True]
    assert model[2].sparsity == pytest.approx(0.6, abs=1 / 128)
    assert not (model[2].mask & ~first).any()  # what was pruned stays pruned


def test_compress_steps_a_packed_prune_to_a_bytes_target():
    model = _mlp()
    result = nnslim.compress(
        model,
        nnslim.Prune(ratio=0.6, structure="unstructured", pack=True),
        example_inputs=X,
        target={"param_bytes": 0.6},
        evaluate=lambda m: 0.0,
        tolerance=1.0,
        steps=3,
    )
    assert result.reached
    assert isinstance(result.model[2], SparseLinear)
    p = nnslim.profile(result.model, X)
    assert p.param_bytes <= 0.6 * nnslim.profile(_mlp(), X).param_bytes


def test_channel_pruning_cuts_the_masks_of_masked_and_packed_layers():
    """torch-pruning shrinks parameters only: a masked layer's mask is cut with its weight
    (it kept its old shape before, and the next apply_masks failed), a packed one is
    unpacked, pruned and packed again."""
    masked = _mlp()
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(masked, X)
    packed = copy.deepcopy(masked)
    nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(packed, X)
    nnslim.Prune(ratio=0.25).apply(masked, X)
    nnslim.Prune(ratio=0.25).apply(packed, X)
    for i in (0, 2):
        assert masked[i].weight_mask.shape == masked[i].weight.shape == (96, 64 if i == 0 else 96)
        # the mask still marks the zeros: re-applying it changes nothing
        w = masked[i].weight.detach().clone()
        nnslim.apply_masks(masked)
        assert torch.equal(masked[i].weight, w)
        assert (w[~masked[i].weight_mask] == 0).all()
        assert isinstance(packed[i], SparseLinear)
        assert torch.equal(packed[i].mask, masked[i].weight_mask)
    with torch.no_grad():
        assert torch.equal(packed(X), masked(X))


def test_convolutions_pack_and_reflection_padding_keeps_its_mask_said():
    dense, model = _cnn(), _cnn()
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(dense, IMG)
    report = nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(model, IMG)
    assert isinstance(model[0], SparseConv2d)
    assert isinstance(model[2], nn.Conv2d) and hasattr(model[2], "weight_mask")
    assert any("2: kept dense with its mask" in n and "zero-padded" in n for n in report.notes)
    with torch.no_grad():
        assert torch.allclose(model(IMG), dense(IMG), atol=1e-6)
    back = model[0].to_dense()
    assert torch.equal(back.weight, dense[0].weight) and torch.equal(
        back.weight_mask, dense[0].weight_mask
    )


def test_hugging_face_conv1d_and_bf16_pack():
    tf = pytest.importorskip("transformers")
    cfg = tf.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100, n_positions=16)
    torch.manual_seed(0)
    ref = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    nnslim.Prune(structure="2:4").apply(ref, ids)
    for dtype in (torch.float32, torch.bfloat16):
        a = copy.deepcopy(ref).to(dtype)
        nnslim.Prune(structure="2:4", pack=True).apply(a, ids)
        fc = a.transformer.h[0].mlp.c_fc
        assert isinstance(fc, SparseLinear) and fc.values.dtype == dtype
        with torch.no_grad():
            assert torch.equal(a(ids).logits, copy.deepcopy(ref).to(dtype)(ids).logits)


def test_other_transforms_leave_packed_layers_and_say_why():
    for t in (
        nnslim.Quantize(scheme="int8"),
        nnslim.Factorize(ratio=0.5),
        nnslim.ShareWeights(clusters=16),
    ):
        model = _mlp()
        nnslim.Prune(structure="2:4", pack=True).apply(model, X)
        report = t.apply(model, X)
        assert [c.path for c in report.changes] == ["4"]
        why = {s.path: s.reason for s in report.skips}
        assert "packed sparse layer" in why["0"] and "without pack=True" in why["2"]


def test_pack_refuses_channels_and_compiles():
    with pytest.raises(ValueError, match="pack=True.*unstructured"):
        nnslim.Prune(ratio=0.5, pack=True)
    with pytest.raises(TypeError, match="pack"):
        nnslim.Prune(structure="2:4", pack="yes")
    model = _mlp()
    nnslim.Prune(structure="2:4", pack=True).apply(model, X)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(X), model(X), atol=1e-6)


def test_auto_searches_packed_sparsity_under_a_bytes_budget():
    model = _mlp()
    batches = [
        (torch.randn(32, 64, generator=torch.Generator().manual_seed(s)), torch.arange(32) % 10)
        for s in range(4)
    ]
    auto = nnslim.Auto(target={"bytes": 0.6}, candidates=("sparse-0.5", "sparse-2:4"))
    table = auto.table(copy.deepcopy(model), batches)
    for p in ("0", "2"):
        names = [n for n, _, _ in table.options[p]]
        assert names == ["keep", "sparse-0.5", "sparse-2:4"]
    plan = table.allocate(0.6)
    report = auto.apply(model, X, calibration=batches)
    assert any("sparsity candidates" in n for n in report.notes)
    after = nnslim.profile(model, X).param_bytes
    assert after == pytest.approx(table.cost_of(plan), rel=1e-9)
    assert after <= 0.6 * table.total
    assert all(isinstance(model.get_submodule(p), SparseLinear) for p in plan)


@pytest.mark.parametrize("importance", ["sparsegpt", "wanda"])
def test_a_candidate_measured_on_the_gram_is_what_prune_applies(importance):
    """The first layer's inputs are the calibration batches: the weight Auto prices is the one
    Prune writes (SparseGPT from the Hessian, Wanda from the input norms)."""
    from nnslim.base.inputs import calibration_batches
    from nnslim.core.calibrate import collect
    from nnslim.transforms.prune import sparsify_layer

    batches = [torch.randn(32, 64, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    model = _mlp()
    stats = collect(model, calibration_batches(model, batches), {"0": model[0]}, gram=True)
    gram = stats["0"].gram
    t = nnslim.Prune(structure="2:4", importance=importance, pack=True)
    probe = sparsify_layer(copy.deepcopy(model[0]), t, gram.float())
    nnslim.Prune(structure="2:4", importance=importance, pack=True, select=["0"]).apply(
        model, X, calibration=batches
    )
    assert isinstance(probe, SparseLinear)
    assert torch.equal(probe.mask, model[0].mask)
    assert torch.allclose(probe.weight, model[0].weight, atol=1e-5)


def test_auto_refuses_sparsity_where_it_saves_nothing():
    with pytest.raises(ValueError, match="save bytes only"):
        nnslim.Auto(target={"macs": 0.5}, candidates=("int8", "sparse-2:4"))
    with pytest.raises(ValueError, match="sparsity candidate.*pack=True"):
        nnslim.Auto(target={"bytes": 0.5}, candidates=(nnslim.Prune(structure="2:4"),))


def test_a_failed_prune_leaves_a_packed_model_as_it_was():
    model = _mlp()
    nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(model, X)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = model[2]
    with pytest.raises(ValueError, match="calibration"):
        nnslim.Prune(structure="2:4", importance="wanda").apply(model, X)  # unpacked, then fails
    assert model[2] is layer
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_sparsegpt_with_int4_is_not_packed_and_says_so():
    from nnslim.transforms.importance import SparseGPT

    model = _mlp()
    batches = [torch.randn(32, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    report = nnslim.Prune(
        structure="2:4", importance=SparseGPT(int4_group_size=32), pack=True
    ).apply(model, X, calibration=batches)
    assert type(model[2]).__name__ == "Int4Linear"
    assert any("2: int4" in n and "not packed" in n for n in report.notes)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruning_heads_and_mlp_units_cuts_masks_and_keeps_packed_layers_packed(family):
    """Heads and fused MLP units are pruned outside torch-pruning's groups: their layers'
    masks are cut there too (they kept their old shape, and the next apply_masks failed)."""
    tf = pytest.importorskip("transformers")
    from tests import zoo

    cls, cfg = {
        "llama": (tf.LlamaForCausalLM, zoo.llama_config(num_hidden_layers=1)),
        "gpt2": (tf.GPT2LMHeadModel, zoo.gpt2_config()),
    }[family]
    torch.manual_seed(0)
    base = cls(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    masked, packed = copy.deepcopy(base), copy.deepcopy(base)
    nnslim.Prune(ratio=0.5, structure="unstructured").apply(masked, ids)
    nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(packed, ids)
    nnslim.Prune(ratio=0.25).apply(masked, ids)
    nnslim.Prune(ratio=0.25).apply(packed, ids)
    layers = nnslim.modules.masks.masked_modules(masked)
    assert layers
    for p, m in layers:
        assert m.weight_mask.shape == m.weight.shape, p
        w = m.weight.detach().clone()
        assert (w[~m.weight_mask] == 0).all(), p
    nnslim.apply_masks(masked)  # the Trainer's step: no shape error
    for p, m in layers:
        other = packed.get_submodule(p)
        assert isinstance(other, SparseLinear), p
        assert torch.equal(other.mask, m.weight_mask.t() if family == "gpt2" else m.weight_mask)
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, masked(ids).logits, atol=1e-5)


def test_layers_read_by_weight_stay_dense_and_packing_that_saves_nothing_is_skipped():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    report = nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(layer, x)
    assert isinstance(layer.self_attn.out_proj, nn.Linear)  # MultiheadAttention reads .weight
    assert any("self_attn.out_proj: kept dense" in n for n in report.notes)
    assert isinstance(layer.linear1, SparseLinear)
    model = _mlp()
    report = nnslim.Prune(ratio=0.01, structure="unstructured", pack=True).apply(model, X)
    assert isinstance(model[2], nn.Linear)
    assert any("too few zeros" in n for n in report.notes)


def test_a_packed_layers_weight_carries_gradients_to_its_values():
    model = _mlp()
    nnslim.Prune(structure="2:4", pack=True).apply(model, X)
    (model[2].weight.sum() * 2).backward()
    g = model[2].values.grad
    assert g is not None and torch.equal(g, torch.full_like(g, 2.0))


def test_planning_a_packed_model_plans_its_dense_layers():
    model = _mlp()
    nnslim.Prune(ratio=0.5, structure="unstructured", pack=True).apply(model, X)
    plan = nnslim.Prune(ratio=0.25).plan(model, X)
    assert isinstance(model[2], SparseLinear)  # planning changes nothing
    assert plan is not None


def test_weight_decay_regularization_reaches_packed_layers():
    masked, packed = _mlp(), _mlp()
    nnslim.Prune(structure="2:4").apply(masked, X)
    nnslim.Prune(structure="2:4", pack=True).apply(packed, X)
    reg = nnslim.Regularization(l1=1e-3, l2=1e-2)
    a = nnslim.Trainer(regularization=reg)._penalty(masked)
    b = nnslim.Trainer(regularization=reg)._penalty(packed)
    assert float(b) == pytest.approx(float(a), rel=1e-6)  # the zeros add nothing to either
