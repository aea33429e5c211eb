"""Training checkpoints: model (nnslim.save), optimizer, scheduler, RNG states and position.

A checkpoint is a directory ``step-000123`` holding ``model.safetensors`` (written by
:func:`nnslim.save`, so the compressed structure is checked on resume) and ``state.pt``
(optimizer and scheduler state dicts, RNG states, counters; loaded with ``weights_only=True``).
Weights and optimizer state are full (never sharded) and the optimizer state is keyed by
parameter name, so a run checkpointed under FSDP resumes on one process and the other way round.
It is written under a temporary name and renamed into place, then ``latest`` is updated
atomically, so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base.atomic import atomic_dir, atomic_path
from ..io.save import _record_of, with_float_dtypes, write_weights

__all__ = [
    "CorruptCheckpoint",
    "checkpoints_newest_first",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    """Every RNG state that training touches, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [*internal, version, gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # dropout on the GPU draws from these
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` took (CUDA generators where both sides have them: a
    checkpoint from a CPU run, or an older one, has none)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(
                f"the checkpoint holds the random state of {len(cuda)} CUDA devices, this "
                f"process sees {torch.cuda.device_count()}; resume with the same devices "
                f"(CUDA_VISIBLE_DEVICES)."
            )
        torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: int = 2,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints.

    ``weights`` replaces ``model.state_dict()`` (full weights gathered from a sharded model) and
    ``record`` the model's edit record (taken before sharding changed the module classes).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    with atomic_dir(final) as tmp:
        write_weights(
            tmp / "model.safetensors",
            # (the float dtypes are read from the model itself; a sharded one's record is given)
            with_float_dtypes(_record_of(model), model) if record is None else record,
            model.state_dict() if weights is None else weights,
        )
        torch.save(state, tmp / "state.pt")
    with atomic_path(root / "latest") as t:
        t.write_text(final.name)
    existing = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in existing[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint directory, or ``None``."""
    found = checkpoints_newest_first(directory)
    return found[0] if found else None


def checkpoints_newest_first(directory: str | os.PathLike[str]) -> list[Path]:
    """Every checkpoint directory holding both files: the one ``latest`` names first, then the
    others from the newest step down (where a resume falls back to when one is corrupt)."""
    root = Path(directory)
    done = sorted(
        (
            p
            for p in root.glob("step-*")
            if (p / "state.pt").exists() and (p / "model.safetensors").exists()
        ),
        reverse=True,
    )
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
    return done


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files cannot be read back as written (truncated, or changed)."""


def read_checkpoint(path: Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full weights (tied tensors under each of their names) and training state at ``path``.

    Raises:
        CorruptCheckpoint: if a file is truncated or its weights fail their checksum.
        ValueError: if the checkpoint does not fit the model.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..io.save import _verify

    file = path / "model.safetensors"
    try:
        state = torch.load(path / "state.pt", weights_only=True)
        weights = load_file(str(file))
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        _verify(file, meta, weights)
        aliases = json.loads(meta.get("aliases", "{}"))
    except Exception as e:  # truncated pickle/zip, short safetensors, checksum mismatch
        raise CorruptCheckpoint(
            f"the checkpoint at {path} is unreadable ({type(e).__name__}: {str(e)[:160]})"
        ) from e
    for alias, target in aliases.items():
        weights[alias] = weights[target]
    own = model.state_dict()
    unknown = [k for k in weights if k not in own]
    wrong = [k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in weights]
    if unknown or wrong or missing:
        raise ValueError(
            f"resume: the checkpoint at {path} does not fit this model (unknown tensors "
            f"{unknown[:3]}, other shapes {wrong[:3]}, missing {missing[:3]}); build and compress "
            f"the model exactly as in the interrupted run before resuming."
        )
    return weights, state


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` (same structure, not sharded) and return the training state.

    Raises:
        ValueError: if the checkpoint does not fit the model.
    """
    weights, state = read_checkpoint(path, model)
    model.load_state_dict(weights, strict=True)
    return state
