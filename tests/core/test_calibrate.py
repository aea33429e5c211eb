"""The block runner's input capture, shared by calibration and streamed compression."""

import pytest
import torch
from torch import nn

from nnslim.base.inputs import as_inputs
from nnslim.core.calibrate import inputs_of


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return self.fc(x) * scale


def test_inputs_of_stops_the_forward_at_the_module_before_or_after_it_runs():
    block = Counting()
    after = nn.Linear(3, 3)
    seen = []
    after.register_forward_hook(lambda *a: seen.append(1))
    model = nn.Sequential(nn.Linear(3, 3), block, after)
    batches = [as_inputs(torch.randn(2, 3)) for _ in range(3)]
    got = inputs_of(model, block, batches)
    assert len(got) == 3 and block.calls == 0 and not seen  # stopped before the block
    with torch.no_grad():
        assert torch.equal(got[1][0][0], model[0](batches[1].args[0]))
    inputs_of(model, block, batches, run=True)
    assert block.calls == 3 and not seen  # the block ran, nothing after it


def test_a_batch_that_does_not_fit_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="calibration batch 1"):
        inputs_of(model, model[1], [as_inputs(torch.randn(2, 3)), as_inputs(torch.randn(2, 5))])


def _llama():
    transformers = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).eval()


def _batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [as_inputs({"input_ids": torch.randint(0, 300, (2, 16), generator=g)}) for _ in range(n)]


def test_layers_that_read_one_input_group_together_in_run_order():
    from nnslim.core.calibrate import _by_shared_input

    model = _llama()
    named = dict(model.named_modules())
    block = model.model.layers[0]
    first = inputs_of(model, block, _batches(1))[0]
    paths = [
        p for p in named if p.startswith("model.layers.0.") and isinstance(named[p], nn.Linear)
    ]
    groups = _by_shared_input(block, list(reversed(paths)), named, first)
    short = [[p.rpartition(".")[2] for p in g] for g in groups]
    assert [sorted(g) for g in short] == [
        ["k_proj", "q_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    ]


@pytest.mark.parametrize("true_sequential", [False, True])
def test_true_sequential_calibrates_each_group_on_the_groups_processed_before(true_sequential):
    """process() zeroes the value projection it is given: with true_sequential the output
    projection after it then sees zero inputs (its statistics follow the processed layers);
    without, the block's layers all see the block's unprocessed inputs."""
    from nnslim.core.calibrate import run_sequential

    model = _llama()
    named = dict(model.named_modules())
    layers = {
        p: m for p, m in named.items() if p.startswith("model.layers.") and isinstance(m, nn.Linear)
    }
    calls, grams = [], {}

    def process(paths, stats):
        calls.append([p.rpartition(".")[2] for p in paths])
        for p in paths:
            grams[p] = stats[p].gram
            if p.endswith("v_proj"):
                with torch.no_grad():
                    named[p].weight.zero_()

    run_sequential(model, _batches(), layers, process, gram=True, true_sequential=true_sequential)
    o_gram = grams["model.layers.0.self_attn.o_proj"]
    if true_sequential:
        assert len(calls) == 8 and calls[1] == ["o_proj"]
        assert float(o_gram.abs().max()) == 0.0
    else:
        assert len(calls) == 2 and len(calls[0]) == 7
        assert float(o_gram.abs().max()) > 0.0


def test_the_calibration_loss_is_the_models_own_loss_when_it_has_one():
    """A Hugging Face model given labels reports its loss (for a causal LM, the next-token
    loss): that is what gradient-based estimates differentiate, not a loss of the logits."""
    from nnslim.core.calibrate import calibration_loss

    model = _llama()
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        plain = model(input_ids=ids)
    assert torch.equal(calibration_loss(out, ()), out.loss.float())
    own = plain.logits.reshape(-1, plain.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(own, own.argmax(-1))
    torch.testing.assert_close(calibration_loss(plain, ()), expected)


# -- padded batches: statistics over the real tokens only ----------------------------------------


def _tiny_bert():
    tf = pytest.importorskip("transformers")
    from tests.zoo import bert_config

    torch.manual_seed(0)
    cfg = bert_config(
        hidden_size=32,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    return tf.BertModel(cfg).eval()


def _sentences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 100, (n,), generator=g) for n in (9, 4, 6)]


def _padded(sents):
    t = max(len(s) for s in sents)
    ids = torch.zeros(len(sents), t, dtype=torch.long)  # pad id 0
    mask = torch.zeros(len(sents), t, dtype=torch.long)
    for i, s in enumerate(sents):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return as_inputs({"input_ids": ids, "attention_mask": mask})


def _alone(sents):
    return [as_inputs({"input_ids": s[None]}) for s in sents]


def test_a_padded_batch_gives_the_statistics_of_its_sentences_alone():
    from nnslim.core.calibrate import collect

    model = _tiny_bert()
    layers = {
        "encoder.layer.1.intermediate.dense": model.encoder.layer[1].intermediate.dense,
        "embeddings.word_embeddings": model.embeddings.word_embeddings,
    }
    sents = _sentences()
    padded = collect(model, [_padded(sents)], layers, norms=True, gram=True)
    alone = collect(model, _alone(sents), layers, norms=True, gram=True)
    fc = "encoder.layer.1.intermediate.dense"
    assert padded[fc].rows == alone[fc].rows == 19  # 9 + 4 + 6 tokens, no padding
    torch.testing.assert_close(padded[fc].gram, alone[fc].gram, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[fc].sq_sum, alone[fc].sq_sum, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[fc].extra["amax"], alone[fc].extra["amax"])
    counts = padded["embeddings.word_embeddings"].extra["counts"]
    assert counts[0] == 0 and counts.sum() == 19  # the pad id is counted nowhere
    torch.testing.assert_close(counts, alone["embeddings.word_embeddings"].extra["counts"])
    # without the mask the padded positions were counted (the old behaviour, 27 rows)
    bare = as_inputs({"input_ids": _padded(sents).kwargs["input_ids"]})
    assert collect(model, [bare], layers, gram=True)[fc].rows == 27


def test_gradient_statistics_leave_the_padding_out():
    from nnslim.core.calibrate import collect

    model = _tiny_bert()
    fc = "encoder.layer.1.output.dense"
    layers = {fc: model.encoder.layer[1].output.dense}
    sents = _sentences()
    padded = collect(model, [_padded(sents)], layers, out_grads=True, in_fisher=True)
    assert float(padded[fc].extra["out_rows"]) == 19
    assert float(padded[fc].extra["samples"]) == 19


def test_the_block_runner_and_the_refit_sums_see_the_real_tokens_only():
    import copy

    from nnslim.core.calibrate import run_sequential

    model = _tiny_bert()
    paths = [f"encoder.layer.{i}.output.dense" for i in range(2)]
    layers = {p: model.get_submodule(p) for p in paths}
    sents = _sentences()
    got: dict[str, dict] = {"padded": {}, "alone": {}}
    for name, batches in (("padded", [_padded(sents)]), ("alone", _alone(sents))):

        def keep(part, stats, into=got[name]):
            into.update(stats)

        run_sequential(model, batches, layers, keep, gram=True, reference=copy.deepcopy(model))
    for p in paths:
        a, b = got["padded"][p], got["alone"][p]
        assert a.rows == b.rows == 19
        torch.testing.assert_close(a.gram, b.gram, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a.extra["cross"], b.extra["cross"], rtol=1e-4, atol=1e-3)


def test_gradient_statistics_of_a_padded_sentence_are_its_own():
    """One sentence padded by three positions gives the weight gradient, output-gradient
    squares and input Fisher of the sentence alone (the loss over its real tokens)."""
    from nnslim.core.calibrate import collect

    model = _tiny_bert()
    fc = "encoder.layer.0.output.dense"
    layers = {fc: model.encoder.layer[0].output.dense}
    s = _sentences()[1]
    padded = _padded([s, torch.cat([s, s[:3]])])  # batch of two: the first padded by 3
    first = as_inputs({k: v[:1] for k, v in padded.kwargs.items()})
    a = collect(model, [first], layers, grads=True, out_grads=True, in_fisher=True)[fc]
    b = collect(model, _alone([s]), layers, grads=True, out_grads=True, in_fisher=True)[fc]
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.extra["out_grad_sq"], b.extra["out_grad_sq"], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(a.extra["in_fisher"], b.extra["in_fisher"], rtol=1e-4, atol=1e-9)
    # the Gaussian-target loss (Auto's output-gradient statistics of a hidden state): the
    # padded positions carry no noise, the scale is the real tokens'
    from nnslim.core.calibrate import batch_tokens, calibration_loss

    out = model(**first.kwargs)
    with batch_tokens(first):
        loss = calibration_loss(out, (), sample=0)
    (g,) = torch.autograd.grad(loss, [out.last_hidden_state])
    assert g[0, len(s) :].abs().max() == 0 and g[0, : len(s)].abs().max() > 0


def test_encoder_decoder_batches_are_not_masked():
    """The decoder's tokens are not the encoder's ``attention_mask``: no mask there."""
    from nnslim.base.inputs import Inputs

    mask = torch.tensor([[1, 1, 0]])
    assert Inputs(kwargs={"attention_mask": mask}).token_mask().tolist() == [[True, True, False]]
    assert Inputs(kwargs={"attention_mask": torch.ones(1, 3)}).token_mask() is None
    dec = {"attention_mask": mask, "decoder_input_ids": torch.zeros(1, 3, dtype=torch.long)}
    assert Inputs(kwargs=dec).token_mask() is None

    class Seq2Seq(nn.Module):
        class config:
            is_encoder_decoder = True

    assert Inputs(kwargs={"attention_mask": mask}).token_mask(Seq2Seq()) is None


def test_processes_agree_on_paired_sums_before_reducing(tmp_path):
    """Under ``reduce_across_processes`` a layer's paired sums are made the same set on every
    process first: a fold this process saw no batch of becomes zeros (so every process
    reduces the same tensors), and a layer unpaired anywhere is unpaired, its sums dropped.
    (One process here: the reductions are the identity; the agreement is what is tested.)"""
    import torch.distributed as dist

    from nnslim.core.calibrate import LayerStats, _reduce, reduce_across_processes

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        g = torch.eye(3)
        full = LayerStats(gram=g.clone(), rows=4)
        full.extra.update(
            paired=True,
            cross_out=torch.ones(3, 2),
            out_sq=torch.ones(2),
            folds=[{"gram": g.clone(), "cross_out": torch.ones(3, 2), "out_sq": torch.ones(2)}, {}],
        )
        bad = LayerStats(gram=g.clone(), rows=4)
        bad.extra.update(paired=True, unpaired=True, cross_out=torch.ones(3, 2), folds=[{}, {}])
        with reduce_across_processes():
            _reduce({"a": full, "b": bad})
        empty = full.extra["folds"][1]
        assert sorted(empty) == ["cross_out", "gram", "out_sq"]
        assert all(float(t.abs().sum()) == 0 for t in empty.values())
        assert empty["cross_out"].shape == (3, 2) and "paired" not in full.extra
        assert bad.extra["unpaired"] and "cross_out" not in bad.extra and "folds" not in bad.extra
    finally:
        dist.destroy_process_group()
