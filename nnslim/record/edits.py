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

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..base.serialize import class_path, lookup_class

__all__ = [
    "ModuleState",
    "NotRecordable",
    "check_ops",
    "describe",
    "diff",
    "fingerprint",
    "non_persistent_buffers",
    "replay",
    "tensor_budget",
]

#: the module attribute holding a model's edit record (what nnslim.save writes beside the weights)
RECORD_ATTR = "_nnslim_record"

_SKIP_ATTRS = {"training", RECORD_ATTR, "_is_hf_initialized", "_is_full_backward_hook"}


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
# the schema a record must follow before anything of it is replayed

#: names no record may set: nn.Module's own tables (hooks, tensors, children)
_INTERNAL = frozenset(k for k, v in nn.Module().__dict__.items() if not _simple(v))
_KINDS = ("param", "buffer", "buffer_np")
_MAX_DIMS = 8
_MAX_DEPTH = 64  # nesting of module specs (real models nest a few dozen levels at most)
_MAX_ITEMS = 1 << 16  # elements of one attribute value (a list or tuple)


class _Bad(ValueError):
    """A record field that does not follow the schema ``field: why``."""

    def __init__(self, where: str, why: str) -> None:
        if len(where) > 160:
            where = f"{where[:80]}...{where[-60:]}"
        super().__init__(f"{where}: {why}")


def tensor_budget(model: nn.Module) -> tuple[int, int]:
    """``(per tensor, in all)`` elements a record replayed on ``model`` may allocate: 16 times
    the model's largest tensor (and its total), at least 2**20 (2**24). Compression makes
    tensors smaller; the margin covers transforms that add buffers."""
    sizes = [t.numel() for t in itertools.chain(model.parameters(), model.buffers())]
    return 16 * max([*sizes, 1 << 20]), 16 * sum(sizes) + (1 << 24)


def check_ops(ops: Any, budget: tuple[int, int], where: str = "ops") -> int:
    """Check one transform's operations against the schema :func:`diff` writes, with bounds;
    returns the number of elements replay would allocate.

    Raises:
        ValueError: naming the field that breaks the schema (``ops[2].spec.tensors['w'].shape``).
    """
    if not isinstance(ops, list):
        raise _Bad(where, f"expected a list of operations, got {type(ops).__name__}")
    total = 0
    for i, op in enumerate(ops):
        w = f"{where}[{i}]"
        if not isinstance(op, dict):
            raise _Bad(w, f"expected an operation (an object), got {type(op).__name__}")
        kind = op.get("op")
        if kind == "replace":
            _keys(op, w, {"op", "path", "spec"}, {"op", "path", "spec"})
            _path(op["path"], f"{w}.path", root=False)
            total += _module_spec(op["spec"], f"{w}.spec", budget, 0)
        elif kind == "alias":
            _keys(op, w, {"op", "path", "target"}, {"op", "path", "target"})
            _path(op["path"], f"{w}.path", root=False)
            _path(op["target"], f"{w}.target", root=False)
        elif kind == "update":
            _keys(op, w, {"op", "path", "tensors", "attrs", "del_attrs", "config"}, {"op", "path"})
            _path(op["path"], f"{w}.path", root=True)
            total += _update(op, w, budget)
        else:
            raise _Bad(f"{w}.op", f"unknown operation {kind!r} (replace, alias or update)")
        if total > budget[1]:
            raise _Bad(w, f"the record allocates more than {budget[1]:,} elements in all")
    return total


def _keys(d: dict[str, Any], where: str, allowed: set[str], required: set[str]) -> None:
    extra = sorted(str(k) for k in d if k not in allowed)
    if extra:
        raise _Bad(where, f"unknown field(s) {extra}")
    missing = sorted(required - set(d))
    if missing:
        raise _Bad(where, f"missing field(s) {missing}")


def _path(path: Any, where: str, root: bool) -> None:
    if not isinstance(path, str):
        raise _Bad(where, f"a module path is a string, got {type(path).__name__}")
    if path == "":
        if not root:
            raise _Bad(where, "the root module cannot be replaced or aliased")
        return
    for part in path.split("."):
        _name(part, where, "module path")


def _name(name: Any, where: str, what: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise _Bad(where, f"{name!r} is not a {what} name")
    if name.startswith("__") or name in _INTERNAL:
        raise _Bad(where, f"{name!r} is internal to nn.Module; nnslim records never set it")


def _update(upd: dict[str, Any], where: str, budget: tuple[int, int]) -> int:
    total = 0
    tensors = upd.get("tensors", {})
    if not isinstance(tensors, dict):
        raise _Bad(f"{where}.tensors", "expected an object")
    for name, spec in tensors.items():
        w = f"{where}.tensors[{name!r}]"
        _name(name, w, "tensor")
        if spec is not None:
            total += _tensor_spec_checked(spec, w, budget)
    _attrs(upd.get("attrs", {}), f"{where}.attrs")
    gone = upd.get("del_attrs", [])
    if not isinstance(gone, list):
        raise _Bad(f"{where}.del_attrs", "expected a list of names")
    for i, name in enumerate(gone):
        _name(name, f"{where}.del_attrs[{i}]", "attribute")
    cfg = upd.get("config", {})
    if not isinstance(cfg, dict):
        raise _Bad(f"{where}.config", "expected an object")
    for k, v in cfg.items():
        w = f"{where}.config[{k!r}]"
        if not isinstance(k, str) or not k.isidentifier() or k.startswith("_"):
            raise _Bad(w, "config fields nnslim writes are public names")
        _value(v, w, 0)
    return total


def _attrs(attrs: Any, where: str) -> None:
    if not isinstance(attrs, dict):
        raise _Bad(where, "expected an object")
    for k, v in attrs.items():
        w = f"{where}[{k!r}]"
        _name(k, w, "attribute")
        if not k.isidentifier():
            raise _Bad(w, f"{k!r} is not an attribute name")
        _value(v, w, 0)


def _value(v: Any, where: str, depth: int) -> None:
    """A plain value as :func:`_encode_simple` writes it."""
    if depth > _MAX_DEPTH:
        raise _Bad(where, "a value nested too deep")
    if v is None or isinstance(v, (bool, int, str)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise _Bad(where, "a value that is not finite")
        return
    items = v["_tuple"] if isinstance(v, dict) and set(v) == {"_tuple"} else v
    if not isinstance(items, list):
        raise _Bad(where, f"not a plain value ({type(v).__name__})")
    if len(items) > _MAX_ITEMS:
        raise _Bad(where, f"a list of {len(items):,} values (at most {_MAX_ITEMS:,})")
    for x in items:
        _value(x, where, depth + 1)


def _tensor_spec_checked(spec: Any, where: str, budget: tuple[int, int]) -> int:
    if not isinstance(spec, dict):
        raise _Bad(where, f"expected a tensor spec (an object), got {type(spec).__name__}")
    if spec.get("kind") not in _KINDS:
        raise _Bad(f"{where}.kind", f"{spec.get('kind')!r} is not one of {list(_KINDS)}")
    if "tie" in spec:
        _keys(spec, where, {"kind", "tie"}, {"kind", "tie"})
        tie = spec["tie"]
        if not isinstance(tie, str) or not tie:
            raise _Bad(f"{where}.tie", "expected the path of a tensor")
        mod, _, name = tie.rpartition(".")
        _path(mod, f"{where}.tie", root=True)
        _name(name, f"{where}.tie", "tensor")
        return 0
    _keys(spec, where, {"kind", "shape", "dtype", "requires_grad"}, {"kind", "shape", "dtype"})
    shape = spec["shape"]
    ok = isinstance(shape, list) and len(shape) <= _MAX_DIMS
    if not ok or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _Bad(f"{where}.shape", f"expected at most {_MAX_DIMS} integer sizes, got {shape!r}")
    if any(d < 0 for d in shape):
        raise _Bad(f"{where}.shape", f"negative size in {shape}")
    n = math.prod(shape)
    if n > budget[0]:
        raise _Bad(
            f"{where}.shape",
            f"{shape} is {n:,} elements, more than the {budget[0]:,} a record may allocate for "
            f"one tensor of this base model (16x its largest tensor)",
        )
    try:
        _dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else _dtype("?")
    except ValueError:
        raise _Bad(f"{where}.dtype", f"unknown dtype {spec['dtype']!r}") from None
    if not isinstance(spec.get("requires_grad", True), bool):
        raise _Bad(f"{where}.requires_grad", "expected true or false")
    return n


def _module_spec(spec: Any, where: str, budget: tuple[int, int], depth: int) -> int:
    if depth > _MAX_DEPTH:
        raise _Bad(where, f"modules nested more than {_MAX_DEPTH} deep")
    if not isinstance(spec, dict):
        raise _Bad(where, f"expected a module spec (an object), got {type(spec).__name__}")
    if "ref" in spec:
        _keys(spec, where, {"ref", "updates"}, {"ref"})
        _path(spec["ref"], f"{where}.ref", root=False)
        updates = spec.get("updates", {})
        if not isinstance(updates, dict):
            raise _Bad(f"{where}.updates", "expected an object")
        total = 0
        for rel, upd in updates.items():
            w = f"{where}.updates[{rel!r}]"
            _path(rel, w, root=True)
            if not isinstance(upd, dict):
                raise _Bad(w, "expected an update (an object)")
            _keys(upd, w, {"tensors", "attrs", "del_attrs", "config"}, set())
            total += _update(upd, w, budget)
        return total
    if "alias" in spec:
        _keys(spec, where, {"alias"}, {"alias"})
        _path(spec["alias"], f"{where}.alias", root=False)
        return 0
    _keys(
        spec,
        where,
        {"class", "attrs", "tensors", "children", "none_params"},
        {"class", "attrs", "tensors", "children"},
    )
    if not isinstance(spec["class"], str):
        raise _Bad(f"{where}.class", "expected a class path")
    try:
        cls = lookup_class(spec["class"])
    except ValueError as e:
        raise _Bad(f"{where}.class", str(e)) from None
    _attrs(spec["attrs"], f"{where}.attrs")
    for field_ in ("attrs", "tensors", "children"):
        if isinstance(spec[field_], dict):
            for k in spec[field_]:
                if _shadows(cls, k):
                    raise _Bad(
                        f"{where}.{field_}[{k!r}]",
                        f"would hide the method or property {cls.__name__}.{k}",
                    )
    total = _update({"tensors": spec["tensors"]}, where, budget)
    children = spec["children"]
    if not isinstance(children, dict):
        raise _Bad(f"{where}.children", "expected an object")
    for name, child in children.items():
        w = f"{where}.children[{name!r}]"
        _name(name, w, "child")
        if child is not None:
            total += _module_spec(child, w, budget, depth + 1)
    none = spec.get("none_params", [])
    if not isinstance(none, list):
        raise _Bad(f"{where}.none_params", "expected a list of names")
    for i, name in enumerate(none):
        _name(name, f"{where}.none_params[{i}]", "parameter")
    return total


def _shadows(cls: type, name: str) -> bool:
    attr = getattr(cls, name, None)
    return callable(attr) or isinstance(attr, property)


def _no_shadowing(m: nn.Module, names: Any, where: str) -> None:
    """Refuse an attribute that would hide a method or property of the module's class (a record
    setting ``forward``)."""
    for k in names:
        if _shadows(type(m), k):
            raise ValueError(
                f"the saved record sets {where} {type(m).__name__}.{k}, which is a method or "
                f"property of the class; nnslim records never do"
            )


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
    _no_shadowing(m, upd.get("attrs", {}), "attribute")
    _no_shadowing(m, upd.get("tensors", {}), "tensor")
    cfg = m.__dict__.get("config")
    if cfg is not None:
        for k in upd.get("config", {}):
            if callable(getattr(type(cfg), k, None)):
                raise ValueError(
                    f"the saved record sets the config field {k!r}, a method of "
                    f"{type(cfg).__name__}; nnslim records never do"
                )
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
    _no_shadowing(m, spec["attrs"], "attribute")
    _no_shadowing(m, spec["tensors"], "tensor")
    _no_shadowing(m, spec["children"], "child")
    for k, v in spec["attrs"].items():
        m.__dict__[k] = _decode_simple(v)
    for name, child in spec["children"].items():
        m._modules[name] = None if child is None else _build(model, child, refs, device)
    _apply_tensors(model, m, spec["tensors"], device)
    for name in spec.get("none_params", []):
        m._parameters[name] = None
    return m


def _np_in(path: str, tensors: Any) -> list[str]:
    return [
        f"{path}.{n}" if path else n
        for n, spec in (tensors or {}).items()
        if isinstance(spec, dict) and spec.get("kind") == "buffer_np" and "tie" not in spec
    ]


def _np_in_spec(path: str, spec: Any) -> list[str]:
    if not isinstance(spec, dict) or "alias" in spec:
        return []
    join = lambda rel: f"{path}.{rel}" if path and rel else (path or rel)  # noqa: E731
    if "ref" in spec:
        return [
            n
            for rel, upd in (spec.get("updates") or {}).items()
            for n in _np_in(join(rel), upd.get("tensors") if isinstance(upd, dict) else None)
        ]
    out = _np_in(path, spec.get("tensors"))
    for name, child in (spec.get("children") or {}).items():
        out += _np_in_spec(join(name), child)
    return out


def non_persistent_buffers(record: Any) -> list[str]:
    """Paths of the non-persistent buffers a saved record's steps create or reshape (``{"entries":
    [{"ops": [...]}, ...]}``): ``state_dict()`` leaves them out and :func:`replay` builds them
    empty, so :func:`nnslim.save` writes their values beside the weights."""
    names: list[str] = []
    entries = record.get("entries", []) if isinstance(record, dict) else []
    for entry in entries if isinstance(entries, list) else []:
        for op in entry.get("ops", []) if isinstance(entry, dict) else []:
            if not isinstance(op, dict):
                continue
            if op.get("op") == "update":
                names += _np_in(op.get("path", ""), op.get("tensors"))
            elif op.get("op") == "replace":
                names += _np_in_spec(op.get("path", ""), op.get("spec"))
    return list(dict.fromkeys(names))


def replay(
    model: nn.Module,
    ops: list[dict[str, Any]],
    device: Any = "cpu",
    budget: tuple[int, int] | None = None,
) -> None:
    """Apply one transform's recorded operations to ``model`` (weights are left uninitialised).
    The operations are checked against the schema first (:func:`check_ops`).

    Raises:
        ValueError: if an operation breaks the schema (naming the field), or the model lacks
            a module or tensor the record refers to.
    """
    check_ops(ops, budget or tensor_budget(model))
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
