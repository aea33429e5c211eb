"""Model inputs: the one form nnslim passes around, and running a model on them.

``example_inputs`` and calibration batches may be given as a tensor, a tuple/list of tensors
(positional arguments) or a dict of keyword tensors (Hugging Face models). :class:`Inputs`
holds either form, moves between devices and calls the model.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "Inputs",
    "as_inputs",
    "calibration_batches",
    "check_finite",
    "first_tensor",
    "per_token",
    "real_tokens",
    "run_model",
]


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword arguments for one forward call."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: what a calibration batch held beyond the model's arguments (labels of ``(x, y)``)
    targets: tuple[Any, ...] = ()
    #: the real tokens of the batch these inputs come from, where the arguments no longer
    #: carry them (a block's inputs, whose ``attention_mask`` is the model's 4-D one)
    tokens: torch.Tensor | None = None
    #: the same batch as the unprocessed model's stream gives it, where that differs from
    #: these inputs (streamed compression: a block's inputs as the uncompressed blocks before
    #: it computed them); a refit's reference runs on it
    original: Inputs | None = None

    def call(self, model: nn.Module) -> Any:
        """Run ``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def call_stateless(self, model: nn.Module) -> Any:
        """Run the model without a Hugging Face KV cache (``use_cache=False``), for passes that
        gather statistics: a cache carried between calls would change what later layers see."""
        kwargs = dict(self.kwargs)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", False) and "use_cache" not in kwargs:
            kwargs["use_cache"] = False
        return model(*self.args, **kwargs)

    def token_mask(self, model: nn.Module | None = None) -> torch.Tensor | None:
        """Which tokens are real: the ``attention_mask`` keyword of a Hugging Face batch
        (2-D, batch x sequence) as booleans, when it marks some positions as padding (or
        ``tokens``, where set); ``None`` without one, when every token is real, and for an
        encoder-decoder batch (its decoder's tokens are not the mask's: a ``decoder_*``
        keyword, or ``model``'s config says ``is_encoder_decoder``). Calibration statistics
        and distillation losses leave the padded positions out (see :func:`real_tokens`)."""
        if self.tokens is not None:
            return self.tokens
        if any(k.startswith("decoder_") for k in self.kwargs) or getattr(
            getattr(model, "config", None), "is_encoder_decoder", False
        ):
            return None
        m = self.kwargs.get("attention_mask")
        if not isinstance(m, torch.Tensor) or m.dim() != 2:
            return None
        real = m != 0
        return None if bool(real.all()) else real

    def tensors(self) -> list[torch.Tensor]:
        """All tensors in the inputs, in order."""
        return [t for t in _flatten(list(self.args) + list(self.kwargs.values()))]

    def to(self, device: torch.device | str) -> Inputs:
        """A copy with every tensor moved to ``device``."""
        return Inputs(
            tuple(_to(a, device) for a in self.args),
            {k: _to(v, device) for k, v in self.kwargs.items()},
            tuple(_to(a, device) for a in self.targets),
            self.tokens,
            self.original.to(device) if self.original is not None else None,
        )

    def as_tuple(self) -> tuple[Any, ...] | dict[str, Any]:
        """The form torch-pruning and ``torch.export`` take."""
        if self.kwargs and not self.args:
            return dict(self.kwargs)
        return self.args


def _flatten(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _flatten(o)


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def as_inputs(example_inputs: Any, *, what: str = "example_inputs") -> Inputs | None:
    """Normalise user inputs to :class:`Inputs` (``None`` stays ``None``).

    Raises:
        TypeError: if ``example_inputs`` is not a tensor, tuple/list or dict.
    """
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,))
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{what}: dict keys must be argument names (str), got {bad!r}.")
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return Inputs(tuple(example_inputs))
    if hasattr(example_inputs, "keys") and hasattr(example_inputs, "__getitem__"):
        # transformers BatchEncoding and similar mappings
        return Inputs((), {k: example_inputs[k] for k in example_inputs.keys()})
    raise TypeError(
        f"{what} must be a tensor, a tuple of tensors (positional arguments) or a dict of "
        f"keyword tensors; got {type(example_inputs).__name__}. Wrap a single input as "
        f"`torch.randn(1, 3, 224, 224)` or several as `(x, mask)`."
    )


def _positional_capacity(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` takes (``None``: unbounded)."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def calibration_batches(model: nn.Module, calibration: Iterable[Any] | None) -> list[Inputs]:
    """Turn calibration data into a list of :class:`Inputs`.

    Each batch takes the forms of ``example_inputs``. A tuple longer than the model's
    positional arguments is cut to fit, so a classification loader yielding ``(x, y)`` works
    for a model whose forward takes only ``x``.

    Raises:
        TypeError: if ``calibration`` is not iterable or a batch has the wrong type.
        ValueError: if ``calibration`` yields no batch.
    """
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise TypeError(
            "calibration must be an iterable of batches (a DataLoader, a list of tensors, ...), "
            f"got a single {type(calibration).__name__}. Wrap one batch as `[batch]`."
        )
    try:
        it = iter(calibration)
    except TypeError:
        raise TypeError(
            f"calibration must be an iterable of batches, got {type(calibration).__name__}."
        ) from None
    cap = _positional_capacity(model)
    out = []
    for i, batch in enumerate(it):
        inp = as_inputs(batch, what=f"calibration batch {i}")
        if inp is None:
            raise TypeError(f"calibration batch {i} is None; every batch must hold inputs.")
        if cap is not None and len(inp.args) > cap and not inp.kwargs:
            inp = Inputs(inp.args[:cap], targets=inp.args[cap:])
        out.append(inp)
    if not out:
        raise ValueError("calibration yielded no batch; pass at least one batch of inputs.")
    return out


def check_finite(batches: list[Inputs], what: str = "calibration batch") -> None:
    """Raise ``ValueError`` naming the first batch that holds a NaN or Inf value.

    Statistics gathered from such a batch (activation scales, Hessians, importance scores)
    are NaN themselves, and a model built from them outputs NaN.
    """
    for i, batch in enumerate(batches):
        for j, t in enumerate(batch.tensors()):
            if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
                raise ValueError(
                    f"{what} {i} holds NaN or Inf values (its tensor {j}, shape "
                    f"{tuple(t.shape)}); fix or drop that batch: statistics gathered from it "
                    f"would be NaN and so would the model built from them."
                )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_device(model: nn.Module, inputs: Inputs, what: str = "example_inputs") -> None:
    """Raise ``ValueError`` if the inputs live on another device than the model."""
    dev = model_device(model)
    for t in inputs.tensors():
        if t.device.type != dev.type and dev.type != "meta":
            raise ValueError(
                f"{what} are on {t.device} but {type(model).__name__} is on {dev}; move them "
                f"with `.to({str(dev)!r})`."
            )


def forward_error(model: nn.Module, inputs: Inputs, e: BaseException, what: str) -> ValueError:
    """The error to raise when ``model``'s forward failed on ``inputs``."""
    shapes = [tuple(t.shape) for t in inputs.tensors()]
    return ValueError(
        f"{type(model).__name__}.forward failed on {what} (tensor shapes {shapes}): "
        f"{type(e).__name__}: {e}. Check that the inputs match what the model expects."
    )


def run_model(model: nn.Module, inputs: Inputs, *, what: str = "example_inputs") -> Any:
    """Run the model once without gradients, turning failures into a clear error.

    Raises:
        ValueError: if the inputs live on another device than the model, or the forward fails.
    """
    check_device(model, inputs, what)
    try:
        with torch.no_grad():
            return inputs.call(model)
    except Exception as e:
        raise forward_error(model, inputs, e, what) from e


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` at the real tokens only, ``(tokens, *rest)``, when ``x`` is a per-token tensor
    of the batch ``mask`` describes (at least 3-D, its leading two dims the mask's batch x
    sequence: a layer's input, a block's output, logits); ``x`` unchanged otherwise (no mask,
    an image, a pooled output)."""
    return x[mask.to(x.device)] if per_token(x, mask) else x


def per_token(x: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``x`` is a per-token tensor of the batch ``mask`` describes: at least 3-D,
    its leading two dims the mask's batch x sequence (see :func:`real_tokens`)."""
    return mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The main tensor of a model output: the tensor itself, ``.logits``, the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state", "prediction_logits"):
        t = getattr(output, name, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(output, Mapping):
        for v in output.values():
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(output, (tuple, list)):
        for v in output:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def is_hidden_state(output: Any) -> bool:
    """Whether a model output is a hidden state or an embedding rather than logits: a Hugging
    Face output (or a dict) with ``last_hidden_state``, ``sentence_embedding`` or ``embeddings``
    and no ``logits`` (an encoder's). A tensor or a tuple counts as logits."""
    if not isinstance(output, Mapping) and not hasattr(output, "last_hidden_state"):
        return False

    def get(name: str) -> Any:
        return output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)

    if any(isinstance(get(n), torch.Tensor) for n in ("logits", "prediction_logits")):
        return False
    return any(
        isinstance(get(n), torch.Tensor)
        for n in ("last_hidden_state", "sentence_embedding", "embeddings")
    )


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (ModelOutput, tuple, dict), in order."""
    if hasattr(output, "to_tuple") and callable(output.to_tuple):
        output = output.to_tuple()
    return list(_flatten(output))


#: fields of a Hugging Face output that carry the model's inner states rather than its result
_INNER_FIELDS = re.compile(
    r"(.+_)?(last_hidden_state|hidden_states|attentions|past_key_values|pooler_output|"
    r"model_output|outputs)"
)


def task_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output that are its result, whose shapes a transform keeps.

    A Hugging Face output with a result (``logits``, ``text_embeds``, ...) also returns inner
    states (a seq2seq model's ``encoder_last_hidden_state``, a CLIP tower's
    ``vision_model_output``): their width is the hidden width, which pruning may change. Where
    a Hugging Face output has no other field (a backbone's ``last_hidden_state``), those are its
    result; any other output counts whole (:func:`output_tensors`)."""
    keys = getattr(output, "keys", None)
    if hasattr(output, "to_tuple") and callable(keys):
        result = [
            t for k in keys() if not _INNER_FIELDS.fullmatch(str(k)) for t in _flatten(output[k])
        ]
        if result:
            return result
    return output_tensors(output)


def is_meta(model: nn.Module) -> bool:
    """Whether the model's parameters live on the ``meta`` device."""
    p = next(iter(model.parameters()), None)
    return p is not None and p.device.type == "meta"


@contextlib.contextmanager
def fake_mode_if_meta(model: nn.Module) -> Iterator[None]:
    """A ``FakeTensorMode`` while a ``meta`` model runs (nothing allocated); else nothing."""
    if not is_meta(model):
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def call_for_analysis(model: nn.Module, inputs: Inputs) -> Any:
    """The forward nnslim analyses a model with (tracing, checks after pruning): Hugging Face models without a KV cache (it adds cycles); models on
    the ``meta`` device run under a FakeTensorMode (no memory, and code that inspects values,
    such as Hugging Face's mask helpers, sees a tracing run)."""
    kwargs = dict(inputs.kwargs)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    with fake_mode_if_meta(model):
        return model(*inputs.args, **kwargs)
