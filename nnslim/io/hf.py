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

from .atomic import atomic_path
from .record import replay
from .save import RECORD_ATTR, _load_state

__all__ = ["from_pretrained", "save_pretrained"]

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
    model.save_pretrained(directory, **kwargs)
    with atomic_path(Path(directory) / FILE) as tmp:
        tmp.write_text(json.dumps(record))


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
    model.__dict__[RECORD_ATTR] = record
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
