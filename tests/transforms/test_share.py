"""ShareWeights: k-means palettization with packed storage, and cross-layer sharing."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.base.inputs import as_inputs
from nnslim.core.calibrate import collect
from nnslim.modules.shared import (
    PalettizedConv2d,
    PalettizedLinear,
    bits_for,
    kmeans_1d,
    pack_bits,
    set_cache,
    unpack_bits,
)
from nnslim.testing import TransformCase, assert_same_state, model_state, parametrize_with_checks
from nnslim.transforms.share import ShareWeights
from tests.zoo import TinyCNN, TinyMLP


# -- models ------------------------------------------------------------------------------------
class Block(nn.Module):
    """A transformer-like block: MLP with a residual and a LayerNorm."""

    def __init__(self, d=16):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.down(torch.relu(self.up(x))))


class Stack(nn.Module):
    def __init__(self, n=4, d=16):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def make_stack():
    torch.manual_seed(0)
    return Stack().eval()


def make_cnn():
    torch.manual_seed(0)
    return TinyCNN()


def make_mlp():
    torch.manual_seed(0)
    return TinyMLP()


def near_copies(noise=(0.01, 0.02, 0.0, 0.03), center=2):
    """A Stack whose blocks are block ``center`` plus noise of the given sizes (one per block)."""
    m = make_stack()
    base = m.layers[center].state_dict()
    g = torch.Generator().manual_seed(1)
    for i, s in enumerate(noise):
        if i != center:
            m.layers[i].load_state_dict(
                {k: v + s * torch.randn(v.shape, generator=g) for k, v in base.items()}
            )
    return m


def params_of(module):
    return sum(p.numel() for p in module.parameters())


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


_G = torch.Generator().manual_seed(0)
X_STACK = torch.randn(4, 8, generator=_G)
X_CNN = torch.randn(2, 3, 12, 12, generator=_G)
X_MLP = torch.randn(4, 16, generator=_G)


# -- bit packing -------------------------------------------------------------------------------
@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip_any_width(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_a_little_endian_bit_stream():
    # 3-bit codes 5 (101), 3 (011), 7 (111): stream bits 101 110 111 (LSB first)
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [5 | 3 << 3 | (7 & 3) << 6, 7 >> 2]
    assert pack_bits(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]
    assert [bits_for(k) for k in (2, 16, 64, 256, 65536)] == [1, 4, 6, 8, 16]


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\] for 4 bits"):
        pack_bits(torch.tensor([3, 16]), 4)
    with pytest.raises(ValueError, match="bits must be an integer in"):
        pack_bits(torch.tensor([1]), 17)
    with pytest.raises(ValueError, match="cannot hold 9 codes"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), 4, 9)


# -- k-means -----------------------------------------------------------------------------------
def test_kmeans_is_deterministic_and_near_lloyd_max_on_gaussians():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    c1, i1 = kmeans_1d(x, 16, seed=3)
    c2, i2 = kmeans_1d(x, 16, seed=3)
    assert torch.equal(c1, c2) and torch.equal(i1, i2)
    assert torch.all(c1[0, 1:] > c1[0, :-1])  # sorted, distinct
    # the optimal 16-level quantizer of N(0, 1) has MSE 0.009497 (Lloyd-Max); k-means may stop
    # in a nearby local optimum
    mse = float((c1[0][i1[0]] - x).pow(2).mean())
    assert mse < 1.03 * 0.009497 * float(x.var())


def test_kmeans_weighting_pulls_centroids_to_important_values():
    x = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    plain, _ = kmeans_1d(x, 2)
    heavy, _ = kmeans_1d(x, 2, torch.tensor([1.0, 1.0, 100.0, 1.0, 1.0, 1.0]))
    assert plain.tolist() == [[1.0, 11.0]]
    assert heavy[0, 0] > 1.9 and heavy[0, 1] == 11.0


# -- modules -----------------------------------------------------------------------------------
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    distinct=st.integers(1, 16),
    clusters=st.integers(2, 64),
    group=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 1000),
)
def test_enough_clusters_reproduce_the_layer_exactly(out, inp, distinct, clusters, group, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(distinct, generator=g)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(values[torch.randint(0, distinct, (out, inp), generator=g)])
    per_book = min(group or out, out) * inp
    if clusters < min(distinct, per_book):
        clusters = min(distinct, per_book) + 1  # at least as many clusters as distinct values
    p = PalettizedLinear.from_float(lin, clusters, group_size=group)
    x = torch.randn(5, inp, generator=g)
    assert torch.equal(p.weight, lin.weight)
    with torch.no_grad():
        assert torch.equal(p(x), lin(x))


@given(
    c_in=st.integers(1, 3),
    c_mid=st.integers(1, 4),
    out=st.integers(1, 5),
    distinct=st.integers(1, 6),
    extra=st.integers(0, 2),
    with_zero=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", 2]),
    seed=st.integers(0, 1000),
)
def test_transform_is_exact_when_clusters_cover_the_distinct_values(
    c_in, c_mid, out, distinct, extra, with_zero, granularity, seed
):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(c_in, c_mid, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(c_mid * 16, out)
    )
    values = torch.randn(distinct, generator=g)
    if with_zero:
        values[0] = 0.0
    with torch.no_grad():
        for m in (model[0], model[3]):
            m.weight.copy_(values[torch.randint(0, distinct, m.weight.shape, generator=g)])
        x = torch.randn(2, c_in, 4, 4, generator=g)
        ref = model(x)
    clusters = max(2, distinct) + extra  # <= 8 <= weights per codebook (>= 9 per channel)
    report = ShareWeights(clusters=clusters, granularity=granularity).apply(model, x)
    assert report.touched == ["0", "3"] and not report.skips
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_transform_with_enough_clusters_leaves_outputs_unchanged(cnn):
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for m in cnn.modules():  # at most 8 distinct weight values per layer
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randint(-4, 4, m.weight.shape) / 8)
        ref = cnn(x)
    ShareWeights(clusters=8).apply(cnn, x)
    assert isinstance(cnn.conv2, PalettizedConv2d) and cnn.conv2.bits == 3
    with torch.no_grad():
        assert torch.equal(cnn(x), ref)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((4, 6, 3), {"padding": 1}),
        ((4, 6, 3), {"stride": 2, "groups": 2, "bias": False}),
        ((4, 4, 3), {"padding": 1, "padding_mode": "reflect"}),
        ((4, 6, 3), {"padding": "same", "dilation": 2}),
    ],
    ids=["plain", "grouped-strided", "reflect", "same-dilated"],
)
def test_output_equals_the_clustered_dense_layer(args, kwargs):
    conv = nn.Conv2d(*args, **kwargs)
    p = PalettizedConv2d.from_float(conv, 16, group_size=2)
    dense = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
    with torch.no_grad():
        dense.weight.copy_(p.weight)
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
        x = torch.randn(2, 4, 7, 7)
        assert torch.equal(p(x), dense(x))
    books = (conv.out_channels + 1) // 2
    assert p.codebook.shape == (books, 16) and len(p.weight.unique()) <= 16 * books


def test_hf_conv1d_becomes_a_palettized_linear():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(24, 16)  # (in 16, out 24)
    p = PalettizedLinear.from_float(conv1d, 512)  # 384 weights: all kept
    x = torch.randn(3, 16)
    assert (p.in_features, p.out_features, p.bits) == (16, 24, 9)
    assert torch.equal(p.weight, conv1d.weight.t())
    with torch.no_grad():
        assert torch.allclose(p(x), conv1d(x), atol=1e-6)


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    p = PalettizedLinear.from_float(lin, 8, group_size=4)  # two codebooks: rows 0-3, 4-5
    x = torch.randn(5, 12)
    (p(x) ** 2).sum().backward()
    dense = p.weight.detach().clone().requires_grad_(True)
    (nn.functional.linear(x, dense, p.bias.detach()) ** 2).sum().backward()
    group = (torch.arange(6) // 4)[:, None].expand(6, 12)
    flat = (group * 8 + p.codes()).reshape(-1)
    expected = torch.zeros(16).index_add_(0, flat, dense.grad.reshape(-1)).reshape(2, 8)
    assert torch.allclose(p.codebook.grad, expected, atol=1e-5)
    assert p.codebook.grad.abs().sum() > 0


def test_finetuning_moves_centroids_and_keeps_the_assignment():
    torch.manual_seed(0)
    p = PalettizedLinear.from_float(nn.Linear(16, 8), 4)
    codes, before = p.codes().clone(), p.codebook.detach().clone()
    opt = torch.optim.SGD(p.parameters(), lr=0.1)
    x, y = torch.randn(32, 16), torch.randn(32, 8)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((p(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(p.codebook.detach(), before) and torch.equal(p.codes(), codes)
    assert len(p.weight.unique()) <= 4


def test_cache_matches_and_follows_codebook_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    ShareWeights(clusters=16).apply(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        plain = model(x)
        assert set_cache(model, True) == 1
        assert torch.equal(model(x), plain)
        assert model[0].weight is model[0].weight  # served from the cache
        model[0].codebook.mul_(2)  # an optimizer step writes in place
        assert torch.allclose(model(x) - model[0].bias, 2 * (plain - model[0].bias), atol=1e-5)


# -- storage -----------------------------------------------------------------------------------
def conv_linear_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 64, 3, bias=False), nn.Flatten(), nn.Linear(64 * 4 * 4, 256, bias=False)
    ).eval()


def test_16_clusters_store_the_weights_over_7x_smaller(tmp_path):
    model = conv_linear_model()
    x = torch.randn(1, 16, 6, 6)
    before = nnslim.profile(model, x)
    nnslim.save(model, tmp_path / "dense.safetensors")
    report = ShareWeights(clusters=16).apply(model, x)
    after = nnslim.profile(model, x)
    weights = 64 * 16 * 9 + 1024 * 256
    assert before.param_bytes == 4 * weights
    # 4 bits per weight plus a 16-entry float32 codebook per layer
    assert after.param_bytes == weights // 2 + 2 * 16 * 4
    assert before.param_bytes / after.param_bytes > 7.9
    assert after.params == weights + 2 * 16  # logical weights + centroids
    nnslim.save(model, tmp_path / "slim.safetensors")
    dense = os.path.getsize(tmp_path / "dense.safetensors")
    slim = os.path.getsize(tmp_path / "slim.safetensors")
    assert dense / slim > 7
    assert [c.details["bits"] for c in report.changes] == [4, 4]


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = make_cnn().eval()
    ShareWeights(clusters=32, granularity=4).apply(model, X_CNN)
    path = tmp_path / "m.safetensors"
    nnslim.save(model, path)
    back = nnslim.load(path, make_cnn()).eval()
    assert isinstance(back.conv1, PalettizedConv2d) and back.conv1.codebook.shape == (2, 32)
    assert torch.equal(back.conv1.indices, model.conv1.indices)
    with torch.no_grad():
        assert torch.equal(back(X_CNN), model(X_CNN))


@settings(deadline=None, max_examples=15)
@given(
    distinct=st.integers(2, 6),
    granularity=st.sampled_from(["tensor", "channel", 2]),
    seed=st.integers(0, 1000),
)
def test_clustering_a_palettized_layer_again_is_exact_when_it_uses_few_values(
    distinct, granularity, seed
):
    """A layer palettized to 64 clusters but holding only ``distinct`` values per codebook is
    clustered again to 8 (how compress() shares weights in steps) without changing the output."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(96, 5))
    for i, cls in ((0, PalettizedConv2d), (3, PalettizedLinear)):
        book = torch.randn(1, 64, generator=g)
        used = torch.randperm(64, generator=g)[:distinct]
        rows = model[i].weight.shape[0]
        codes = used[torch.randint(0, distinct, (rows, model[i].weight[0].numel()), generator=g)]
        model[i] = cls.from_codes(model[i], book, codes)
    x = torch.randn(2, 3, 4, 4, generator=g)
    with torch.no_grad():
        ref = model(x)
    report = ShareWeights(clusters=8, granularity=granularity).apply(model, x)
    assert report.touched == ["0", "3"]
    assert all(model[i].clusters <= min(8, distinct) and model[i].bits <= 3 for i in (0, 3))
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_palettized_layers_at_or_below_the_clusters_are_left_alone(tmp_path):
    model = make_cnn().eval()
    ShareWeights(clusters=32, granularity=4).apply(model, X_CNN)
    before = model_state(model)
    with pytest.raises(ValueError, match=r"already palettized with 32 clusters \(<= 32\)"):
        ShareWeights(clusters=32, select=["conv1", "conv2"]).apply(model, X_CNN)
    assert_same_state(before, model_state(model), "after the error")
    # a second, coarser step: fewer clusters, a smaller file, saved and loaded back exactly
    report = ShareWeights(clusters=8, granularity=4).apply(model, X_CNN)
    assert set(report.touched) == {"conv1", "conv2", "fc"}
    assert model.conv1.clusters == 8 and 0 < report.changes[0].details["error"] < 0.5
    path = tmp_path / "m.safetensors"
    nnslim.save(model, path)
    back = nnslim.load(path, make_cnn()).eval()
    assert back.conv1.codebook.shape == (2, 8)
    with torch.no_grad():
        assert torch.equal(back(X_CNN), model(X_CNN))


# -- sparsity ----------------------------------------------------------------------------------
def test_pruned_zeros_stay_zero_through_clustering_and_training(mlp):
    nnslim.Prune(ratio=0.6, structure="unstructured").apply(mlp, X_MLP)
    masks = {p: m.weight_mask.clone() for p, m in mlp.named_modules() if hasattr(m, "weight_mask")}
    assert masks
    report = ShareWeights(clusters=8).apply(mlp, X_MLP)
    for path, mask in masks.items():
        layer = mlp.get_submodule(path)
        assert isinstance(layer, PalettizedLinear) and layer.zero_code == 0
        assert torch.equal(layer.weight == 0, ~mask)
    assert all(c.details["zeros_kept"] for c in report.changes if c.path in masks)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
    mlp.train()
    (mlp(X_MLP) ** 2).sum().backward()
    opt.step()
    for path, mask in masks.items():
        assert torch.equal(mlp.get_submodule(path).weight == 0, ~mask)


def test_many_exact_zeros_are_kept_without_a_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:, ::3] = 0
    report = ShareWeights(clusters=4).apply(model)
    assert torch.equal(model[0].weight == 0, torch.arange(32).expand(32, 32) % 3 == 0)
    assert [c.details["zeros_kept"] for c in report.changes] == [True, False]


# -- sensitivity -------------------------------------------------------------------------------
def test_sensitivity_weights_the_kmeans_by_squared_gradients():
    calib = [torch.randn(16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    plain, sens = make_mlp().eval(), make_mlp().eval()
    ShareWeights(clusters=4).apply(plain, calib[0])
    report = ShareWeights(clusters=4, sensitivity=True).apply(sens, calibration=calib)
    assert all(c.details["sensitivity"] for c in report.changes)
    assert not torch.equal(plain.fc2.codebook, sens.fc2.codebook)
    # the weighted objective it minimises: sum of importance * squared weight error
    ref = make_mlp().eval()
    imp = torch.zeros_like(ref.fc2.weight)
    for b in calib:
        imp += collect(ref, [as_inputs(b)], {"fc2": ref.fc2}, grads=True)["fc2"].grad ** 2

    def cost(m):
        return float((imp * (m.fc2.weight.detach() - ref.fc2.weight.detach()) ** 2).sum())

    assert cost(sens) < cost(plain)


def test_sensitivity_needs_calibration(mlp):
    before = model_state(mlp)
    with pytest.raises(ValueError, match=r"sensitivity=True\) needs calibration data"):
        ShareWeights(sensitivity=True).apply(mlp, X_MLP)
    assert_same_state(before, model_state(mlp), "after the error")


# -- cross-layer sharing -----------------------------------------------------------------------
def test_tying_picks_the_central_block_and_counts_parameters_once(tmp_path):
    model = near_copies()
    with torch.no_grad():
        ref = model(X_STACK)
    before = nnslim.profile(model, X_STACK)
    report = ShareWeights(clusters=None, across_layers="layers").apply(model, X_STACK)
    assert all(model.layers[i] is model.layers[0] for i in range(4))
    # layers.2 is the block the others were made from: its parameters are kept
    assert {c.details["parameters_of"] for c in report.changes} == {"layers.2"}
    assert [c.path for c in report.changes] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    block = params_of(model.layers[0])
    assert nnslim.profile(model, X_STACK).params == before.params - 3 * block
    measured = [c for c in report.changes if "error" in c.details]
    assert len(measured) == 3 and 0 < max(c.details["error"] for c in measured) < 0.1
    # ties go from the most to the least similar block; the last error is the final one
    last = max(measured, key=lambda c: c.details["distance"])
    with torch.no_grad():
        assert rel_err(model(X_STACK), ref) == pytest.approx(last.details["error"], rel=1e-5)
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", make_stack())
    assert back.layers[3] is back.layers[0]
    with torch.no_grad():
        assert torch.equal(back(X_STACK), model(X_STACK))


def test_max_error_keeps_dissimilar_blocks_apart():
    model = near_copies(noise=(0.01, 0.01, 0.0, 3.0))
    report = ShareWeights(clusters=None, across_layers="auto", max_error=0.05).apply(model, X_STACK)
    assert model.layers[0] is model.layers[1] is model.layers[2]
    assert model.layers[3] is not model.layers[0]
    (skip,) = report.skips
    assert skip.path == "layers.3" and "max_error=0.05" in skip.reason
    assert all(c.details["error"] <= 0.05 for c in report.changes if "error" in c.details)


def test_tying_and_palettizing_cluster_the_shared_block_once(tmp_path):
    model = near_copies()
    report = ShareWeights(clusters=16, across_layers="re:layers\\.\\d+").apply(model, X_STACK)
    palettized = [c.path for c in report.changes if c.action == "palettized"]
    assert palettized == ["embed", "layers.0.up", "layers.0.down", "head"]
    assert model.layers[3].up is model.layers[0].up
    assert isinstance(model.layers[3].up, PalettizedLinear)
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", make_stack())
    with torch.no_grad():
        assert torch.equal(back(X_STACK), model(X_STACK))


def test_tied_linears_are_palettized_at_every_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    report = ShareWeights(clusters=8, across_layers="auto").apply(model, torch.randn(2, 16))
    assert model[2] is model[0] and isinstance(model[0], PalettizedLinear)
    assert [(c.path, c.action) for c in report.changes] == [
        ("2", "tied"),
        ("0", "palettized"),
        ("2", "palettized"),
    ]


def test_bert_layers_tied_and_counted_once(tmp_path):
    tf = pytest.importorskip("transformers")

    def bert():
        torch.manual_seed(0)
        cfg = tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
        )
        return tf.BertModel(cfg).eval()

    model = bert()
    x = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    layer = params_of(model.encoder.layer[0])
    report = ShareWeights(across_layers="encoder.layer").apply(model, x)
    assert all(model.encoder.layer[i] is model.encoder.layer[0] for i in range(4))
    palettized = [c for c in report.changes if c.action == "palettized"]
    assert len(palettized) == 7  # 6 Linear layers of the shared block, and the pooler
    # tied layers once, plus 16 centroids per palettized layer
    assert report.after.params == report.before.params - 3 * layer + 16 * 7
    tied = {c.path for c in report.changes if c.action == "tied"}
    assert tied >= {f"encoder.layer.{i}" for i in (1, 2, 3)}
    assert type(model.encoder.layer[2].intermediate.dense).__name__ == "PalettizedLinear"
    skipped = {s.path: s.reason for s in report.skips}
    assert "Embedding is not palettized" in skipped["embeddings.word_embeddings"]
    nnslim.save(model, tmp_path / "bert.safetensors")
    back = nnslim.load(tmp_path / "bert.safetensors", bert())
    assert back.encoder.layer[3] is back.encoder.layer[0]
    assert nnslim.profile(back, x).params == report.after.params
    with torch.no_grad():
        assert torch.equal(back(**x).last_hidden_state, model(**x).last_hidden_state)


def test_weight_tied_to_an_embedding_is_left_alone():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50))
    model[2].weight = model[0].weight
    report = ShareWeights(clusters=16).apply(model, torch.tensor([[1, 2, 3]]))
    assert isinstance(model[2], nn.Linear) and model[2].weight is model[0].weight
    assert {s.path: s.reason for s in report.skips}["2"].startswith("its weight is tied to 0")
    with pytest.raises(ValueError, match="module 2 .*its weight is tied to 0.weight"):
        ShareWeights(clusters=16, select=["2"]).apply(model)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"clusters": 1}, ValueError, r"clusters=...\): expected an integer in \[2, 65536\]"),
        ({"clusters": 65537}, ValueError, r"in \[2, 65536\], got 65537"),
        ({"clusters": 4.5}, TypeError, "expected int, got float"),
        ({"select": {"fc1": 1}}, ValueError, r"select\['fc1'\]=...\): expected an integer"),
        ({"granularity": "row"}, ValueError, "unknown value 'row'; expected 'tensor', 'channel'"),
        ({"max_error": 0.1}, ValueError, "limits cross-layer tying; set across_layers too"),
        ({"clusters": None}, ValueError, "nothing to do with clusters=None"),
        ({"clusters": None, "across_layers": "auto", "sensitivity": True}, ValueError, "drop"),
        ({"across_layers": "re:("}, ValueError, "invalid regular expression"),
        ({"across_layers": 3}, TypeError, "expected 'auto', a container path"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        ShareWeights(**kwargs)


def test_json_round_trip_keeps_every_field():
    t = ShareWeights(
        clusters=64,
        granularity=8,
        across_layers=["encoder.layer", "re:decoder\\.\\d+"],
        max_error=0.02,
        select={"re:.*fc.*": 16},
        exclude=["head"],
    )
    back = nnslim.Transform.from_json(json.dumps(t.to_dict()))
    assert back == t


def check_untouched(model, fn, match):
    before = model_state(model)
    with pytest.raises(ValueError, match=match):
        fn()
    assert_same_state(before, model_state(model), "after the error")


def test_nan_weights_name_the_module_and_leave_the_model_untouched(cnn):
    with torch.no_grad():
        cnn.fc.weight[0, 0] = float("nan")
    check_untouched(
        cnn,
        lambda: ShareWeights().apply(cnn, torch.randn(1, 3, 8, 8)),
        r"module fc \(Linear 16->5\) has NaN or Inf weights",
    )


def test_too_few_weights_for_the_clusters(mlp):
    # fc3 (32->4) has 128 weights: skipped when chosen by default, an error when named
    report = ShareWeights(clusters=256).apply(mlp, X_MLP)
    assert isinstance(mlp.fc3, nn.Linear)
    assert ("fc3", "128 weights per codebook, fewer than the 256 clusters") in [
        (s.path, s.reason) for s in report.skips
    ]
    fresh = make_mlp()
    check_untouched(
        fresh,
        lambda: ShareWeights(clusters=256, select=["fc1", "fc3"]).apply(fresh, X_MLP),
        r"module fc3 \(Linear 32->4\) has 128 weights per codebook, fewer than the 256 clusters"
        r"; give it fewer clusters \(select=\{'fc3': 64\}\)",
    )
    every = make_mlp()
    check_untouched(
        every,
        lambda: ShareWeights(clusters=4096).apply(every, X_MLP),
        r"no layer left to palettize \(fc1: 512 weights per codebook, fewer than the 4096",
    )
    channel = make_mlp()
    check_untouched(
        channel,
        lambda: ShareWeights(clusters=64, granularity="channel", select="fc1").apply(channel),
        "16 weights per codebook, fewer than the 64 clusters",
    )


def test_bad_block_selectors_leave_the_model_untouched():
    model = make_stack()
    check_untouched(
        model,
        lambda: ShareWeights(across_layers="layer").apply(model, X_STACK),
        r"no module named 'layer' in the model. Did you mean \['layers'",
    )
    check_untouched(
        model,
        lambda: ShareWeights(across_layers="layers.0").apply(model, X_STACK),
        "hold no two blocks of identical structure",
    )
    cnn = make_cnn()
    check_untouched(
        cnn,
        lambda: ShareWeights(across_layers="auto").apply(cnn),
        "'auto' found no ModuleList/Sequential",
    )
    check_untouched(
        model,
        lambda: ShareWeights(across_layers="auto", max_error=0.1).apply(model),
        "needs example_inputs to measure the output error",
    )


def test_select_values_set_per_layer_clusters(mlp):
    report = ShareWeights(clusters=16, select={"fc1": 4, "fc2": 256}).apply(mlp, X_MLP)
    assert {c.path: (c.details["clusters"], c.details["bits"]) for c in report.changes} == {
        "fc1": (4, 2),
        "fc2": (256, 8),
    }
    assert ("fc3", "not selected") in [(s.path, s.reason) for s in report.skips]


# -- conformance -------------------------------------------------------------------------------
CASES = [
    TransformCase(ShareWeights(clusters=16), make_cnn, X_CNN, id="palettize-cnn"),
    TransformCase(
        ShareWeights(clusters=8, granularity="channel", exclude="fc3"),
        make_mlp,
        X_MLP,
        id="palettize-channel",
    ),
    TransformCase(
        ShareWeights(clusters=None, across_layers="layers"), near_copies, X_STACK, id="tie"
    ),
    TransformCase(
        ShareWeights(clusters=16, across_layers="auto", sensitivity=True),
        near_copies,
        X_STACK,
        calibration=[torch.randn(4, 8, generator=_G) for _ in range(2)],
        id="tie-palettize-sensitivity",
    ),
]


@parametrize_with_checks(CASES)
def test_conformance(case, check):
    check(case)


def test_clustering_again_keeps_a_few_pruned_zeros_at_zero(mlp):
    """0.5% of the weights pruned (below the 1% that keeps zeros unasked): the first clustering
    keeps them because of the mask; clustering again keeps them because of the zero code."""
    nnslim.Prune(ratio=0.005, structure="unstructured").apply(mlp, X_MLP)
    masks = {p: m.weight_mask.clone() for p, m in mlp.named_modules() if hasattr(m, "weight_mask")}
    ShareWeights(clusters=32).apply(mlp, X_MLP)
    report = ShareWeights(clusters=8).apply(mlp, X_MLP)
    for path, mask in masks.items():
        layer = mlp.get_submodule(path)
        assert layer.clusters <= 8 and layer.zero_code >= 0
        assert torch.equal(layer.weight == 0, ~mask)
    assert all(c.details["zeros_kept"] for c in report.changes if c.path in masks)


class _Detector(nn.Module):
    """Keeps the rows whose score passes a threshold, as a detector keeps boxes."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(8, 1)

    def forward(self, x):
        s = self.score(x).squeeze(-1)
        return x[s > 0]


def test_an_output_whose_shape_follows_the_weights_gets_no_error_figure():
    """Palettizing changes which rows pass (torchvision keypoint R-CNN in the coverage sweep
    raised a raw size mismatch computing the output error)."""
    from nnslim.transforms.share import _rel_error

    assert _rel_error([torch.zeros(3, 2)], [torch.zeros(5, 2)]) == float("inf")
    torch.manual_seed(0)
    model = _Detector().eval()
    x = torch.randn(256, 8)
    with torch.no_grad():
        before = model(x).shape[0]
        model.score.weight.copy_(torch.linspace(-1, 1, 8)[None])
        ref = model(x).shape[0]
    rep = nnslim.ShareWeights(clusters=2).apply(model, x)
    with torch.no_grad():
        changed = model(x).shape[0] != ref
    assert changed and before > 0  # two clusters of eight distinct weights move the scores
    assert any("no relative error is given" in n for n in rep.notes)
