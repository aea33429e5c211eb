"""nnslim.evaluate: fixed token windows with BOS, perplexity that says what it measured."""

import math

import pytest
import torch
from torch import nn

import nnslim
from nnslim.evaluate import Perplexity, TokenWindows, log_likelihood, perplexity, token_windows


class _CharTokenizer:
    """Characters as ids (a to z -> 1..26), BOS 0."""

    bos_token_id = 0
    eos_token_id = 27

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [ord(c) - 96 for c in text if c.isalpha()]
        return {"input_ids": torch.tensor([ids])}


class _Known(nn.Module):
    """Predicts the next letter with probability p (the rest spread evenly over 28 ids)."""

    def __init__(self, p=0.9):
        super().__init__()
        self.p = p
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=None):
        nxt = (input_ids % 26) + 1
        probs = torch.full((*input_ids.shape, 28), (1 - self.p) / 27)
        probs.scatter_(-1, nxt[..., None], self.p)
        return probs.log()


def test_windows_start_with_bos_and_do_not_overlap():
    text = "abcdefghijklmnopqrstuvwxyz" * 4  # 104 letters
    wins = token_windows(_CharTokenizer(), text, length=11)
    assert wins.length == 11 and len(wins) == 10  # 104 // 10 whole windows
    assert all(w[0, 0] == 0 for w in wins)
    body = torch.cat([w[0, 1:] for w in wins])
    assert body.tolist() == [((i % 26) + 1) for i in range(100)]
    later = token_windows(_CharTokenizer(), text, length=11, count=3, offset=2)
    assert [w.tolist() for w in later] == [w.tolist() for w in wins[2:5]]
    with pytest.raises(ValueError, match="no whole window of 200"):
        token_windows(_CharTokenizer(), text, length=200)
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(_CharTokenizer(), text, length=1)


def test_perplexity_is_exact_and_says_what_it_measured():
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    wins = token_windows(_CharTokenizer(), text, length=27)  # each window: BOS, a..z
    model = _Known(0.9)
    result = perplexity(model, wins, batch_size=3)
    # the BOS predicts "a" with p=0.9 too (BOS 0 -> next 1): every scored token has p = 0.9
    assert isinstance(result, Perplexity)
    assert result.value == pytest.approx(1 / 0.9, rel=1e-6)
    assert result.nll == pytest.approx(-math.log(0.9), rel=1e-6)
    assert (result.windows, result.length, result.tokens) == (4, 27, 104)
    assert str(result) == "perplexity 1.111 (4 windows of 27 tokens, 104 scored)"
    assert float(result) == result.value
    assert model.training  # the mode is restored
    metric = log_likelihood(wins)
    assert metric(model) == pytest.approx(math.log(0.9), rel=1e-6)
    assert metric(_Known(0.5)) < metric(model)  # higher is better, as compress wants


def test_hugging_face_models_and_bad_input():
    transformers = pytest.importorskip("transformers")
    from tests.zoo import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    wins = TokenWindows([torch.randint(0, 300, (1, 16)) for _ in range(3)], length=16)
    a = perplexity(model, wins)
    b = perplexity(model, wins, batch_size=3)
    assert a.value == pytest.approx(b.value, rel=1e-5)
    assert 100 < a.value < 600  # an untrained model over 300 tokens: near uniform
    with pytest.raises(TypeError, match="token_windows"):
        perplexity(model, [torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="expected \\(1, 16\\)"):
        TokenWindows([torch.zeros(2, 16, dtype=torch.long)], length=16)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        perplexity(model, wins)


def test_usable_as_the_metric_of_compress():
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    wins = token_windows(_CharTokenizer(), text, length=11, count=4)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(28, 16)
            self.fc = nn.Linear(16, 64)
            self.out = nn.Linear(64, 28)

        def forward(self, input_ids):
            return self.out(torch.relu(self.fc(self.emb(input_ids))))

    torch.manual_seed(0)
    model = Tiny()
    result = nnslim.compress(
        model,
        nnslim.Prune(ratio=0.5),
        evaluate=log_likelihood(wins),
        target={"params": 0.9},
        tolerance=1.0,
        example_inputs=wins[0],
        steps=1,
    )
    assert result.history and "metric" in result.history[0]
