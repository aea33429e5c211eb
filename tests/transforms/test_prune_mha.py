"""Head pruning of ``nn.MultiheadAttention`` (through its head-prunable twin)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.mha import HeadPrunableMultiheadAttention


@settings(deadline=None, max_examples=25)
@given(
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 6),
    length=st.integers(1, 5),
    source=st.integers(1, 5),
    batch=st.integers(0, 3),  # 0: unbatched
    batch_first=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    masks=st.sampled_from(["none", "bool", "float", "padding", "both", "per-head"]),
    cross=st.booleans(),
)
def test_twin_computes_what_torch_computes(
    heads, head_dim, length, source, batch, batch_first, need_weights, average, masks, cross
):
    torch.manual_seed(0)
    e = heads * head_dim
    m = nn.MultiheadAttention(e, heads, batch_first=batch_first).eval()
    twin = HeadPrunableMultiheadAttention.from_torch(m)

    def shaped(n):
        if not batch:
            return torch.randn(n, e)
        return torch.randn(batch, n, e) if batch_first else torch.randn(n, batch, e)

    q = shaped(length)
    k = v = shaped(source) if cross else q
    if not cross:
        source = length
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    b = max(batch, 1)
    if masks in ("bool", "both"):
        allowed = torch.rand(length, source) > 0.3
        allowed[:, 0] = True  # every query sees at least one key
        kw["attn_mask"] = ~allowed
    if masks == "float":
        kw["attn_mask"] = torch.randn(length, source)
    if masks == "per-head":
        kw["attn_mask"] = torch.randn(b * heads, length, source)
    if masks in ("padding", "both"):
        pad = torch.zeros(b, source, dtype=torch.bool)
        pad[:, source - 1 :] = source > 1
        kw["key_padding_mask"] = pad if batch else pad[0]
    want = m(q, k, v, **kw)
    got = twin(q, k, v, **kw)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    else:
        assert got[1] is None
    back = twin.to_torch()
    assert back is not None and back.in_proj_weight is m.in_proj_weight


class Encoder(nn.Module):
    def __init__(self, e=32, heads=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(e, 64), nn.GELU(), nn.Linear(64, e))
        self.head = nn.Linear(e, 3)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x + self.mlp(x))


def _silence_heads(attn, dead, hd):
    with torch.no_grad():
        e = attn.embed_dim
        for h in dead:
            rows = slice(h * hd, (h + 1) * hd)
            for part in range(3):
                attn.in_proj_weight[part * e :][rows] = 0
                attn.in_proj_bias[part * e :][rows] = 0
            attn.out_proj.weight[:, rows] = 0


def test_zero_importance_heads_are_removed_exactly():
    torch.manual_seed(0)
    model = Encoder().eval()
    _silence_heads(model.attn, [1, 3], 8)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
    report = nnslim.Prune(ratio=0.5, select=["attn.qkv"]).apply(model, x)
    attn = model.attn
    assert type(attn) is HeadPrunableMultiheadAttention
    assert (attn.num_heads, attn.head_dim, attn.qkv.out_features, attn.out_proj.in_features) == (
        2,
        8,
        48,
        16,
    )
    assert [c.details.get("heads") for c in report.changes if c.path == "attn"] == ["4->2"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-5)
    assert report.after.macs < report.before.macs


def test_pruned_heads_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 5, 32)
    nnslim.Prune(ratio=0.5).apply(model, x)
    nnslim.save(model, tmp_path / "m")
    loaded = nnslim.load(tmp_path / "m", Encoder().eval())
    assert type(loaded.attn) is HeadPrunableMultiheadAttention and loaded.attn.num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_attention_left_alone_stays_torch_and_plan_changes_nothing():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 5, 32)
    plan = nnslim.Prune(ratio=0.5).plan(model, x)
    assert [(h[0], h[1], h[2]) for h in plan.heads] == [("attn", 4, 2)]
    assert type(model.attn) is nn.MultiheadAttention
    weight = model.attn.in_proj_weight
    nnslim.Prune(ratio=0.5, select=["mlp.0"]).apply(model, x)
    assert type(model.attn) is nn.MultiheadAttention and model.attn.in_proj_weight is weight
    assert model.mlp[0].out_features == 32


def test_a_failed_prune_puts_torch_attention_back():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 5, 32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        nnslim.Prune(ratio=0.5, select=["nope"]).apply(model, x)
    assert type(model.attn) is nn.MultiheadAttention
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_unsupported_multihead_attention_is_left_alone_with_a_reason():
    torch.manual_seed(0)
    model = Encoder()
    model.attn = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True)
    model.eval()
    x = torch.randn(2, 5, 32)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert type(model.attn) is nn.MultiheadAttention
    assert any("MultiheadAttention" in s.reason for s in report.skips)
    assert model.mlp[0].out_features == 32


def test_quantized_twin_still_does_cross_attention():
    torch.manual_seed(0)
    twin = HeadPrunableMultiheadAttention.from_torch(nn.MultiheadAttention(32, 4)).eval()
    q, mem = torch.randn(5, 2, 32), torch.randn(7, 2, 32)
    with torch.no_grad():
        ref = twin(q, mem, mem)[0]
        self_ref = twin(q, q, q)[0]
    nnslim.Quantize(scheme="int8").apply(twin)
    assert type(twin.qkv).__name__ == "Int8Linear"
    with torch.no_grad():
        for got, want in ((twin(q, mem, mem)[0], ref), (twin(q, q, q)[0], self_ref)):
            assert float((got - want).norm() / want.norm()) < 0.02


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mem = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        m = self.mem(x)
        x = x + self.attn(x, m, m, need_weights=False)[0]
        return self.head(x + self.mlp(x))


@pytest.mark.parametrize("importance", ["l2", "wanda"])
def test_cross_attention_keeps_its_heads_and_the_rest_prunes(importance):
    torch.manual_seed(0)
    model = CrossAttention().eval()
    x = torch.randn(2, 5, 32)
    report = nnslim.Prune(ratio=0.5, importance=importance).apply(model, x, calibration=[x, x])
    assert type(model.attn) is nn.MultiheadAttention and model.attn.num_heads == 4
    assert model.mlp[0].out_features == 32
    assert any("cross-attention" in s.reason for s in report.skips)
    assert model(x).shape == (2, 5, 3)
