"""``nnslim.save`` and ``nnslim.load``: safetensors weights plus the record of structural edits.

The file is a single ``.safetensors`` file. Its metadata holds the JSON record of every
transform applied (see :mod:`nnslim.record.edits`); ``load`` replays the record on a freshly built
base model, then loads the weights. Nothing is pickled.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .._version import __version__
from ..base.atomic import atomic_path
from ..base.snapshot import Snapshot
from ..record.edits import (
    RECORD_ATTR,
    check_ops,
    describe,
    fingerprint,
    non_persistent_buffers,
    replay,
    tensor_budget,
)

__all__ = ["load", "save"]

FORMAT = "nnslim/1"


def _record_of(model: nn.Module) -> dict[str, Any]:
    rec = model.__dict__.get(RECORD_ATTR)
    nested = [p for p, m in model.named_modules() if p and RECORD_ATTR in m.__dict__]
    if nested:
        raise ValueError(
            f"transforms were applied to submodules {nested[:3]} rather than to the model being "
            f"saved; save those submodules themselves, or apply the transforms to the whole model "
            f"with `select=` to restrict them."
        )
    if rec is None:
        return {"format": 1, "base": fingerprint(describe(model)), "entries": [], "unsaveable": ""}
    _check_unchanged(model, rec)
    return rec


class _FingerprintDiff(NamedTuple):
    """How a model's :func:`fingerprint` differs from the one wanted."""

    retyped: list[tuple[str, Any, Any]]  # (module path, got, wanted)
    gone: list[tuple[str, Any]]  # (module path, wanted)
    new: list[tuple[str, Any]]  # (module path, got)
    reshaped: list[tuple[str, Any, Any]]  # (tensor name, got, wanted)
    gone_tensors: list[str]
    new_tensors: list[str]

    @classmethod
    def of(cls, want: dict[str, Any], got: dict[str, Any]) -> _FingerprintDiff:
        wm, gm = want.get("modules", {}), got.get("modules", {})
        wt, gt = want.get("tensors", {}), got.get("tensors", {})
        return cls(
            retyped=[(p, gm[p], wm[p]) for p in wm if p in gm and gm[p] != wm[p]],
            gone=[(p, wm[p]) for p in wm if p not in gm],
            new=[(p, gm[p]) for p in gm if p not in wm],
            reshaped=[(k, gt[k], wt[k]) for k in wt if k in gt and gt[k] != wt[k]],
            gone_tensors=[k for k in wt if k not in gt],
            new_tensors=[k for k in gt if k not in wt],
        )


def _check_unchanged(model: nn.Module, rec: dict[str, Any]) -> None:
    """Refuse a model whose structure changed after its last transform (a hand edit): its
    record would rebuild the model as the transform left it, not as it is."""
    want = rec.get("result")
    if want is None:  # records written before this check, or by the streaming mode
        return
    d = _FingerprintDiff.of(want, fingerprint(describe(model)))
    diffs = [f"{p} is a {g}, was {w}" for p, g, w in d.retyped]
    diffs += [f"{p} ({w}) is gone" for p, w in d.gone]
    diffs += [f"{p} ({g}) is new" for p, g in d.new]
    if not diffs:
        diffs = [f"{k} is {g}, was {w}" for k, g, w in d.reshaped]
        diffs += [f"tensor {k} is gone" for k in d.gone_tensors]
        diffs += [f"tensor {k} is new" for k in d.new_tensors]
    if diffs:
        raise ValueError(
            f"{type(model).__name__} changed after its last nnslim transform ("
            + "; ".join(diffs[:3])
            + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")
            + "): its record would rebuild the model as the transform left it, not as it is "
            "now. Make the change before compressing (or through a Transform), or save the "
            "state_dict with torch.save."
        )


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Save a (compressed) model: weights in safetensors plus the record of its edits.

    The write is atomic: the file at ``path`` is either the old one or the complete new one.

    Args:
        model: the model, as returned by transforms (or :func:`load`).
        path: the file to write (conventionally ``*.safetensors``).
        state_dict: the tensors to write instead of ``model.state_dict()``, with the same keys
            (for example the full weights gathered from a model sharded with FSDP).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if a transform made a change that cannot be recorded (the message names
            it), or ``state_dict`` does not have the model's keys.

    Example:
        >>> import torch, nnslim, tempfile, os
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> nnslim.save(model, path)
        >>> nnslim.load(path, torch.nn.Sequential(torch.nn.Linear(4, 4)))[0].weight.shape
        torch.Size([4, 4])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save: expected an nn.Module, got {type(model).__name__}.")
    if state_dict is None:
        state_dict = model.state_dict()
    else:
        mine = model.state_dict()
        own = set(mine)
        if set(state_dict) != own:
            missing, extra = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            raise ValueError(
                f"save: state_dict= must have the keys of {type(model).__name__}.state_dict() "
                f"(missing {missing[:3]}, unknown {extra[:3]})."
            )
        # a file whose tensors do not fit the model its record rebuilds could never load
        wrong = [
            f"{k}: {tuple(t.shape)} {t.dtype} (the model has {tuple(mine[k].shape)} "
            f"{mine[k].dtype})"
            for k, t in state_dict.items()
            if not isinstance(t, torch.Tensor)
            or tuple(t.shape) != tuple(mine[k].shape)
            or t.dtype != mine[k].dtype
        ]
        if wrong:
            raise ValueError(
                f"save: state_dict= tensors must have the model's shapes and dtypes, or the file "
                f"could never load: {'; '.join(wrong[:3])}"
                + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
                + "."
            )
    record = _record_of(model)
    state = {**state_dict, **_changed_np_buffers(model, record)}
    write_weights(path, with_float_dtypes(record, model), state)


#: record key of the float dtype each quantized layer computes in when the model was saved (a
#: plain attribute the layer's transform recorded; a cast after it changes it)
FLOAT_DTYPES = "float_dtypes"

_FLOATS = ("float32", "float16", "bfloat16", "float64")


def _float_dtypes(model: nn.Module) -> dict[str, str]:
    """``{module path: float_dtype}`` of the layers that record the float dtype they compute
    in (quantized layers: their ``weight`` is rebuilt in it); an attribute of that name that
    names no float dtype (a user's module's own) is not ours and is left out."""
    return {
        p: m.float_dtype
        for p, m in model.named_modules()
        if isinstance(getattr(m, "float_dtype", None), str) and m.float_dtype in _FLOATS
    }


def with_float_dtypes(record: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``record`` as a file stores it: with the float dtype each quantized layer of ``model``
    computes in now (a cast after its transform changes it)."""
    dtypes = _float_dtypes(model)
    return {**record, FLOAT_DTYPES: dtypes} if dtypes else record


def _check_float_dtypes(record: dict[str, Any]) -> None:
    """Refuse a record whose float dtypes are not ``{module path: float dtype name}``."""
    dtypes = record.get(FLOAT_DTYPES, {})
    if not isinstance(dtypes, dict) or not all(
        isinstance(k, str) and v in _FLOATS for k, v in dtypes.items()
    ):
        raise ValueError(
            f"load: the record's {FLOAT_DTYPES!r} is malformed; it was not written by nnslim.save"
        )


def _take_float_dtypes(model: nn.Module, record: dict[str, Any]) -> None:
    """Give each quantized layer the float dtype it had when it was saved (the file's
    ``record``, checked by :func:`_check_float_dtypes`): the replay rebuilds it in the dtype
    its transform ran in, and the model may have been cast after (a model quantized in fp32,
    cast to bf16 and saved came back with layers whose ``weight`` was fp32 while they
    computed in bf16)."""
    for p, dt in record.get(FLOAT_DTYPES, {}).items():
        try:
            m = model.get_submodule(p)
        except AttributeError as e:
            raise ValueError(
                f"load: the record names a float dtype for {p!r}, which the rebuilt model "
                f"does not have; it was not written by nnslim.save"
            ) from e
        if isinstance(getattr(m, "float_dtype", None), str):
            m.float_dtype = dt


def in_memory(record: dict[str, Any]) -> dict[str, Any]:
    """The record a loaded model carries: the file's, less what was read from the model at
    save time (the float dtypes; a later save reads them again)."""
    return {k: v for k, v in record.items() if k != FLOAT_DTYPES}


#: prefix of the file keys holding non-persistent buffers a transform created or reshaped
NP_PREFIX = "nnslim.non_persistent:"


def _np_buffer(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    path, _, leaf = name.rpartition(".")
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    if leaf in m._non_persistent_buffers_set and isinstance(m._buffers.get(leaf), torch.Tensor):
        return m, leaf
    return None


def _changed_np_buffers(model: nn.Module, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for name in non_persistent_buffers(record):
        found = _np_buffer(model, name)
        if found is not None:
            out[NP_PREFIX + name] = found[0]._buffers[found[1]]
    return out


def _fill_np_buffers(model: nn.Module, record: Any, stored: dict[str, torch.Tensor]) -> None:
    """Give the non-persistent buffers the replay built empty their saved values (or, for a
    file written before nnslim saved them, values recomputed from the module's config)."""
    lost = []
    for name in non_persistent_buffers(record):
        found = _np_buffer(model, name)
        if found is None:
            continue
        m, leaf = found
        t, empty = stored.get(NP_PREFIX + name), m._buffers[leaf]
        if t is not None and t.shape == empty.shape:
            m._buffers[leaf] = t.to(empty.device)
        elif not recompute_buffers(m, [leaf]) or m._buffers[leaf].shape != empty.shape:
            m._buffers[leaf] = empty
            lost.append(name)
    if lost:
        raise ValueError(
            f"load: {lost[:4]} are non-persistent buffers a transform reshaped, and the file "
            f"does not hold their values (an nnslim before 0.1 did not save them); "
            f"load it with that version and save it again, or redo the transform."
        )


def write_weights(
    path: str | os.PathLike[str], record: dict[str, Any], state: Mapping[str, torch.Tensor]
) -> None:
    """Write ``state`` and the edit ``record`` (see :func:`save`) atomically to ``path``."""
    from safetensors.torch import save_file

    if record.get("unsaveable"):
        raise ValueError(
            f"this model cannot be saved with nnslim.save: {record['unsaveable']}. Save the "
            f"state_dict instead, or register the module classes with nnslim.register_class."
        )
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[Any, str] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"save: tensor {name!r} is on the meta device and holds no values.")
        key = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "nnslim_version": __version__,
        "record": json.dumps(record),
        "aliases": json.dumps(aliases),
    }
    metadata[CHECKSUM] = digest(metadata, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


#: metadata key of the SHA-256 over every other metadata value and every tensor (name, dtype,
#: shape, bytes): a flipped byte anywhere in what a load reads is caught
CHECKSUM = "sha256"


#: every metadata key nnslim.save writes (another key is a flipped byte)
_META_KEYS = {"format", "nnslim_version", "record", "aliases", CHECKSUM}


def digest(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """The checksum :func:`save` stores and :func:`load` verifies."""
    h = hashlib.sha256()
    for k in sorted(metadata):
        if k != CHECKSUM:
            h.update(f"{k}\0{metadata[k]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        data = t.to("cpu").contiguous().reshape(-1)
        if data.numel():
            h.update(data.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _verify(path: Any, meta: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> None:
    unknown = sorted(set(meta) - _META_KEYS)
    want = meta.get(CHECKSUM)
    if want is None and not unknown:  # written before checksums: nothing to compare
        return
    if unknown or digest(meta, state) != want:
        raise ValueError(
            f"load: {os.fspath(path)!r} is corrupt: its contents do not match the checksum "
            f"written with it (a changed byte in the weights or the record). Save it again "
            f"from the model, or restore the file from a copy."
        )


def _read_header(path: str | os.PathLike[str]) -> dict[str, str]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"load: no file at {os.fspath(path)!r}.")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(
            f"load: {os.fspath(path)!r} is not a readable safetensors file ({e}); it may be "
            f"truncated or corrupt."
        ) from e
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"load: {os.fspath(path)!r} was not written by nnslim.save (format "
            f"{meta.get('format')!r}, expected {FORMAT!r})."
        )
    return meta


def _check_base(base: nn.Module, expected: dict[str, Any]) -> None:
    d = _FingerprintDiff.of(expected, fingerprint(describe(base)))
    problems = []
    missing = [p for p, _ in d.gone]
    extra = [p for p, _ in d.new]
    retyped = [f"{p} ({g} != {w})" for p, g, w in d.retyped]
    reshaped = [f"{k} {g} != {w}" for k, g, w in d.reshaped]
    missing_t = d.gone_tensors
    for label, items in (
        ("modules missing from the base", missing),
        ("modules the saved base did not have", extra),
        ("modules of another type", retyped),
        ("tensors of another shape", reshaped),
        ("tensors missing from the base", missing_t),
    ):
        if items:
            problems.append(f"{label}: {', '.join(items[:4])}" + (" ..." if len(items) > 4 else ""))
    if problems:
        raise ValueError(
            "load: the base model does not match the one the file was made from; "
            + "; ".join(problems)
            + ". Build the base exactly as before compression (same class and config)."
        )


def load(
    path: str | os.PathLike[str],
    base: nn.Module,
    *,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Rebuild a model saved with :func:`save` from a freshly built, uncompressed ``base``.

    The record of edits is replayed on ``base`` (in place), then the weights are loaded. If
    anything fails, ``base`` is left as it was.

    Args:
        path: the file written by :func:`save`.
        base: a new instance of the original architecture (same class and config).
        device: where to put the weights (default: the base's device).

    Returns:
        ``base``, now the compressed model.

    Raises:
        FileNotFoundError: no such file.
        ValueError: corrupt file, or a base that does not match (the message lists what
            differs).
    """
    from safetensors.torch import load_file

    if not isinstance(base, nn.Module):
        raise TypeError(f"load: base must be an nn.Module, got {type(base).__name__}.")
    if os.path.isdir(path):
        return _load_directory(path, base, device)
    meta = _read_header(path)
    try:
        record = json.loads(meta["record"])
        aliases = json.loads(meta.get("aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"load: the record in {os.fspath(path)!r} is corrupt ({e}).") from e

    try:
        state = _aligned(load_file(os.fspath(path), device="cpu"))
    except Exception as e:
        raise ValueError(f"load: cannot read the weights in {os.fspath(path)!r}: {e}") from e
    _verify(path, meta, state)  # before anything is replayed

    def read(dev: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(dev) for k, v in state.items()}

    _rebuild(base, record, device, read, aliases)
    base.__dict__[RECORD_ATTR] = in_memory(record)
    return base


def _rebuild(
    base: nn.Module,
    record: dict[str, Any],
    device: Any,
    read: Callable[[torch.device], dict[str, torch.Tensor]],
    aliases: dict[str, str],
) -> None:
    """Replay ``record`` on ``base`` and load the weights ``read(device)`` returns; on any
    failure, ``base`` is put back as it was."""
    want = record.get("base", {}) if isinstance(record, dict) else None
    if not (isinstance(want, dict) and all(isinstance(want.get(k, {}), dict) for k in want)):
        raise ValueError(
            "load: the record is malformed (no object 'base' of modules and tensors); it was "
            "not written by nnslim.save"
        )
    _check_base(base, want)
    if device is None:
        p = next(iter(base.parameters()), None)
        device = p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
    entries = _checked_entries(record, tensor_budget(base))  # all of them, before any replay
    _check_float_dtypes(record)
    state = read(device)
    _check_float_dtype(base, state)
    snap = Snapshot(base, copy_tensors=False)
    try:
        for i, (name, entry) in enumerate(entries):
            try:
                replay(base, entry["ops"], device=device, budget=(1 << 62, 1 << 62))
            except ValueError as e:
                raise ValueError(f"load: replaying step {i} ({name}) failed: {e}") from e
            except (KeyError, AttributeError, TypeError, IndexError, RecursionError) as e:
                # a record nnslim did not write (the checksum matched, so it was made so)
                raise ValueError(
                    f"load: the record's step {i} ({name}) is malformed "
                    f"({type(e).__name__}: {str(e)[:120]}); it was not written by nnslim.save"
                ) from e
        stored = {k: state.pop(k) for k in [k for k in state if k.startswith(NP_PREFIX)]}
        for k, v in aliases.items():
            if k.startswith(NP_PREFIX):
                stored[k] = stored[v] if v.startswith(NP_PREFIX) else state[v]
        aliases = {k: v for k, v in aliases.items() if not k.startswith(NP_PREFIX)}
        _load_state(base, state, aliases)
        _fill_np_buffers(base, record, stored)
        _take_float_dtypes(base, record)
    except BaseException:
        snap.restore()
        raise


def _check_float_dtype(base: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a base built in another floating dtype than the file's weights: the replayed
    modules would take the file's dtype and the others the base's (a forward that fails on
    mixed dtypes, or a model silently half in each)."""
    mine = {t.dtype for t in base.state_dict().values() if t.is_floating_point()}
    theirs = {t.dtype for k, t in state.items() if t.is_floating_point()}
    if mine and theirs and mine.isdisjoint(theirs):
        show = lambda ds: "/".join(sorted(str(d).removeprefix("torch.") for d in ds))  # noqa: E731
        raise ValueError(
            f"load: the base model's floating tensors are {show(mine)} but the file's are "
            f"{show(theirs)}; build the base in {show(theirs)} (as it was saved) and cast the "
            f"loaded model afterwards (model.to(dtype))."
        )


def _checked_entries(
    record: dict[str, Any], budget: tuple[int, int]
) -> list[tuple[str, dict[str, Any]]]:
    """``[(transform name, entry)]`` of a record whose every step follows the schema, checked
    before anything is replayed; the bounds hold over all steps together."""
    entries = record.get("entries", [])
    if not isinstance(entries, list):
        raise ValueError("load: the record's 'entries' is not a list; it was not written by nnslim")
    out = []
    total = 0
    for i, entry in enumerate(entries):
        t = entry.get("transform") if isinstance(entry, dict) else None
        name = t.get("_type", "?") if isinstance(t, dict) else "?"
        try:
            if not isinstance(entry, dict) or "ops" not in entry:
                raise ValueError("the entry has no list of operations ('ops')")
            total += check_ops(entry["ops"], (budget[0], budget[1] - total))
        except ValueError as e:
            raise ValueError(
                f"load: the record's step {i} ({name}) is malformed: {e}; it was not written "
                f"by nnslim.save, or by a version that wrote another schema"
            ) from None
        out.append((name, entry))
    return out


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in aliases]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} {state[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in state and (state[k].shape != v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing[:4]}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:4]}")
        if wrong:
            parts.append(f"shape differs: {wrong[:4]}")
        raise ValueError("load: the weights do not fit the rebuilt model; " + "; ".join(parts))
    _take_file_dtypes(model, state)
    meta_params = any(t.device.type == "meta" for t in expected.values())
    full = collections.OrderedDict(state)
    for k, v in aliases.items():
        full.setdefault(k, state[v])
    # the module versions a state_dict carries (torchvision's MNASNet refuses a state without
    # one; BatchNorm reads it): the rebuilt model is of the classes that wrote the file
    full._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(full, strict=True, assign=meta_params)
    if meta_params:
        rebuild_meta_buffers(model)


def _take_file_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each floating tensor the file's dtype where it differs: a replayed module is
    rebuilt in the dtype its transform ran in, and the model may have been cast after (a
    factorized model saved in bf16 came back with fp32 factors, and its forward failed on the
    mixed dtypes). Tensors shared between modules stay shared."""
    done: dict[int, torch.Tensor] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(m, kind)
            for name, t in list(tensors.items()):
                if t is None or not t.is_floating_point():
                    continue
                f = state.get(f"{path}.{name}" if path else name)
                if f is None or not f.is_floating_point() or f.dtype == t.dtype:
                    continue
                new = done.get(id(t))
                if new is None:
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(t.detach().to(f.dtype), requires_grad=t.requires_grad)
                    else:
                        new = t.to(f.dtype)
                    done[id(t)] = new
                tensors[name] = new


def recompute_buffers(m: nn.Module, names: list[str]) -> bool:
    """Recompute buffers ``names`` of ``m`` by building a fresh twin from its config on the CPU
    (rotary embedding frequencies and other values a module derives from its config)."""
    cfg = m.__dict__.get("config")
    if cfg is None:
        return False
    try:
        with torch.device("cpu"):
            fresh = type(m)(cfg)
    except Exception:
        return False
    if not all(isinstance(fresh._buffers.get(n), torch.Tensor) for n in names):
        return False
    for n in names:
        m._buffers[n] = fresh._buffers[n]
    for k, v in fresh.__dict__.items():  # derived scalars (attention_scaling...)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            m.__dict__.setdefault(k, v)
            m.__dict__[k] = v
    return True


def rebuild_meta_buffers(model: nn.Module) -> None:
    """Give buffers that are not saved (rotary frequencies) their values on a ``meta`` base.

    Raises:
        ValueError: if a tensor stays on ``meta`` with no way to compute it.
    """
    left = []
    for path, m in model.named_modules():
        meta = [n for n, b in m._buffers.items() if b is not None and b.device.type == "meta"]
        if meta and recompute_buffers(m, meta):
            meta = []
        left += [f"{path}.{n}" if path else n for n in meta]
        left += [
            f"{path}.{n}" if path else n
            for n, p in m._parameters.items()
            if p is not None and p.device.type == "meta"
        ]
    if left:
        raise ValueError(
            f"load: {left[:4]} are not in the file and stay on the meta device; build the base on "
            f"the CPU instead."
        )


def _aligned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every CPU tensor at a 64-byte aligned address.

    safetensors hands back tensors at their offset in the file's buffer (8-byte aligned);
    torch's packed integer kernels (``_weight_int8pack_mm`` with AVX-512) read their weight
    with aligned loads and crash (SIGSEGV) on such a tensor. A misaligned one is copied once,
    here (torch's CPU allocator aligns to 64 bytes)."""
    return {
        k: v.clone() if v.device.type == "cpu" and v.numel() and v.data_ptr() % 64 else v
        for k, v in state.items()
    }


def _load_directory(path: str | os.PathLike[str], base: nn.Module, device: Any) -> nn.Module:
    """A directory written by :func:`nnslim.compress_checkpoint`: ``nnslim.json`` plus shards."""
    from safetensors.torch import load_file

    root = os.fspath(path)
    rec_path = os.path.join(root, "nnslim.json")
    if not os.path.exists(rec_path):
        raise ValueError(
            f"load: {root!r} is a directory without nnslim.json; it was not written by nnslim."
        )
    try:
        record = json.loads(open(rec_path).read())
        index = json.loads(open(os.path.join(root, "model.safetensors.index.json")).read())[
            "weight_map"
        ]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"load: the record or index in {root!r} is unreadable ({e}).") from e
    missing = sorted({f for f in index.values() if not os.path.exists(os.path.join(root, f))})
    if missing:
        raise ValueError(f"load: shard(s) {missing} are missing from {root!r}.")

    def read(dev: torch.device) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(set(index.values())):
            state.update(_aligned(load_file(os.path.join(root, f), device=str(dev))))
        return state

    _rebuild(base, record, device, read, record.get("aliases", {}))
    base.__dict__[RECORD_ATTR] = {k: v for k, v in record.items() if k != "aliases"}
    return base
