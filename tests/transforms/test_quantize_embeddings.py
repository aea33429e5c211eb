"""Quantize on embeddings selected by name: int8/int4 rows, a tied LM head sharing one copy of
the codes, save/load and dtype casts keeping the tie, and refusals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nnslim
from nnslim.modules.quantized import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear


class TinyLM(nn.Module):
    def __init__(self, tie: bool = True, vocab: int = 100, dim: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


@settings(max_examples=20, deadline=None)
@given(
    vocab=st.integers(1, 40),
    dim=st.integers(1, 70),
    scheme=st.sampled_from(["int8", "int4"]),
    group=st.sampled_from([32, 64, 128]),
)
def test_rows_are_rounded_to_nearest_and_looked_up_exactly(vocab, dim, scheme, group):
    """Every row is its own grid (int8: one scale; int4: a scale and minimum per group of
    columns, a width the group does not divide padded): each weight within half a step of the
    float one, and a lookup returns exactly the de-quantized rows."""
    emb = nn.Embedding(vocab, dim)
    w = emb.weight.detach().clone()
    m = nn.Sequential(emb)
    nnslim.Quantize(scheme=scheme, group_size=group, select=["0"]).apply(m)
    q = m[0]
    assert isinstance(q, Int4Embedding if scheme == "int4" else Int8Embedding)
    deq = q.weight
    assert deq.shape == w.shape
    if scheme == "int8":
        step = q.scale[:, None]
    else:
        g = q.group_size
        step = q.scales.float().repeat_interleave(g, 1)[:, :dim]
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    ids = torch.randint(0, vocab, (3, 5))
    assert torch.equal(q(ids), deq[ids])


@pytest.mark.parametrize("scheme, cls", [("int8", Int8Linear), ("int4", Int4Linear)])
@pytest.mark.parametrize("select", [["emb"], ["head"], ["emb", "head"]])
def test_a_tied_head_and_embedding_keep_one_copy(tmp_path, scheme, cls, select):
    """Selecting either of a tied pair quantizes both; the embedding reads the head's tensors
    (one copy: the profiler counts it once); the tie survives save/load and a dtype cast."""
    m = TinyLM()
    fp32 = nnslim.profile(m, IDS).param_bytes
    report = nnslim.Quantize(scheme=scheme, group_size=32, select=select).apply(m, IDS)
    assert isinstance(m.head, cls)
    follows = {("emb",): "head is tied to embedding emb", ("head",): "embedding emb is tied"}
    want = follows.get(tuple(select))
    notes = [n for n in report.notes if "tied" in n]
    assert len(notes) == (want is not None) and all(n.startswith(want) for n in notes)
    assert m.emb.qweight is m.head.qweight
    assert {c.path for c in report.changes} == {"emb", "head"}
    assert not any("tie is gone" in n for n in report.notes)
    codes = sum(t.untyped_storage().nbytes() for t in m.head._buffers.values() if t is not None)
    mid = sum(p.numel() * 4 for p in m.mid.parameters())
    assert nnslim.profile(m, IDS).param_bytes == codes + mid < fp32
    # the lookup is the head's de-quantized rows
    assert torch.equal(m.emb(IDS), m.head.weight[IDS])
    out = m(IDS)
    nnslim.save(m, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", TinyLM())
    assert back.emb.qweight is back.head.qweight
    assert torch.equal(back(IDS), out)
    back.half()
    assert back.emb.qweight is back.head.qweight
    assert back.emb(IDS).dtype == torch.float16


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("order", ["emb first", "head first"])
def test_a_move_keeps_the_tied_pair_one_copy(scheme, order):
    """``.to(device)`` converts each module's buffers on its own; whichever of the pair is
    converted first, they end as one tensor per buffer (meta stands in for a GPU here; a
    module holding the head before the embedding converts the head first)."""
    m = TinyLM()
    nnslim.Quantize(scheme=scheme, group_size=32, select=["emb"]).apply(m, IDS)
    if order == "head first":  # the head's place in the module tree before the embedding's
        m = nn.Sequential(m.head, m.emb)
        emb, head = m[1], m[0]
    else:
        emb, head = m.emb, m.head
    m.to("meta")
    names = [n for n in emb._shared_buffers if emb._buffers.get(n) is not None]
    assert names
    for n in names:
        assert emb._buffers[n].device.type == "meta"
        assert emb._buffers[n] is head._buffers[n], n
    m.to_empty(device="cpu")  # and back (the values are gone; the tie is what is checked)
    for n in names:
        assert emb._buffers[n] is head._buffers[n], n


def test_gptq_on_a_tied_head_is_what_the_embedding_reads():
    m = TinyLM()
    calib = [torch.randint(0, 100, (4, 16)) for _ in range(4)]
    nnslim.Quantize(scheme="int4", group_size=32, method="gptq", select=["emb"]).apply(
        m, IDS, calibration=calib
    )
    assert torch.equal(m.emb(IDS), m.head.weight[IDS])


def test_an_untied_embedding_alone(tmp_path):
    m = TinyLM(tie=False).requires_grad_(False)
    ref = m(IDS)
    report = nnslim.Quantize(scheme="int8", select=["emb"]).apply(m, IDS)
    assert isinstance(m.emb, Int8Embedding) and isinstance(m.head, nn.Linear)
    assert [c.path for c in report.changes] == ["emb"]
    assert float((m(IDS) - ref).norm() / ref.norm()) < 0.02
    nnslim.save(m, tmp_path / "m.safetensors")
    assert torch.equal(nnslim.load(tmp_path / "m.safetensors", TinyLM(tie=False))(IDS), m(IDS))


def test_gpt2_word_embedding_and_its_head():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=500, n_positions=32)
    m = tf.GPT2LMHeadModel(cfg).eval()
    x = {"input_ids": torch.randint(0, 500, (2, 12))}
    with torch.no_grad():
        ref = m(**x).logits
    report = nnslim.Quantize(scheme="int8", select=["transformer.wte"]).apply(m, x)
    assert isinstance(m.transformer.wte, Int8Embedding) and isinstance(m.lm_head, Int8Linear)
    assert isinstance(m.transformer.wpe, nn.Embedding)  # not selected
    skipped = {s.path: s.reason for s in report.skips}
    assert skipped["transformer.wpe"].startswith("embeddings stay in float")
    with torch.no_grad():
        out = m(**x).logits
    assert float((out - ref).norm() / ref.norm()) < 0.02
    assert m.get_input_embeddings().weight.shape == (500, 64)


def test_refusals_leave_the_model_as_it_was():
    m = TinyLM()
    with pytest.raises(ValueError, match="tied .one weight. but were given two schemes"):
        nnslim.Quantize(select={"emb": "int8", "head": "int4"}).apply(m, IDS)
    with pytest.raises(ValueError, match="embedding emb .* has no fake-quantized form"):
        nnslim.Quantize(qat=True, select=["emb"]).apply(m, IDS)

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    with pytest.raises(ValueError, match="Scaled with a forward of its own"):
        nnslim.Quantize(select=["0"]).apply(nn.Sequential(Scaled(10, 8)))
    renorm = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0))
    with pytest.raises(ValueError, match="max_norm=1.0"):
        nnslim.Quantize(select=["0"]).apply(renorm)
    with torch.no_grad():
        m.emb.weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match="embedding emb .* NaN"):
        nnslim.Quantize(select=["emb"]).apply(m, IDS)
    assert isinstance(m.emb, nn.Embedding) and isinstance(m.head, nn.Linear)
    assert m.head.weight is m.emb.weight
