"""Fused q/k/v projections: every row layout nnslim knows removes exactly the heads it names.

The check is exact: removing query heads from a model computes what the original model computes
with those heads' columns of the output projection set to zero (the rest of the attention does
not depend on a removed query head; without GQA its key/value heads go with it).
"""

import copy

import pytest
import torch
from torch import nn

import nnslim
from nnslim.graph.attention import find_attention

tf = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

T = 10


def ids():
    return {"input_ids": torch.randint(0, 200, (2, T))}


def phi3(kv):
    cfg = tf.Phi3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=kv,
        vocab_size=200,
        pad_token_id=0,
    )
    return tf.Phi3ForCausalLM(cfg), ids()


def neox():
    cfg = tf.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=200,
    )
    return tf.GPTNeoXForCausalLM(cfg), ids()


def falcon(**kw):
    cfg = tf.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, vocab_size=200, **kw
    )
    return tf.FalconForCausalLM(cfg), ids()


def persimmon():
    cfg = tf.PersimmonConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=200,
        qk_layernorm=True,
    )
    return tf.PersimmonForCausalLM(cfg), ids()


def neox_japanese():
    cfg = tf.GPTNeoXJapaneseConfig(
        hidden_size=64,
        intermediate_multiple_size=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=200,
    )
    return tf.GPTNeoXJapaneseForCausalLM(cfg), ids()


def modernbert():
    cfg = tf.ModernBertConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=200,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        global_attn_every_n_layers=1,
    )
    return tf.ModernBertForMaskedLM(cfg), ids()


def vit():
    m = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=5
    )
    return m, torch.randn(2, 3, 32, 32)


CASES = {
    "phi3-gqa": (lambda: phi3(2), "blocks"),
    "phi3-mha": (lambda: phi3(8), "blocks"),
    "gpt-neox": (neox, "heads"),
    "falcon-mha": (lambda: falcon(multi_query=False), "heads"),
    "falcon-multi-query": (lambda: falcon(multi_query=True), "blocks"),
    "falcon-new-arch": (lambda: falcon(new_decoder_architecture=True, num_kv_heads=2), "groups"),
    "timm-vit": (vit, "blocks"),
    "persimmon": (persimmon, "heads"),
    "gpt-neox-japanese": (neox_japanese, "heads"),
    "modernbert": (modernbert, "blocks"),
}


def _out(model, x):
    with torch.no_grad():
        out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("case", list(CASES))
def test_removing_fused_heads_equals_zeroing_their_output_columns(case):
    build, layout = CASES[case]
    torch.manual_seed(0)
    model, x = build()
    model.eval()
    nnslim.trace(model, x)  # probes what the forward reads (Phi-3: the config's head count)
    specs = find_attention(model)
    assert specs and all(s.qkv is not None and s.layout == layout for s in specs)
    assert all(s.extra["config_heads"] == case.startswith("phi3") for s in specs)
    reference = copy.deepcopy(model)
    for s in specs:
        if s.kv_heads == s.heads:
            remove = [1, s.heads - 1]
        else:
            per_group = s.removable(0.5) // s.kv_heads
            assert per_group >= 1
            g = s.groups
            # the last heads of each key/value group, so no layout passes by luck of position
            remove = [j * g + i for j in range(s.kv_heads) for i in range(g - per_group, g)]
        o = reference.get_submodule(s.o)
        with torch.no_grad():
            for h in remove:
                o.weight[:, h * s.head_dim : (h + 1) * s.head_dim] = 0
        s.prune_heads(model, remove)
        assert s.heads == s.module.__dict__.get("num_heads", s.heads)
    from nnslim.transforms.prune import _sync_config_heads

    _sync_config_heads(specs)
    assert torch.allclose(_out(model, x), _out(reference, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "case", ["phi3-gqa", "gpt-neox", "falcon-new-arch", "timm-vit", "persimmon", "modernbert"]
)
def test_prune_ratio_removes_fused_heads_and_saves(case, tmp_path):
    build, _ = CASES[case]
    torch.manual_seed(0)
    model, x = build()
    heads = [s.heads for s in find_attention(model)]
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    after = [s.heads for s in find_attention(model)]
    assert all(a < b for a, b in zip(after, heads, strict=True)), report
    path = tmp_path / "m"
    nnslim.save(model, path)
    torch.manual_seed(1)
    back = nnslim.load(path, build()[0])
    assert torch.equal(_out(back.eval(), x), _out(model.eval(), x))


def test_bloom_heads_are_kept_with_the_reason():
    cfg = tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=200)
    model = tf.BloomForCausalLM(cfg)
    report = nnslim.Prune(ratio=0.3).apply(model, ids())
    reasons = {s.path: s.reason for s in report.skips}
    assert "ALiBi" in reasons["transformer.h.0.self_attention.query_key_value"]


def test_phi3_layers_with_different_head_counts_are_refused_and_undone():
    torch.manual_seed(0)
    model, x = phi3(2)
    before = copy.deepcopy(model.state_dict())
    sel = {"model.layers.0.self_attn.qkv_proj": 0.5, "model.layers.1.self_attn.qkv_proj": 0.0}
    with pytest.raises(ValueError, match="config.num_attention_heads"):
        nnslim.Prune(select=sel).apply(model, x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_attention_heads == 8


def test_gqa_ratio_too_small_for_a_whole_head_is_listed():
    torch.manual_seed(0)
    model, x = phi3(4)  # 2 query heads per key/value head: 0.2 of 2 rounds to none
    report = nnslim.Prune(ratio=0.2, select=["re:.*qkv_proj"]).apply(model, x)
    reasons = [s.reason for s in report.skips if s.path.endswith("self_attn")]
    assert len(reasons) == 2 and all("removes no whole head" in r for r in reasons)


# -- fused gate/up MLPs -------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: phi3(2), modernbert], ids=["phi3", "modernbert"])
def test_fused_gate_up_units_removed_exactly(build):
    """Removing units i from both halves equals zeroing column i of down_proj in the original."""
    from nnslim.graph.fused_mlp import find_fused_mlps

    torch.manual_seed(0)
    model, x = build()
    model.eval()
    mlps, left = find_fused_mlps(model)
    assert len(mlps) == 2 and not left
    reference = copy.deepcopy(model)
    for mlp in mlps:
        remove = [0, 7, mlp.units - 1]
        with torch.no_grad():
            reference.get_submodule(mlp.down).weight[:, remove] = 0
        mlp.prune_units(model, remove)
        assert model.get_submodule(mlp.fused).out_features == 2 * (96 - 3)
    assert torch.allclose(_out(model, x), _out(reference, x), atol=1e-5, rtol=1e-4)


def test_modernbert_prunes_heads_and_fused_mlp_units_and_the_config():
    torch.manual_seed(0)
    model, x = modernbert()
    nnslim.Prune(ratio=0.25).apply(model, x)
    layer = model.model.layers[0]
    assert layer.mlp.Wi.out_features == 2 * 72 and layer.mlp.Wo.in_features == 72
    assert layer.attn.Wqkv.out_features == 3 * 3 * layer.attn.head_dim
    assert model.config.intermediate_size == 72
    assert torch.isfinite(_out(model, x)).all()


def test_prune_shrinks_fused_gate_up_and_the_config():
    torch.manual_seed(0)
    model, x = phi3(2)
    nnslim.Prune(ratio=0.25, select=["re:.*gate_up_proj"]).apply(model, x)
    assert model.model.layers[0].mlp.gate_up_proj.out_features == 2 * 72
    assert model.model.layers[1].mlp.down_proj.in_features == 72
    assert model.config.intermediate_size == 72


def test_an_interleaved_gate_up_layout_is_left_with_the_reason():

    from nnslim.graph.fused_mlp import find_fused_mlps

    class Interleaved(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(8, 32)
            self.down_proj = nn.Linear(16, 8)

        def forward(self, x):
            h = self.gate_up_proj(x)
            return self.down_proj(torch.nn.functional.silu(h[..., 0::2]) * h[..., 1::2])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Interleaved()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.mlp(x))

    found, left = find_fused_mlps(Net())
    assert not found and "halves" in left["mlp.gate_up_proj"]
    report = nnslim.Prune(ratio=0.3).apply(Net(), torch.randn(2, 8))
    assert "halves" in {s.path: s.reason for s in report.skips}["mlp.gate_up_proj"]


# -- attention classes nnslim does not know: the layout checked on the model ----------------
class UserAttention(nn.Module):
    """A ViT attention as users copy it into their own code (not timm's class)."""

    def __init__(self, dim, heads, layout="blocks", per_head=None):
        super().__init__()
        self.num_heads, self.layout, self.per_head = heads, layout, per_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if per_head == "slopes":  # one value per head on the module: pruned with the heads
            self.slopes = nn.Parameter(torch.rand(heads))
        if per_head == "table":  # a per-head table in a child nnslim cannot follow
            self.rel = nn.Embedding(2 * T - 1, heads)

    def forward(self, x):
        b, n, _ = x.shape
        if self.layout == "blocks":
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).reshape(b, n, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)
        a = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        dist = torch.arange(n)[None, :] - torch.arange(n)[:, None]
        if self.per_head == "slopes":
            a = a - self.slopes[None, :, None, None] * dist.abs()
        if self.per_head == "table":
            a = a + self.rel(dist + T - 1).permute(2, 0, 1)[None]
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class UserViT(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Linear(8, 64)
        self.norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
        self.attns = nn.ModuleList(UserAttention(64, 4, **kw) for _ in range(2))
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        x = self.embed(x)
        for norm, attn in zip(self.norms, self.attns, strict=True):
            x = x + attn(norm(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("layout", ["blocks", "heads"])
def test_an_unknown_attention_class_gets_its_layout_from_the_model_and_prunes_exactly(layout):
    from nnslim.graph.trace import trace

    torch.manual_seed(0)
    model, x = UserViT(layout=layout).eval(), torch.randn(2, T, 8)
    assert not find_attention(model)  # the class alone says nothing
    trace(model, x)  # checks the layout on the model
    specs = find_attention(model)
    assert [s.layout for s in specs] == [layout, layout]
    reference = copy.deepcopy(model)
    for s in specs:
        with torch.no_grad():
            for h in (1, 3):
                reference.get_submodule(s.o).weight[:, h * 16 : (h + 1) * 16] = 0
        s.prune_heads(model, [1, 3])
        assert s.module.num_heads == 2
    assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_an_unknown_attention_prunes_heads_with_its_per_head_vector(tmp_path):
    torch.manual_seed(0)
    model, x = UserViT(per_head="slopes").eval(), torch.randn(2, T, 8)
    slopes = model.attns[0].slopes.detach().clone()
    nnslim.Prune(ratio=0.5).apply(model, x)
    attn = model.attns[0]
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 2 * attn.proj.in_features // 2
    assert all(bool((slopes == v).any()) for v in attn.slopes.detach())  # kept heads' slopes
    nnslim.save(model, tmp_path / "m")
    torch.manual_seed(1)
    back = nnslim.load(tmp_path / "m", UserViT(per_head="slopes"))
    assert torch.equal(back.eval()(x), model(x))


def test_an_unknown_attention_with_per_head_state_it_cannot_follow_keeps_its_heads():
    torch.manual_seed(0)
    model, x = UserViT(per_head="table").eval(), torch.randn(2, T, 8)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    reasons = {s.path: s.reason for s in report.skips}
    assert "swapping two of its heads changed the output" in reasons["attns.0.qkv"]
    assert model.attns[0].num_heads == 4 and model.attns[0].qkv.out_features % 3 == 0
    assert model(x).shape == (2, 3)
