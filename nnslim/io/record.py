"""The record of structural edits: what a transform changed, in a form that can be replayed.

After a transform succeeds, :func:`diff` compares the model before and after and writes the
structural change as JSON operations:

* ``replace``: a new module at ``path``, described by a spec (class from the allowlist, plain
  attributes, parameter and buffer shapes, children; children that existed before are referred
  to by their old path),
* ``alias``: the module at ``path`` is the same object as the one at ``target`` (cross-layer
  sharing),
* ``update``: the same module object with changed parameter/buffer shapes or dtypes, added or
  removed tensors, tied tensors, changed plain attributes or Hugging Face config fields.

:func:`replay` applies the operations to a freshly built base model; the weights are loaded
afterwards. Values are never pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.serialize import class_path, lookup_class

__all__ = ["ModuleState", "NotRecordable", "describe", "diff", "fingerprint", "replay"]

_SKIP_ATTRS = {"training", "_nnslim_record", "_is_hf_initialized"}


class NotRecordable(ValueError):
    """A structural change that has no JSON form (an attribute holding an arbitrary object)."""


def _simple(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_simple(v) for v in value)
    return False


def _encode_simple(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"_tuple": [_encode_simple(v) for v in value]}
    if isinstance(value, list):
        return [_encode_simple(v) for v in value]
    return value


def _decode_simple(value: Any) -> Any:
    if isinstance(value, dict) and "_tuple" in value:
        return tuple(_decode_simple(v) for v in value["_tuple"])
    if isinstance(value, list):
        return [_decode_simple(v) for v in value]
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the record")
    return dt


def _config_dict(module: nn.Module) -> dict[str, Any] | None:
    cfg = module.__dict__.get("config")
    to_dict = getattr(cfg, "to_dict", None)
    if cfg is None or not callable(to_dict) or isinstance(cfg, (nn.Module, torch.Tensor)):
        return None
    try:
        d = to_dict()
    except Exception:
        return None
    return {k: v for k, v in d.items() if _simple(v)}


@dataclass
class ModuleState:
    """What :func:`diff` needs to know of one module at one moment."""

    obj: nn.Module
    tensors: dict[str, tuple[str, torch.Tensor, tuple[int, ...], torch.dtype]]
    attrs: dict[str, Any]
    other_attrs: list[str]
    config: dict[str, Any] | None
    children: dict[str, nn.Module] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _state(m: nn.Module) -> ModuleState:
    tensors = {}
    for name, t in m._parameters.items():
        if t is not None:
            tensors[name] = ("param", t, tuple(t.shape), t.dtype)
    for name, t in m._buffers.items():
        if t is not None:
            kind = "buffer" if name not in m._non_persistent_buffers_set else "buffer_np"
            tensors[name] = (kind, t, tuple(t.shape), t.dtype)
    attrs, other = {}, []
    for k, v in m.__dict__.items():
        if k in _SKIP_ATTRS or (k.startswith("_") and isinstance(v, (dict, set))):
            continue
        if isinstance(v, (nn.Module, torch.Tensor)) or k == "config":
            continue
        if _simple(v):
            attrs[k] = v
        else:
            other.append(k)
    return ModuleState(m, tensors, attrs, other, _config_dict(m), dict(m._modules))


def describe(model: nn.Module) -> dict[str, ModuleState]:
    """``{path: ModuleState}`` for every module path (shared modules appear at each path).

    The root's state also keeps the full Hugging Face config (``extra["hf_config"]``), so the
    original architecture can be rebuilt (see :mod:`nnslim.io.hf`).
    """
    states = {p: _state(m) for p, m in model.named_modules(remove_duplicate=False)}
    cfg = model.__dict__.get("config")
    if cfg is not None and callable(getattr(cfg, "to_dict", None)) and "" in states:
        try:
            states[""].extra["hf_config"] = json.loads(cfg.to_json_string())
        except Exception:
            pass
    return states


def fingerprint(states: dict[str, ModuleState]) -> dict[str, Any]:
    """A compact description of a base model (from :func:`describe`), checked at load time."""
    modules: dict[str, str] = {}
    tensors: dict[str, list[int]] = {}
    for path, st in states.items():
        if path in modules:
            continue
        modules[path] = type(st.obj).__name__
        for name, (kind, _, shape, _) in st.tensors.items():
            if kind != "buffer_np":
                tensors[f"{path}.{name}" if path else name] = list(shape)
    return {"modules": modules, "tensors": tensors}


def _tensor_spec(kind: str, t: torch.Tensor) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    if kind == "param":
        spec["requires_grad"] = bool(t.requires_grad)
    return spec


class _Differ:
    def __init__(self, before: dict[str, ModuleState], after: dict[str, ModuleState]) -> None:
        self.before = before
        self.after = after
        self.before_path = {}
        for p, st in before.items():
            self.before_path.setdefault(id(st.obj), p)
        self.before_tensor_owner: dict[int, str] = {}
        for p, st in before.items():
            for name, (_, t, _, _) in st.tensors.items():
                self.before_tensor_owner.setdefault(id(t), f"{p}.{name}" if p else name)
        self.seen_modules: dict[int, str] = {}
        self.seen_tensors: dict[int, str] = {}

    def run(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        covered: list[str] = []
        for path, st in self.after.items():
            if any(path == c or path.startswith(c + ".") for c in covered if c):
                continue
            if path == "" and covered == [""]:
                continue
            obj = st.obj
            b = self.before.get(path)
            if id(obj) in self.seen_modules:
                target = self.seen_modules[id(obj)]
                if not (b is not None and b.obj is obj):
                    ops.append({"op": "alias", "path": path, "target": target})
                covered.append(path)
                continue
            if b is None or b.obj is not obj:
                if path == "":
                    raise NotRecordable("the root module itself was replaced")
                ops.append({"op": "replace", "path": path, "spec": self.spec(path, obj)})
                covered.append(path)
                continue
            self.seen_modules[id(obj)] = path
            upd = self.update(path, b, st)
            if upd:
                ops.append({"op": "update", "path": path, **upd})
        return ops

    def _tensors_of(self, path: str, st: ModuleState) -> dict[str, Any]:
        out = {}
        for name, (kind, t, _, _) in st.tensors.items():
            full = f"{path}.{name}" if path else name
            if id(t) in self.seen_tensors:
                out[name] = {"kind": kind, "tie": self.seen_tensors[id(t)]}
            else:
                self.seen_tensors[id(t)] = full
                out[name] = _tensor_spec(kind, t)
        return out

    def update(self, path: str, b: ModuleState, a: ModuleState) -> dict[str, Any]:
        upd: dict[str, Any] = {}
        tensors: dict[str, Any] = {}
        a_specs = self._tensors_of(path, a)
        for name in b.tensors:
            if name not in a.tensors:
                tensors[name] = None
        for name, (kind, t, shape, dtype) in a.tensors.items():
            old = b.tensors.get(name)
            spec = a_specs[name]
            if "tie" in spec:
                # unchanged only when it is the very tensor it was (a pruned tie target is new,
                # and the replayed model must share the new one)
                was = old is not None and old[1] is t
                was = was and self.before_tensor_owner.get(id(old[1])) == spec["tie"]
                if not was:
                    tensors[name] = spec
                continue
            if old is None or old[0] != kind or old[2] != shape or old[3] != dtype:
                tensors[name] = spec
            elif kind == "param" and old[1].requires_grad != t.requires_grad:
                tensors[name] = spec
        if tensors:
            upd["tensors"] = tensors
        attrs = {k: _encode_simple(v) for k, v in a.attrs.items() if b.attrs.get(k, _MISSING) != v}
        gone = [k for k in b.attrs if k not in a.attrs and k not in a.other_attrs]
        if attrs:
            upd["attrs"] = attrs
        if gone:
            upd["del_attrs"] = gone
        if a.config is not None and b.config is not None:
            changes = {k: _encode_simple(v) for k, v in a.config.items() if b.config.get(k) != v}
            if changes:
                upd["config"] = changes
        new_other = [k for k in a.other_attrs if k not in b.other_attrs]
        if new_other:
            raise NotRecordable(
                f"module {path or '(root)'} ({type(a.obj).__name__}) gained attributes "
                f"{new_other} that are not plain values"
            )
        return upd

    def spec(self, path: str, obj: nn.Module) -> dict[str, Any]:
        if id(obj) in self.before_path:
            old_path = self.before_path[id(obj)]
            spec: dict[str, Any] = {"ref": old_path}
            updates = {}
            for rel, sub in obj.named_modules(remove_duplicate=False):
                old_sub = f"{old_path}.{rel}" if old_path and rel else (old_path or rel)
                b = self.before.get(old_sub)
                new_sub = f"{path}.{rel}" if rel else path
                if b is None or b.obj is not sub:
                    raise NotRecordable(
                        f"module {new_sub} was moved together with a changed child; record "
                        f"the move and the change in two transforms"
                    )
                self.seen_modules.setdefault(id(sub), new_sub)
                upd = self.update(new_sub, b, _state(sub))
                if upd:
                    updates[rel] = upd
            if updates:
                spec["updates"] = updates
            return spec
        if id(obj) in self.seen_modules:
            return {"alias": self.seen_modules[id(obj)]}
        self.seen_modules[id(obj)] = path
        st = _state(obj)
        if st.other_attrs:
            raise NotRecordable(
                f"module {path} ({type(obj).__name__}) holds attributes {st.other_attrs} that "
                f"are not plain values (numbers, strings, tuples)"
            )
        cls = type(obj)
        try:
            lookup_class(class_path(cls))
        except ValueError as e:
            raise NotRecordable(f"module {path}: {e}") from None
        children = {}
        for name, child in obj._modules.items():
            if child is None:
                children[name] = None
            else:
                children[name] = self.spec(f"{path}.{name}", child)
        spec = {
            "class": class_path(cls),
            "attrs": {k: _encode_simple(v) for k, v in st.attrs.items()},
            "tensors": self._tensors_of(path, st),
            "children": children,
        }
        none_params = [n for n, t in obj._parameters.items() if t is None]
        if none_params:
            spec["none_params"] = none_params
        if st.config is not None:
            raise NotRecordable(f"module {path} holds a config object; it cannot be rebuilt")
        return spec


_MISSING = object()


def diff(before: dict[str, ModuleState], after_model: nn.Module) -> list[dict[str, Any]]:
    """The operations that turn the model described by ``before`` into ``after_model``.

    Raises:
        NotRecordable: if a change has no JSON form.
    """
    return _Differ(before, describe(after_model)).run()


# ---------------------------------------------------------------------------------------------
# replay


def _get(model: nn.Module, path: str, what: str) -> nn.Module:
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"the saved record {what} module {path!r}, which the base model does not have; "
            f"build the base from the same architecture and config as the saved model."
        ) from None


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = _get(model, parent_path, "edits")
    parent._modules[name] = module  # bypass __setattr__ to allow any child name


def _resolve_tie(model: nn.Module, target: str) -> torch.Tensor:
    mod_path, _, name = target.rpartition(".")
    mod = _get(model, mod_path, "ties a tensor to")
    t = mod._parameters.get(name)
    if t is None:
        t = mod._buffers.get(name)
    if t is None:
        raise ValueError(f"the saved record ties a tensor to {target!r}, which does not exist")
    return t


def _apply_tensors(model: nn.Module, m: nn.Module, specs: dict[str, Any], device: Any) -> None:
    for name, spec in specs.items():
        m._parameters.pop(name, None)
        m._buffers.pop(name, None)
        m._non_persistent_buffers_set.discard(name)
        if name in m.__dict__ and isinstance(m.__dict__[name], torch.Tensor):
            del m.__dict__[name]
        if spec is None:
            continue
        kind = spec["kind"]
        if "tie" in spec:
            t = _resolve_tie(model, spec["tie"])
        else:
            t = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]), device=device)
            if kind == "param":
                t = nn.Parameter(t, requires_grad=spec.get("requires_grad", True))
        if kind == "param":
            m._parameters[name] = t
        else:
            m._buffers[name] = t
            if kind == "buffer_np":
                m._non_persistent_buffers_set.add(name)


def _apply_update(model: nn.Module, m: nn.Module, upd: dict[str, Any], device: Any) -> None:
    _apply_tensors(model, m, upd.get("tensors", {}), device)
    for k, v in upd.get("attrs", {}).items():
        m.__dict__[k] = _decode_simple(v)
    for k in upd.get("del_attrs", []):
        m.__dict__.pop(k, None)
    cfg = m.__dict__.get("config")
    for k, v in upd.get("config", {}).items():
        if cfg is None:
            raise ValueError("the saved record changes a config the base model does not have")
        setattr(cfg, k, _decode_simple(v))


def _build(
    model: nn.Module, spec: dict[str, Any], refs: dict[str, nn.Module], device: Any
) -> nn.Module:
    if "ref" in spec:
        m = refs.get(spec["ref"])
        if m is None:
            raise ValueError(
                f"the saved record moves module {spec['ref']!r}, which the base model does not "
                f"have; build the base from the same architecture."
            )
        for rel, upd in spec.get("updates", {}).items():
            _apply_update(model, m.get_submodule(rel) if rel else m, upd, device)
        return m
    if "alias" in spec:
        return _get(model, spec["alias"], "shares")
    cls = lookup_class(spec["class"])
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in spec["attrs"].items():
        m.__dict__[k] = _decode_simple(v)
    for name, child in spec["children"].items():
        m._modules[name] = None if child is None else _build(model, child, refs, device)
    _apply_tensors(model, m, spec["tensors"], device)
    for name in spec.get("none_params", []):
        m._parameters[name] = None
    return m


def replay(model: nn.Module, ops: list[dict[str, Any]], device: Any = "cpu") -> None:
    """Apply one transform's recorded operations to ``model`` (weights are left uninitialised).

    Raises:
        ValueError: if the model lacks a module or tensor the record refers to.
    """
    refs = dict(model.named_modules(remove_duplicate=False))
    for op in ops:
        kind = op.get("op")
        if kind == "replace":
            _set(model, op["path"], _build(model, op["spec"], refs, device))
        elif kind == "alias":
            _set(model, op["path"], _get(model, op["target"], "shares"))
        elif kind == "update":
            _apply_update(model, _get(model, op["path"], "updates"), op, device)
        else:
            raise ValueError(f"unknown operation {kind!r} in the saved record")
