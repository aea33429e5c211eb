"""The hidden width of attention models, and the graph it is pruned over: attention that
reshapes its output to its input's width, Hugging Face outputs' inner states, frozen layers,
F.glu, tied weights of modules the forward never calls."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnslim
from nnslim.base.inputs import output_tensors, task_tensors

tf = pytest.importorskip("transformers")


class WidthAttention(nn.Module):
    """Attention that takes its head size and output width from its input (timm NesT, HF
    TrOCR, Longformer): the hidden width must stay heads x head size."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn = WidthAttention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.fc2(F.gelu(self.fc1(x)))


class WidthNet(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(10, d)
        self.blocks = nn.Sequential(Block(d, heads), Block(d, heads))
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def test_hidden_width_follows_heads_where_attention_reshapes_to_its_input_width():
    torch.manual_seed(0)
    model = WidthNet().eval()
    x = torch.randn(2, 6, 10)
    report = nnslim.Prune(ratio=0.3).apply(model, x)
    # 0.3 of 64 channels alone is 44, which 3 heads cannot split: the width follows the heads
    assert any("in step with the attention heads" in n for n in report.notes), report.notes
    for block in model.blocks:
        assert block.attn.num_heads == 3
        assert block.attn.qkv.out_features == 3 * 48
        assert block.attn.proj.out_features == 48 == block.attn.proj.in_features
    assert model.embed.out_features == 48 and model.head.in_features == 48
    assert model.blocks[0].fc1.out_features < 128  # the MLP units pruned as before
    with torch.no_grad():
        assert model(x).shape == (2, 5)


def test_hidden_width_pruned_alone_where_it_can():
    torch.manual_seed(0)
    model = WidthNet().eval()
    x = torch.randn(2, 6, 10)
    # 0.5 of 64 is 32 = 2 heads of 16: the width prunes on its own and the heads agree
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert not any("hidden width" in n for n in report.notes), report.notes
    assert model.blocks[0].attn.num_heads == 2 and model.embed.out_features == 32


def _marian():
    cfg = tf.MarianConfig(
        vocab_size=300,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return tf.MarianMTModel(cfg).eval()


def test_seq2seq_encoder_states_are_not_the_result_and_narrow():
    # encoder_last_hidden_state is an inner state beside the logits; Marian's sinusoidal
    # position tables are frozen parameters, which the graph must still follow
    model = _marian()
    assert not model.model.encoder.embed_positions.weight.requires_grad
    x = {
        "input_ids": torch.randint(1, 300, (1, 10)),
        "decoder_input_ids": torch.randint(1, 300, (1, 6)),
    }
    with torch.no_grad():
        before = model(**x)
    report = nnslim.Prune(ratio=0.3).apply(model, x)
    with torch.no_grad():
        after = model(**x)
    assert after.logits.shape == before.logits.shape
    assert after.encoder_last_hidden_state.shape[-1] < 64, report.notes
    assert model.config.d_model == after.encoder_last_hidden_state.shape[-1]
    positions = model.model.encoder.embed_positions
    assert positions.weight.shape[1] == positions.embedding_dim == model.config.d_model
    assert not positions.weight.requires_grad  # frozen again after tracing
    assert torch.isfinite(after.logits).all()


def test_task_tensors_leave_out_inner_states_beside_a_result():
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

    logits, enc = torch.zeros(1, 3, 7), torch.zeros(1, 4, 8)
    out = Seq2SeqLMOutput(logits=logits, encoder_last_hidden_state=enc)
    assert task_tensors(out) == [logits]
    assert output_tensors(out) == [logits, enc]
    # a backbone: its last hidden state is its result
    base = BaseModelOutput(last_hidden_state=enc)
    assert task_tensors(base) == [enc]
    # anything else counts whole
    assert task_tensors((logits, enc)) == [logits, enc]
    assert task_tensors({"a": enc}) == [enc]


class FrozenStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)
        self.stem.requires_grad_(False)  # a backbone frozen for fine-tuning

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.body(F.relu(self.stem(x)))).mean((2, 3)))


def test_frozen_layers_are_pruned_with_their_group_and_stay_frozen():
    torch.manual_seed(0)
    model = FrozenStem().eval()
    x = torch.randn(1, 3, 8, 8)
    nnslim.Prune(ratio=0.5).apply(model, x)
    assert model.stem.out_channels == model.body.in_channels == 8
    assert not model.stem.weight.requires_grad and not model.stem.bias.requires_grad
    assert model.body.weight.requires_grad
    with torch.no_grad():
        assert model(x).shape == (1, 4)


class GluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(4, 32, 3, padding=1)
        self.conv1 = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv1(F.glu(self.conv0(x), dim=1)).mean(-1))


def test_glu_input_channels_are_kept_with_the_reason():
    torch.manual_seed(0)
    model = GluNet().eval()
    x = torch.randn(1, 4, 10)
    with torch.no_grad():
        ref = model(x)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert model.conv0.out_channels == 32  # F.glu halves it at the middle: kept whole
    assert any(s.path == "conv0" and "F.glu" in s.reason for s in report.skips), report.skips
    assert model.conv1.out_channels == 8  # the rest prunes
    with torch.no_grad():
        assert model(x).shape == ref.shape


class Alias(nn.Module):
    """An embedding aliased by a module the forward never calls (Pegasus's ``model.shared``)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(50, 16)
        self.embed = nn.Embedding(50, 16)
        self.embed.weight = self.shared.weight
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.out(h + self.fc(h))


def test_a_tie_alias_the_forward_never_calls_follows_the_pruned_weight():
    torch.manual_seed(0)
    model = Alias().eval()
    ids = torch.randint(0, 50, (1, 7))
    nnslim.Prune(ratio=0.5).apply(model, ids)
    assert model.embed.embedding_dim == 8
    assert model.shared.weight is model.embed.weight
    assert model.shared.embedding_dim == 8
    with torch.no_grad():
        assert model(ids).shape == (1, 7, 3)


class Mixer(nn.Module):
    """A Mamba-like mixer: its input projection is split by sizes it stores (so its channels
    cannot be pruned); its output projection writes the hidden width."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.sizes = [16, 16, 16]
        self.in_proj = nn.Linear(d, 48)
        self.out_proj = nn.Linear(16, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = torch.split(self.in_proj(x), self.sizes, dim=-1)
        return self.out_proj(a * torch.sigmoid(b) + c)


class MixerNet(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(10, d)
        self.mixers = nn.ModuleList([Mixer(d), Mixer(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for m in self.mixers:
            x = x + m(x)
        return self.head(x)


def test_a_module_that_breaks_keeps_its_inner_layers_but_not_the_width_it_writes():
    torch.manual_seed(0)
    model = MixerNet().eval()
    x = torch.randn(2, 5, 10)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    for m in model.mixers:
        assert m.in_proj.out_features == 48  # split by stored sizes: kept
        assert m.out_proj.in_features == 16
        assert m.out_proj.out_features == model.embed.out_features == 16  # the hidden width
    assert model.head.in_features == 16
    reasons = {s.path: s.reason for s in report.skips}
    assert "those writing its output follow" in reasons["mixers.0.in_proj"], reasons
    assert "mixers.0.out_proj" not in reasons
    with torch.no_grad():
        assert model(x).shape == (2, 5, 3)


class GatedAttention(nn.Module):
    """Attention whose head layout nnslim does not know (a per-head gate from q_proj, as in
    Qwen3.5): its heads stay, its output projection still writes the hidden width."""

    def __init__(self, d: int, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.q_proj = nn.Linear(d, 2 * d)  # per head: [q | gate]
        self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qg = self.q_proj(x).view(b, n, self.heads, 2 * self.hd)
        q, gate = qg.chunk(2, dim=-1)
        k = self.k_proj(x).view(b, n, self.heads, self.hd)
        v = self.v_proj(x).view(b, n, self.heads, self.hd)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2) * torch.sigmoid(gate)
        return self.o_proj(a.reshape(b, n, -1))


class GatedNet(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(10, d)
        self.attn = nn.ModuleList([GatedAttention(d), GatedAttention(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for a in self.attn:
            x = x + a(x)
        return self.head(x)


@pytest.mark.parametrize("net", ["GatedNet", "ResidualGatedNet"])
def test_attention_with_unknown_heads_keeps_them_and_still_follows_the_hidden_width(net):
    # ResidualGatedNet's attention adds its own residual (Bloom): its output is no layer's
    torch.manual_seed(0)
    model = globals()[net]().eval()
    x = torch.randn(2, 5, 10)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    for a in model.attn:
        assert a.q_proj.out_features == 64 and a.o_proj.in_features == 32  # heads kept
        assert a.o_proj.out_features == model.embed.out_features == 16  # the hidden width
        assert a.q_proj.in_features == 16
    reasons = {s.path: s.reason for s in report.skips}
    assert "head layout nnslim does not know" in reasons["attn.0.q_proj"]
    assert "attn.0.o_proj" not in reasons
    with torch.no_grad():
        assert model(x).shape == (2, 5, 3)


class GatedNetWithTable(GatedNet):
    """A position table in a buffer (CTRL's): the hidden width cannot change."""

    def __init__(self, d: int = 32) -> None:
        super().__init__(d)
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)
        self.register_buffer("pos", torch.randn(5, d), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for a in self.attn:
            x = x + a(x)
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x)


def test_a_hidden_width_that_cannot_change_is_kept_with_the_reason_and_the_rest_prunes():
    torch.manual_seed(0)
    model = GatedNetWithTable().eval()
    x = torch.randn(2, 5, 10)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    assert model.embed.out_features == 32 and model.attn[0].o_proj.out_features == 32
    assert model.fc1.out_features == 32  # the MLP's units still prune
    assert any(n.startswith("the hidden width") for n in report.notes), report.notes
    with torch.no_grad():
        assert model(x).shape == (2, 5, 3)


class ResidualGatedAttention(GatedAttention):
    """Attention that adds its own residual (Bloom's ``dropout_add(dense(x), residual)``): its
    output is no layer's output, yet its output projection writes the hidden width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


class ResidualGatedNet(GatedNet):
    def __init__(self, d: int = 32) -> None:
        super().__init__(d)
        self.attn = nn.ModuleList([ResidualGatedAttention(d), ResidualGatedAttention(d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for a in self.attn:
            x = a(x)
        return self.head(x)


def test_bloom_keeps_its_alibi_heads_and_prunes_the_hidden_width():
    cfg = tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    report = nnslim.Prune(ratio=0.3).apply(model, ids)
    attn = model.transformer.h[0].self_attention
    assert attn.query_key_value.out_features == 96  # 4 heads x 3 x 8: ALiBi slopes per head
    width = model.transformer.word_embeddings.embedding_dim
    assert width < 32 and attn.query_key_value.in_features == attn.dense.out_features == width
    assert (
        "ALiBi"
        in {s.path: s.reason for s in report.skips}[
            "transformer.h.0.self_attention.query_key_value"
        ]
    )
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 8, 64)


class FeatureConcat(nn.Module):
    """RoCBert's embeddings: features joined on the last dim into a Linear whose output view
    the model then changes in place (``x = self.map(x); x += pos``)."""

    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(50, 16)
        self.shape = nn.Embedding(50, 8)
        self.lin = nn.Linear(16, 16)
        self.map = nn.Linear(24, 16)
        self.pos = nn.Parameter(torch.randn(16))
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.lin(self.word(ids)), self.shape(ids)), -1)
        x = self.map(x)
        x += self.pos  # in place, on the view a Linear returns for 3-D input
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x)


def test_a_feature_concat_on_the_last_dim_and_an_in_place_change_of_a_layer_output_prune():
    torch.manual_seed(0)
    model = FeatureConcat().eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        assert model(ids).shape == (2, 6, 5)
    nnslim.Prune(ratio=0.5).apply(model, ids)
    # the concat's first input lost channels; the Linear it feeds lost the same columns
    assert model.lin.out_features < 16
    assert model.map.in_features == model.lin.out_features + 8
    # the Linear whose output is changed in place is in the graph: its width follows the stream
    assert model.map.out_features == model.pos.shape[0] == model.fc1.in_features < 16
    with torch.no_grad():
        assert model(ids).shape == (2, 6, 5)


class ShuffleNet(nn.Module):
    """torchvision's ShuffleNet v2 blocks: the block output is a channel shuffle of a concat,
    which reads its channel count as a constant (two groups)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.shufflenetv2 import InvertedResidual

        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.blocks = nn.Sequential(InvertedResidual(24, 48, 2), InvertedResidual(48, 48, 1))
        self.fc = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_channels_through_a_channel_shuffle_stay_and_the_widths_inside_the_blocks_prune():
    torch.manual_seed(0)
    model = ShuffleNet().eval()
    x = torch.randn(1, 3, 16, 16)
    report = nnslim.Prune(ratio=0.5).apply(model, x)
    for block in model.blocks:
        inner = block.branch2[0].out_channels
        assert inner < 24  # the width inside the block prunes
        assert block.branch2[3].in_channels == block.branch2[5].in_channels == inner
        assert block.branch2[5].out_channels == 24  # into the shuffle: stays
    assert model.fc.in_features == 48
    reasons = {s.path: s.reason for s in report.skips}
    assert "channel shuffle" in reasons["blocks.1.branch2.5"]
    with torch.no_grad():
        assert model(x).shape == (1, 5)


class HeadSplit(nn.Module):
    """A split of the channels into heads that keeps their order (HaloNet-style attention over
    each head's channels): not a channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.qkv(x).view(b, 4, 4, h, w).softmax(2).reshape(b, 16, h, w)
        return self.proj(y)


def test_a_split_into_heads_is_not_taken_for_a_channel_shuffle():
    from nnslim.graph.trace import trace

    g = trace(HeadSplit().eval(), torch.randn(1, 8, 4, 4))
    assert g.shuffles == []
    g = trace(ShuffleNet().eval(), torch.randn(1, 3, 16, 16))
    assert len(g.shuffles) == 2  # one per block


class _ListSplit(nn.Module):
    """The model's own forward splits by sizes it writes as constants (no submodule to keep)."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.c1(torch.relu(self.c0(x)))
        a, b = torch.split(x, [4, 12], 1)
        return self.c2(torch.cat([b, a], 1))


def test_a_split_by_constant_sizes_in_the_models_own_forward_keeps_its_group():
    """torch.split(x, [4, 12]) in the model's forward: pruning its input breaks the forward,
    and with nowhere inside to narrow the failure down, the groups through splits by sizes
    stay (an error before); the rest prunes."""
    torch.manual_seed(0)
    model, x = _ListSplit().eval(), torch.randn(1, 3, 8, 8)
    rep = nnslim.Prune(ratio=0.5).apply(model, x)
    assert model.c1.out_channels == 16
    assert model.c0.out_channels == 8
    assert "split by sizes written in the forward" in {s.path: s.reason for s in rep.skips}["c1"]
    model(x)
