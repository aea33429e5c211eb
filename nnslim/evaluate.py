"""A pinned evaluation for language models: perplexity on fixed token windows.

Perplexity numbers are only comparable when the windows are: the same text, tokenizer, window
length and count, and the same handling of the first token. :func:`token_windows` cuts a text
into windows of ``length`` tokens that each start with the tokenizer's BOS token (an input
only: it is never scored), consecutive and non-overlapping; :func:`perplexity` scores every
other token of every window and says how many windows of how many tokens it saw.

For :func:`nnslim.compress`, whose metric is higher-is-better, :func:`log_likelihood` gives
the negative mean token loss: a ``tolerance`` of ``0.05`` then accepts up to about 5% higher
perplexity (``exp(0.05)``).

Example:
    >>> import torch, nnslim
    >>> class Bigram(torch.nn.Module):
    ...     def forward(self, input_ids):  # uniform over 10 tokens
    ...         return torch.zeros(*input_ids.shape, 10)
    >>> wins = nnslim.evaluate.TokenWindows([torch.arange(8)[None] % 10] * 2, length=8)
    >>> print(nnslim.evaluate.perplexity(Bigram(), wins))
    perplexity 10.000 (2 windows of 8 tokens, 14 scored)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Perplexity", "TokenWindows", "log_likelihood", "perplexity", "token_windows"]


class TokenWindows(list):
    """Windows of token ids, each ``(1, length)`` starting with BOS: a list of tensors that
    remembers its ``length``."""

    def __init__(self, windows: Sequence[torch.Tensor], *, length: int) -> None:
        super().__init__(windows)
        self.length = length
        for i, w in enumerate(self):
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape != (1, length):
                raise ValueError(
                    f"TokenWindows: window {i} is {getattr(w, 'shape', type(w).__name__)}, "
                    f"expected (1, {length}) token ids."
                )

    def describe(self) -> str:
        return f"{len(self)} windows of {self.length} tokens"


def token_windows(
    tokenizer: Any,
    text: str,
    *,
    length: int = 512,
    count: int | None = None,
    offset: int = 0,
    bos: int | None = None,
) -> TokenWindows:
    """Cut ``text`` into windows of ``length`` tokens for :func:`perplexity`.

    The text is tokenized once without special tokens; window ``k`` is BOS followed by tokens
    ``k * (length - 1)`` to ``(k + 1) * (length - 1)``. Only whole windows are kept.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text, ...)``).
        text: the text.
        length: tokens per window, BOS included.
        count: at most this many windows (``None``: all whole windows).
        offset: skip this many windows first (evaluation and calibration windows from one
            text without overlap: ``offset=count`` of the other).
        bos: the BOS id (default: the tokenizer's BOS, else its EOS).

    Raises:
        ValueError: no BOS id, a length under 2, or a text too short for one window.
    """
    if length < 2:
        raise ValueError(f"token_windows: length must be at least 2 (BOS + 1 token), got {length}")
    if bos is None:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(tokenizer, "eos_token_id", None)
    if bos is None:
        raise ValueError(
            "token_windows: the tokenizer has neither a BOS nor an EOS token; pass bos=<id>."
        )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    step = length - 1
    available = len(ids) // step - offset
    n = available if count is None else min(count, available)
    if n <= 0:
        raise ValueError(
            f"token_windows: the text has {len(ids)} tokens: no whole window of {length} "
            f"after skipping {offset}; use a longer text or shorter windows."
        )
    first = torch.tensor([bos], dtype=ids.dtype)
    wins = [
        torch.cat([first, ids[k * step : (k + 1) * step]]).unsqueeze(0)
        for k in range(offset, offset + n)
    ]
    return TokenWindows(wins, length=length)


@dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`: ``float(result)`` is the perplexity.

    Attributes:
        value: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token (nats).
        windows: windows scored.
        length: tokens per window (BOS included).
        tokens: tokens scored (``windows * (length - 1)``).
    """

    value: float
    nll: float
    windows: int
    length: int
    tokens: int

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        return (
            f"perplexity {self.value:.3f} ({self.windows} windows of {self.length} tokens, "
            f"{self.tokens} scored)"
        )


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    params = inspect.signature(model.forward).parameters
    anything = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "input_ids" in params or anything:
        kwargs: dict[str, Any] = {"input_ids": ids}
        if "use_cache" in params or anything:
            kwargs["use_cache"] = False  # Hugging Face: no key/value cache to build
        out = model(**kwargs)
    else:  # a plain module: the ids as its first argument
        out = model(ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(
            f"perplexity: the model returned {type(out).__name__}; expected logits of shape "
            f"(batch, tokens, vocabulary) or an output with .logits."
        )
    return logits


@torch.no_grad()
def perplexity(model: nn.Module, windows: TokenWindows, *, batch_size: int = 1) -> Perplexity:
    """Perplexity of a causal language model on :func:`token_windows` windows.

    Every token after the first (BOS) of every window is scored from the tokens before it.
    The model runs in eval mode (its mode is restored), ``batch_size`` windows at a time.

    Raises:
        ValueError: no windows, or a non-finite loss (a broken model: NaN or Inf logits).
    """
    if not isinstance(windows, TokenWindows):
        raise TypeError(
            "perplexity: pass the windows of nnslim.evaluate.token_windows (or TokenWindows), "
            "so their length and count are known."
        )
    if not windows:
        raise ValueError("perplexity: no windows.")
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            ids = torch.cat(list(windows[i : i + batch_size])).to(dev)
            logits = _logits(model, ids)[:, :-1].float()
            target = ids[:, 1:]
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            count += target.numel()
    finally:
        model.train(was)
    nll = total / count
    if not math.isfinite(nll):
        raise ValueError(
            f"perplexity: the loss is {nll} on {windows.describe()}: the model's logits hold "
            f"NaN or Inf."
        )
    return Perplexity(math.exp(nll), nll, len(windows), windows.length, count)


def log_likelihood(windows: TokenWindows, *, batch_size: int = 1) -> Callable[[nn.Module], float]:
    """``model -> -nll``: the mean token log-likelihood on ``windows``, a higher-is-better
    metric for :func:`nnslim.compress` (``tolerance=0.05``: about 5% higher perplexity)."""
    if not isinstance(windows, TokenWindows):
        raise TypeError("log_likelihood: pass the windows of nnslim.evaluate.token_windows.")

    def metric(model: nn.Module) -> float:
        return -perplexity(model, windows, batch_size=batch_size).nll

    metric.__name__ = f"log_likelihood({windows.describe()})"
    return metric
