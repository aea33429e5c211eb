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
