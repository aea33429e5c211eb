"""Hugging Face directories for models whose config cannot describe their pruned shapes.

Some configs derive sizes instead of stating them (BERT, GPT-2 and Whisper compute the head size
as ``hidden_size / num_attention_heads``), so after head pruning ``from_pretrained`` cannot
rebuild the model from ``config.json``. :func:`save_pretrained` writes the usual directory plus
``nnslim.json``: the original config and the record of structural edits;
:func:`from_pretrained` builds the original architecture, replays the edits and loads the
weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..base.atomic import atomic_path
from ..record.edits import RECORD_ATTR, replay
from .save import (
    _check_float_dtypes,
    _load_state,
    _take_float_dtypes,
    in_memory,
    with_float_dtypes,
)

__all__ = ["from_pretrained", "guard_plain_save", "save_pretrained"]

GUARD_ATTR = "save_pretrained"


class PlainSaveRefused:
    """Stands in for ``model.save_pretrained`` on a model nnslim changed in a way
    ``from_pretrained`` would not rebuild: ``transformers`` would load the original layers and
    fill them with random weights, with only a warning. Holds the reason, not the model, so it
    copies and pickles with the model."""

    def __init__(self, cls_name: str, reason: str) -> None:
        self.cls_name = cls_name
        self.reason = reason

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{self.cls_name}.save_pretrained: nnslim changed this model and "
            f"{self.cls_name}.from_pretrained would not rebuild it ({self.reason}); it would "
            f"load random weights into the original layers. Use nnslim.hf.save_pretrained(model, "
            f"directory) and nnslim.hf.from_pretrained({self.cls_name}, directory), or "
            f"nnslim.save / nnslim.load."
        )


def guard_plain_save(model: nn.Module) -> None:
    """After a transform: leave ``model.save_pretrained`` as it is when ``from_pretrained`` on
    the config rebuilds every parameter and buffer with the same name and shape (a pruned model
    whose config says its widths), and replace it with :class:`PlainSaveRefused` otherwise."""
    if not callable(getattr(type(model), "save_pretrained", None)) or not hasattr(model, "config"):
        return
    why = _rebuild_mismatch(model)
    if why is None:
        model.__dict__.pop(GUARD_ATTR, None)
    else:
        model.__dict__[GUARD_ATTR] = PlainSaveRefused(type(model).__name__, why)


def _rebuild_mismatch(model: nn.Module) -> str | None:
    import copy

    import torch

    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as e:
        return f"its config no longer builds the model ({type(e).__name__}: {e})"
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for k, shape in mine.items():
        if k not in theirs:
            return f"{k} is not a tensor of the original architecture"
        if theirs[k] != shape:
            return f"{k} is {list(shape)}, the config builds {list(theirs[k])}"
    missing = sorted(set(theirs) - set(mine))
    if missing:
        return f"{missing[0]} would be missing"
    return None


FILE = "nnslim.json"


def save_pretrained(model: nn.Module, directory: str | os.PathLike[str], **kwargs: Any) -> None:
    """``model.save_pretrained(directory)`` plus ``nnslim.json`` (original config and edits).

    Raises:
        ValueError: if the model was not transformed by nnslim or has no Hugging Face config.
    """
    record = model.__dict__.get(RECORD_ATTR)
    if record is None or "hf_base_config" not in record:
        raise ValueError(
            "nnslim.hf.save_pretrained: this model carries no nnslim record with its original "
            "Hugging Face config; use model.save_pretrained for unmodified models."
        )
    if record.get("unsaveable"):
        raise ValueError(f"this model cannot be saved: {record['unsaveable']}")
    # past the plain-save guard; in the model's own key names (transformers 5 otherwise renames
    # some to an original checkpoint format, such as GPT-NeoX's embed_out), which the replayed
    # model loads as they are
    import inspect

    if "save_original_format" in inspect.signature(type(model).save_pretrained).parameters:
        kwargs.setdefault("save_original_format", False)
    type(model).save_pretrained(model, directory, **kwargs)
    with atomic_path(Path(directory) / FILE) as tmp:  # with what each quantized layer computes in
        tmp.write_text(json.dumps(with_float_dtypes(record, model)))


def from_pretrained(cls: Any, directory: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved with :func:`save_pretrained`.

    Args:
        cls: the model class (``transformers.BertModel``...).
        directory: the directory written by :func:`save_pretrained`.
    """
    from safetensors.torch import load_file

    path = Path(directory) / FILE
    if not path.exists():
        raise FileNotFoundError(f"nnslim.hf.from_pretrained: no {FILE} in {os.fspath(directory)!r}")
    record = json.loads(path.read_text())
    _check_float_dtypes(record)
    config = cls.config_class.from_dict(record["hf_base_config"])
    model = cls(config)
    for entry in record.get("entries", []):
        replay(model, entry["ops"])
    state: dict[str, Any] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        state.update(load_file(str(f)))
    expected = model.state_dict()
    # tied weights are written once by save_pretrained
    aliases = {k: k for k in expected if k not in state}
    tied = _tied_sources(model)
    for k in list(aliases):
        src = tied.get(k)
        if src is not None and src in state:
            state[k] = state[src]
            del aliases[k]
    _load_state(model, state, {})
    _take_float_dtypes(model, record)
    model.__dict__[RECORD_ATTR] = in_memory(record)
    return model


def _tied_sources(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            out[name] = first[id(t)]
        else:
            first[id(t)] = name
    return out
