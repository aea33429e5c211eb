"""SparseGPT: pruned weights exactly zero, the rest updated to reconstruct each layer's output;
unstructured and N:M; through Prune on Linear and Hugging Face Conv1D layers."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.testing import assert_same_state, model_state
from nnslim.transforms.sparsegpt import sparsegpt


def _layer_data(rows=32, cols=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + mix)  # correlated inputs
    x[:, :4] *= 10  # a few large input channels, as in LLMs
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _out_err(w_new, w, x):
    return float(((x @ w_new.t()) - (x @ w.t())).norm() / (x @ w.t()).norm())


@settings(max_examples=15, deadline=None)
@given(
    sparsity=st.sampled_from([0.25, 0.5, 0.7]),
    seed=st.integers(0, 1000),
    block=st.sampled_from([16, 64, 128]),
)
def test_unstructured_zeros_exactly_and_beats_masks_without_update(sparsity, seed, block):
    w, x = _layer_data(seed=seed)
    new, keep, _ = sparsegpt(w, x.t() @ x, sparsity=sparsity, block_size=block)
    assert bool((new[~keep] == 0).all())
    # each mask-selection block loses its share
    for i in range(0, 64, block):
        part = keep[:, i : i + block]
        assert int((~part).sum()) == int(part.numel() * sparsity)
    # the OBS update reconstructs the output better than the magnitude and Wanda masks alone
    k = int(w.numel() * sparsity)
    by_mag = w.abs().flatten().argsort()[:k]
    mag = w.clone().flatten()
    mag[by_mag] = 0
    wanda = w * (w.abs() * x.norm(dim=0)[None, :]).argsort(dim=1).argsort(dim=1).ge(
        int(64 * sparsity)
    )
    err = _out_err(new, w, x)
    assert err < _out_err(mag.reshape(w.shape), w, x)
    assert err < _out_err(wanda, w, x)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_n_of_m_keeps_n_in_every_group(n, m):
    w, x = _layer_data()
    new, keep, _ = sparsegpt(w, x.t() @ x, nm=(n, m))
    groups = keep.reshape(w.shape[0], -1, m)
    assert bool((groups.sum(-1) == n).all())
    assert bool((new[~keep] == 0).all())
    plain = w.clone()
    scores = (w.abs() * x.norm(dim=0)[None, :]).reshape(w.shape[0], -1, m)
    drop = scores.topk(m - n, dim=2, largest=False).indices
    plain = plain.reshape(w.shape[0], -1, m).scatter(2, drop, 0.0).reshape(w.shape)
    assert _out_err(new, w, x) < _out_err(plain, w, x)


def test_weights_pruned_before_stay_pruned():
    w, x = _layer_data()
    prior = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.3
    new, keep, _ = sparsegpt(w * prior, x.t() @ x, sparsity=0.5, keep=prior)
    assert not bool((keep & ~prior).any())  # nothing comes back
    assert bool((new[~prior] == 0).all())
    assert abs(float((~keep).float().mean()) - 0.5) < 0.01


def test_a_dead_input_channel_and_a_singular_hessian():
    w, x = _layer_data()
    x[:, 7] = 0  # never active
    new, keep, _ = sparsegpt(w, x.t() @ x, sparsity=0.5)
    assert torch.isfinite(new).all()
    # fewer rows than columns: rank-deficient, damping makes it invertible
    new, _, _ = sparsegpt(w, x[:8].t() @ x[:8], sparsity=0.5)
    assert torch.isfinite(new).all()
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt(w, torch.full((64, 64), float("nan")), sparsity=0.5)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def test_prune_sparsegpt_through_the_transform():
    model = _mlp()
    w, x = _layer_data(n=512)
    x = x * 0.1
    ref = model(x).detach()
    errs = {}
    for imp in ("wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        report = nnslim.Prune(structure="unstructured", ratio=0.5, importance=imp).apply(
            m, calibration=[x[:256], x[256:]]
        )
        errs[imp] = float((m(x) - ref).norm() / ref.norm())
        for i in (0, 2):
            assert torch.equal(m[i].weight == 0, ~m[i].weight_mask)  # zeros are the mask
            assert abs(float((m[i].weight == 0).float().mean()) - 0.5) < 0.01
        assert [c.path for c in report.changes] == ["0", "2"]  # the output layer stays
    assert errs["sparsegpt"] < errs["wanda"]
    changed = report.changes[0]
    assert changed.details["calibration_rows"] == 512
    assert not any("fewer calibration rows" in n for n in report.notes)
    few = nnslim.Prune(structure="unstructured", ratio=0.5, importance="sparsegpt").apply(
        copy.deepcopy(model), calibration=[x[:32]]
    )
    assert any(
        "fewer calibration rows (tokens) than inputs (0: 32 rows for 64" in n for n in few.notes
    )


def test_prune_sparsegpt_2_4_on_gpt2_conv1d_and_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.zoo import gpt2_config

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config()).eval()
    ids = [{"input_ids": torch.randint(0, 300, (2, 32))} for _ in range(4)]
    base = copy.deepcopy(model)
    nnslim.Prune(structure="2:4", importance="sparsegpt", select="re:.*mlp.*").apply(
        model, calibration=ids
    )
    fc = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in, out), groups along in
    groups = (fc.weight != 0).t().reshape(fc.weight.shape[1], -1, 4).sum(-1)
    assert bool((groups <= 2).all()) and torch.equal(fc.weight_mask, fc.weight != 0)
    assert not torch.equal(
        fc.weight[fc.weight_mask], base.transformer.h[0].mlp.c_fc.weight[fc.weight_mask]
    )
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", base)
    with torch.no_grad():
        assert torch.equal(back(**ids[0]).logits, model(**ids[0]).logits)


def test_bad_requests_and_the_model_untouched_on_failure():
    with pytest.raises(ValueError, match="structure='unstructured' or 'N:M'"):
        nnslim.Prune(ratio=0.5, importance="sparsegpt")
    with pytest.raises(ValueError, match="allocation='owl', not scope='global'"):
        nnslim.Prune(ratio=0.5, structure="unstructured", importance="sparsegpt", scope="global")
    model = _mlp()
    with pytest.raises(ValueError, match="calibration"):
        nnslim.Prune(ratio=0.5, structure="unstructured", importance="sparsegpt").apply(model)
    before = model_state(model)
    x = torch.randn(64, 64)
    x[:, 3] = float("nan")
    with pytest.raises(ValueError, match="module 0 .*not positive definite|NaN"):
        nnslim.Prune(ratio=0.5, structure="unstructured", importance="sparsegpt").apply(
            model, calibration=[x]
        )
    assert_same_state(before, model_state(model), "after a failed SparseGPT")
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="no Linear layer"):
        nnslim.Prune(
            ratio=0.5, structure="unstructured", importance="sparsegpt", select=["0"]
        ).apply(cnn, calibration=[torch.randn(2, 3, 8, 8)])


def test_sparse_and_int4_in_one_pass():
    """With a group size the kept weights are rounded to int4 inside SparseGPT's loop: the
    pruned weights are exactly the zero point's code, and the result beats pruning then
    rounding to nearest."""
    from nnslim.modules.quantized import Int4Linear, unpack_int4

    w, x = _layer_data(rows=32, cols=128)
    h = x.t() @ x
    new, keep, int4 = sparsegpt(w, h, nm=(2, 4), group_size=32)
    codes, scale, mn = int4
    zp = torch.round(-mn / scale)
    assert torch.equal(-zp * scale, mn)  # integer zero points
    z = zp.repeat_interleave(32, dim=1)
    assert bool((codes[~keep].float() == z[~keep]).all())
    layer = Int4Linear.from_codes(nn.Linear(128, 32), codes, scale, mn, 32, zero_point="integer")
    assert torch.equal(layer.dequantize(), new)
    assert bool((new[~keep] == 0).all())
    assert bool(((new != 0).reshape(32, -1, 4).sum(-1) <= 2).all())
    sparse_only, keep2, _ = sparsegpt(w, h, nm=(2, 4))
    rtn = Int4Linear.from_float(
        nn.Linear(128, 32), group_size=32, weight=sparse_only, zero_point="integer"
    )
    assert _out_err(new, w, x) < _out_err(rtn.dequantize(), w, x)
    assert bool((unpack_int4(layer.qweight) < 16).all())
    with pytest.raises(ValueError, match="must divide"):
        sparsegpt(w[:, :100], h[:100, :100], sparsity=0.5, group_size=32)


def test_prune_with_sparsegpt_int4_and_quantize_keeps_sparse_zeros(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nnslim.modules.quantized import Int4Linear
    from nnslim.transforms.importance import SparseGPT
    from tests.zoo import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    base = copy.deepcopy(model)
    ids = [{"input_ids": torch.randint(0, 300, (2, 32))} for _ in range(4)]
    report = nnslim.Prune(structure="2:4", importance=SparseGPT(int4_group_size=64)).apply(
        copy.deepcopy(model), calibration=ids
    )
    joint = copy.deepcopy(model)
    nnslim.Prune(structure="2:4", importance=SparseGPT(int4_group_size=64)).apply(
        joint, calibration=ids
    )
    up = joint.model.layers[0].mlp.up_proj
    assert isinstance(up, Int4Linear) and up.zero_point == "integer" and up.group_size == 64
    assert report.changes[0].details["bits"] == 4
    assert bool(((up.weight != 0).reshape(up.out_features, -1, 4).sum(-1) <= 2).all())
    nnslim.save(joint, tmp_path / "j.safetensors")
    back = nnslim.load(tmp_path / "j.safetensors", copy.deepcopy(base))
    with torch.no_grad():
        assert torch.equal(back(**ids[0]).logits, joint(**ids[0]).logits)
    # two passes: Quantize keeps a pruned model's zeros exactly with integer zero points
    # (RTN and GPTQ, whose updates go to kept weights only), and says when it cannot
    sparse = copy.deepcopy(model)
    nnslim.Prune(structure="2:4", importance="sparsegpt").apply(sparse, calibration=ids)
    mask = sparse.model.layers[0].mlp.up_proj.weight_mask
    for method in ("rtn", "gptq"):
        for zero_point in ("integer", "float"):
            m = copy.deepcopy(sparse)
            r = nnslim.Quantize(
                scheme="int4", group_size=32, method=method, zero_point=zero_point
            ).apply(m, calibration=ids)
            w = m.model.layers[0].mlp.up_proj.weight
            if zero_point == "integer":
                assert bool((w[~mask] == 0).all()), method
                assert not any("lose their exact zeros" in n for n in r.notes)
            else:
                assert any("lose their exact zeros" in n for n in r.notes)
    m = copy.deepcopy(sparse)
    nnslim.Quantize(scheme="int8", method="gptq").apply(m, calibration=ids)
    assert bool((m.model.layers[0].mlp.up_proj.weight[~mask] == 0).all())
