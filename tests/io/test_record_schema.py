"""A record that does not follow the schema nnslim writes is refused before anything of it is
replayed, naming the field; the checksum is recomputed here, as an attacker would."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import nnslim
from nnslim.io.save import CHECKSUM, digest
from nnslim.testing import assert_same_state, model_state


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture
def saved(tmp_path):
    model = base()
    nnslim.Quantize(scheme="int8").apply(model, torch.randn(2, 4))
    path = tmp_path / "m.safetensors"
    nnslim.save(model, path)
    return path


def forge(path, edit):
    """Rewrite ``path`` with its record changed by ``edit`` and a matching checksum."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    record = json.loads(meta["record"])
    edit(record)
    meta["record"] = json.dumps(record)
    meta[CHECKSUM] = digest(meta, state)
    save_file(state, str(path), metadata=meta)


def ops(record, step=0):
    return record["entries"][step]["ops"]


def _first(record, op):
    return next(o for o in ops(record) if o["op"] == op)


def _set_shape(r):
    spec = _first(r, "replace")["spec"]
    name = next(iter(spec["tensors"]))
    spec["tensors"][name]["shape"] = [10**6, 10**6]


def _set_forward(r):
    _first(r, "replace")["spec"]["attrs"]["forward"] = 1


def _update_forward(r):
    ops(r).append({"op": "update", "path": "1", "attrs": {"forward": 1}})


def _set_hooks(r):
    ops(r).append({"op": "update", "path": "1", "attrs": {"_forward_hooks": {}}})


def _set_private_path(r):
    ops(r).append({"op": "alias", "path": "_modules.x", "target": "0"})


def _unknown_op(r):
    ops(r).append({"op": "exec", "path": "0"})


def _extra_field(r):
    _first(r, "replace")["spec"]["code"] = "print(1)"


def _bad_dtype(r):
    spec = _first(r, "replace")["spec"]
    next(iter(spec["tensors"].values()))["dtype"] = "Tensor"


def _deep(r):
    spec = {"class": "torch.nn.modules.container.Sequential", "attrs": {}, "tensors": {}}
    spec["children"] = {}
    node = spec
    for _ in range(200):
        child = {"class": "torch.nn.modules.container.Sequential", "attrs": {}, "tensors": {}}
        child["children"] = {}
        node["children"]["0"] = child
        node = child
    ops(r).append({"op": "replace", "path": "1", "spec": spec})


def _ops_not_list(r):
    r["entries"][0]["ops"] = {"op": "replace"}


def _base_not_object(r):
    r["base"] = [1, 2]


def _huge_list_attr(r):
    ops(r).append({"op": "update", "path": "1", "attrs": {"x": list(range(70_000))}})


def _config_dunder(r):
    ops(r).append({"op": "update", "path": "", "config": {"__class__": 1}})


def _negative(r):
    spec = _first(r, "replace")["spec"]
    next(iter(spec["tensors"].values()))["shape"] = [-1, 4]


def _too_many_in_all(r):
    # each tensor under the per-tensor bound, together far past the bound in all
    for i in range(40):
        ops(r).append(
            {
                "op": "update",
                "path": "1",
                "tensors": {f"b{i}": {"kind": "buffer", "shape": [1 << 24], "dtype": "float32"}},
            }
        )


def _float_dtype_not_float(r):
    r["float_dtypes"] = {"0": "int8"}


def _float_dtype_of_no_module(r):
    r["float_dtypes"] = {"9": "bfloat16"}


CASES = {
    "4 TB shape": (_set_shape, r"tensors\[.*\]\.shape: \[1000000, 1000000\] is 1,000,000,000,000"),
    "attribute hiding forward": (
        _set_forward,
        r"spec\.attrs\['forward'\]: would hide the method or property Int8Linear.forward",
    ),
    "update hiding forward": (_update_forward, "sets attribute ReLU.forward, which is a method"),
    "hook table": (_set_hooks, r"attrs\['_forward_hooks'\]: .* internal to nn.Module"),
    "internal path": (_set_private_path, r"ops\[\d+\]\.path: '_modules' is internal"),
    "unknown op": (_unknown_op, r"ops\[\d+\]\.op: unknown operation 'exec'"),
    "unknown field": (_extra_field, r"unknown field\(s\) \['code'\]"),
    "dtype": (_bad_dtype, r"\.dtype: unknown dtype 'Tensor'"),
    "nesting": (_deep, "nested more than 64 deep"),
    "ops not a list": (_ops_not_list, "expected a list of operations"),
    "base not an object": (_base_not_object, "no object 'base'"),
    "huge list": (_huge_list_attr, r"attrs\['x'\]: a list of 70,000 values"),
    "config dunder": (_config_dunder, r"config\['__class__'\]: config fields"),
    "negative size": (_negative, r"negative size in \[-1, 4\]"),
    "too much in all": (_too_many_in_all, "allocates more than"),
    "float dtype": (_float_dtype_not_float, "'float_dtypes' is malformed"),
    "float dtype of no module": (_float_dtype_of_no_module, "float dtype for '9'"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_record_outside_the_schema_is_refused_before_replay(saved, case):
    edit, message = CASES[case]
    forge(saved, edit)
    model = base()
    before = model_state(model)
    with pytest.raises(ValueError, match=message):
        nnslim.load(saved, model)
    assert_same_state(before, model_state(model), f"after refusing {case}")


def test_the_forged_file_loads_when_the_record_is_left_alone(saved):
    # the forging helper itself is sound: the same rewrite without an edit loads
    forge(saved, lambda r: None)
    model = nnslim.load(saved, base())
    assert type(model[0]).__name__ == "Int8Linear"


def test_every_record_nnslim_writes_follows_the_schema(tmp_path):
    from nnslim.record.edits import check_ops, tensor_budget
    from tests.zoo import TinyCNN

    for t in (
        nnslim.Prune(ratio=0.5),
        nnslim.Quantize(scheme="int4"),
        nnslim.Factorize(ratio=0.5),
        nnslim.ShareWeights(clusters=4),
        nnslim.Compose([nnslim.Prune(ratio=0.3), nnslim.Quantize(scheme="int8")]),
    ):
        model = TinyCNN(width=16)
        budget = tensor_budget(model)
        t.apply(model, torch.randn(2, 3, 8, 8))
        for entry in model._nnslim_record["entries"]:
            check_ops(entry["ops"], budget)
