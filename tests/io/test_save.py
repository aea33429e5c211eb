import dataclasses
import os

import pytest
import torch
from torch import nn

import nnslim
from nnslim.testing import assert_same_state, model_state
from tests.zoo import TinyCNN, TinyMLP


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Stack(nn.Module):
    def __init__(self, n=3, d=8):
        super().__init__()
        self.config = _Cfg(n_layers=n, hidden=d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def to_dict(self):
        return dict(self.__dict__)


@dataclasses.dataclass(frozen=True)
class TieLayers(nnslim.Transform):
    """Cross-layer sharing: every block uses block 0 (alias), and a config field changes."""

    def _apply(self, model, ctx, report):
        for i in range(1, len(model.layers)):
            model.layers[i] = model.layers[0]
            report.changed(f"layers.{i}", "tied", target="layers.0")
        model.config.shared = True


@dataclasses.dataclass(frozen=True)
class TieWeights(nnslim.Transform):
    """Parameter-level tying and a new buffer."""

    def _apply(self, model, ctx, report):
        model.layers[1].lin.weight = model.layers[0].lin.weight
        model.layers[2].register_buffer("mask", torch.ones(8, dtype=torch.bool))
        report.changed("layers.1.lin", "tied weight")
        report.changed("layers.2", "mask")


@dataclasses.dataclass(frozen=True)
class WrapHead(nnslim.Transform):
    """Moves an existing module inside a new container (recorded as a reference)."""

    def _apply(self, model, ctx, report):
        model.head = nn.Sequential(nn.LayerNorm(8), model.head)
        report.changed("head", "wrapped")


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_plain_model_round_trip(tmp_path):
    m = TinyMLP()
    path = tmp_path / "m.safetensors"
    nnslim.save(m, path)
    m2 = nnslim.load(path, TinyMLP())
    x = torch.randn(3, 16)
    assert torch.equal(_out(m, x), _out(m2, x))


@pytest.mark.parametrize(
    "transform", [TieLayers(), TieWeights(), WrapHead()], ids=lambda t: type(t).__name__
)
def test_structural_edits_replay(tmp_path, transform):
    torch.manual_seed(0)
    m = Stack()
    transform.apply(m)
    x = torch.randn(4, 8)
    path = tmp_path / "m.safetensors"
    nnslim.save(m, path)
    m2 = nnslim.load(path, Stack())
    assert str(m2) == str(m)
    assert torch.equal(_out(m, x), _out(m2, x))
    if isinstance(transform, TieLayers):
        assert m2.layers[2] is m2.layers[0]
        assert m2.config.shared is True
        assert nnslim.profile(m2, x).params == nnslim.profile(m, x).params
    if isinstance(transform, TieWeights):
        assert m2.layers[1].lin.weight is m2.layers[0].lin.weight
        assert m2.layers[2].mask.dtype == torch.bool


def test_tied_weights_are_stored_once(tmp_path):
    import json

    from safetensors import safe_open

    m = Stack()
    TieWeights().apply(m)
    path = tmp_path / "a.safetensors"
    nnslim.save(m, path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        aliases = json.loads(f.metadata()["aliases"])
    assert "layers.0.lin.weight" in keys and "layers.1.lin.weight" not in keys
    assert aliases == {"layers.1.lin.weight": "layers.0.lin.weight"}


def test_pruned_and_quantized_round_trip(tmp_path):
    torch.manual_seed(0)
    m = TinyCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    nnslim.Compose([nnslim.Prune(ratio=0.5), nnslim.Quantize()]).apply(m, x)
    path = tmp_path / "m.safetensors"
    nnslim.save(m, path)
    m2 = nnslim.load(path, TinyCNN())
    assert torch.equal(_out(m, x), _out(m2, x))
    # saved again after loading: the record travels
    nnslim.save(m2, tmp_path / "again.safetensors")
    m3 = nnslim.load(tmp_path / "again.safetensors", TinyCNN())
    assert torch.equal(_out(m, x), _out(m3, x))


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    nnslim.save(TinyMLP(), path)
    good = path.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        nnslim.save(TinyMLP(), path)
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    nnslim.save(TinyMLP(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt|cannot read the weights"):
        nnslim.load(path, TinyMLP())
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        nnslim.load(path, TinyMLP())


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ValueError, match="not written by nnslim.save"):
        nnslim.load(path, TinyMLP())


def test_mismatched_base_names_what_differs(tmp_path):
    path = tmp_path / "m.safetensors"
    nnslim.save(TinyMLP(hidden=32), path)
    base = TinyMLP(hidden=24)
    before = model_state(base)
    with pytest.raises(
        ValueError, match=r"tensors of another shape: fc1.weight \[24, 16\] != \[32, 16\]"
    ):
        nnslim.load(path, base)
    assert_same_state(before, model_state(base), "after a failed load")
    with pytest.raises(ValueError, match="modules missing from the base: fc1"):
        nnslim.load(path, nn.Sequential(nn.Linear(16, 4)))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no file at"):
        nnslim.load("/nonexistent/m.safetensors", TinyMLP())


def test_unrecordable_edit_refuses_to_save(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class AddLambda(nnslim.Transform):
        def _apply(self, model, ctx, report):
            model.fc1.hook = lambda x: x
            report.changed("fc1", "odd")

    m = TinyMLP()
    AddLambda().apply(m)
    with pytest.raises(ValueError, match="cannot be saved with nnslim.save.*AddLambda.*hook"):
        nnslim.save(m, tmp_path / "m.safetensors")


def test_compose_records_each_step_so_moves_and_changes_replay(tmp_path):
    torch.manual_seed(0)
    m = Stack()
    nnslim.Compose([WrapHead(), nnslim.Quantize(select="head.1")]).apply(m)
    assert type(m.head[1]).__name__ == "Int8Linear"
    assert [e["transform"]["_type"] for e in m._nnslim_record["entries"]] == [
        "tests.io.test_save.WrapHead",
        "Quantize",
    ]
    nnslim.save(m, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", Stack())
    x = torch.randn(3, 8)
    assert torch.equal(_out(back, x), _out(m, x))


def test_save_given_state_dict(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    gathered = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    nnslim.save(model, tmp_path / "m.safetensors", state_dict=gathered)
    loaded = nnslim.load(
        tmp_path / "m.safetensors", nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    )
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in loaded.state_dict().values())
    with pytest.raises(ValueError, match=r"missing \['2.bias'\], unknown \['extra'\]"):
        nnslim.save(
            model,
            tmp_path / "bad.safetensors",
            state_dict={
                **{k: v for k, v in gathered.items() if k != "2.bias"},
                "extra": torch.ones(1),
            },
        )
    assert not (tmp_path / "bad.safetensors").exists()
    wrong = {**gathered, "0.bias": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"could never load: 0.bias: \(3, 3\)"):
        nnslim.save(model, tmp_path / "bad.safetensors", state_dict=wrong)
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_save_removes_temporaries_of_writers_that_died(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from nnslim.base.atomic import atomic_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "model.safetensors"
    stale = tmp_path / f".model.safetensors.{dead.pid}.abc.tmp"
    old = tmp_path / ".model.safetensors.xyz.tmp"  # older nnslim: no process id
    live = tmp_path / f".model.safetensors.{os.getppid()}.def.tmp"  # a writer still running
    other = tmp_path / f".other.bin.{dead.pid}.abc.tmp"  # another target's
    for f in (stale, old, live, other):
        f.write_bytes(b"x" * 10)
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists() and not old.exists()
    assert live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, live.name, other.name]
    )


def test_every_flipped_byte_of_a_saved_file_is_caught(tmp_path):
    # a SHA-256 over the metadata and every tensor is written with the file and checked on load
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))

    model = base()
    x = torch.randn(2, 4)
    nnslim.Quantize(scheme="int8").apply(model, x)
    nnslim.save(model, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    bad = tmp_path / "bad.safetensors"
    loaded = []
    for i in range(len(raw)):
        b = bytearray(raw)
        b[i] ^= 0x01
        bad.write_bytes(bytes(b))
        try:
            nnslim.load(bad, base())
            loaded.append(i)
        except (ValueError, FileNotFoundError):
            pass
    assert loaded == []
    assert torch.equal(nnslim.load(tmp_path / "m.safetensors", base())(x), model(x))


def test_a_flipped_weight_byte_is_named_as_corruption(tmp_path):
    model = nn.Linear(4, 3)
    nnslim.save(model, tmp_path / "m.safetensors")
    raw = bytearray((tmp_path / "m.safetensors").read_bytes())
    raw[-1] ^= 0x10  # the last byte of the last tensor
    (tmp_path / "m.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt: its contents do not match the checksum"):
        nnslim.load(tmp_path / "m.safetensors", nn.Linear(4, 3))


def test_a_hand_edit_after_a_transform_is_refused_by_save(tmp_path):
    # load would rebuild the model as the transform left it: ReLU where GELU is now
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    nnslim.Quantize(scheme="int8").apply(model, torch.randn(2, 4))
    nnslim.save(model, tmp_path / "ok.safetensors")  # unchanged: saves
    model[1] = nn.GELU()
    with pytest.raises(ValueError, match=r"changed after its last nnslim transform \(1 is a GELU"):
        nnslim.save(model, tmp_path / "m.safetensors")
    model[1] = nn.ReLU()
    nnslim.save(model, tmp_path / "m.safetensors")  # back as it was: saves
    model[0].bias = None
    with pytest.raises(ValueError, match="tensor 0.bias is gone"):
        nnslim.save(model, tmp_path / "n.safetensors")
    assert not (tmp_path / "n.safetensors").exists()


def test_a_module_that_reads_its_state_version_loads(tmp_path):
    """torchvision's MNASNet refuses a state_dict without the module versions state_dict()
    carries (``_metadata``); the file's tensors get the rebuilt model's versions."""
    from torchvision.models import mnasnet0_5

    torch.manual_seed(0)
    model = mnasnet0_5(weights=None).eval()
    nnslim.Prune(ratio=0.3).apply(model, torch.randn(1, 3, 64, 64))
    path = tmp_path / "m.safetensors"
    nnslim.save(model, path)
    loaded = nnslim.load(path, mnasnet0_5(weights=None))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(loaded.eval()(x), model(x))


class Filtered(nn.Module):
    """A depthwise filter held in a non-persistent buffer (timm's blur pool does this)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        filt = torch.arange(1.0, c + 1).view(c, 1, 1, 1)
        self.register_buffer("filt", filt, persistent=False)
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        y = nn.functional.conv2d(self.conv(x), self.filt, groups=self.filt.shape[0])
        return self.head(y.mean((2, 3)))


@dataclasses.dataclass(frozen=True)
class DropChannels(nnslim.Transform):
    """Removes conv channels 1 and 4, and the matching rows of the non-persistent filter."""

    def _apply(self, model, ctx, report):
        keep = [0, 2, 3, 5, 6, 7]
        with torch.no_grad():
            conv = nn.Conv2d(3, 6, 3, padding=1)
            conv.weight.copy_(model.conv.weight[keep])
            conv.bias.copy_(model.conv.bias[keep])
            head = nn.Linear(6, 2)
            head.weight.copy_(model.head.weight[:, keep])
            head.bias.copy_(model.head.bias)
        model.conv, model.head = conv, head
        model.register_buffer("filt", model.filt[keep].clone(), persistent=False)
        report.changed("conv", "channels")


def test_a_reshaped_non_persistent_buffer_keeps_its_values(tmp_path):
    # state_dict() leaves non-persistent buffers out; a replay used to leave this one as
    # torch.empty memory (silently wrong outputs). The file now carries its values
    torch.manual_seed(0)
    model, x = Filtered(), torch.randn(2, 3, 8, 8)
    DropChannels().apply(model, x)
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", Filtered())
    assert torch.equal(back.filt, torch.tensor([1.0, 3, 4, 6, 7, 8]).view(6, 1, 1, 1))
    assert "filt" not in back.state_dict()  # still non-persistent
    assert torch.equal(_out(back, x), _out(model, x))


def test_a_file_without_a_reshaped_non_persistent_buffer_is_refused(tmp_path):
    from safetensors.torch import load_file

    from nnslim.io.save import NP_PREFIX, _record_of, write_weights

    torch.manual_seed(0)
    model, x = Filtered(), torch.randn(2, 3, 8, 8)
    DropChannels().apply(model, x)
    path = tmp_path / "old.safetensors"
    write_weights(path, _record_of(model), model.state_dict())  # as nnslim wrote it before
    assert not any(k.startswith(NP_PREFIX) for k in load_file(path))
    base = Filtered()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"\['filt'\] are non-persistent buffers"):
        nnslim.load(path, base)
    assert base.conv.out_channels == 8 and all(
        torch.equal(v, before[k]) for k, v in base.state_dict().items()
    )


def test_a_base_in_another_float_dtype_is_refused_and_left_as_it_was(tmp_path):
    torch.manual_seed(0)
    model, x = TinyMLP(), torch.randn(2, 16)
    nnslim.Factorize(ratio=0.5).apply(model, x)
    nnslim.save(model, tmp_path / "m.safetensors")
    base = TinyMLP().half()
    before = model_state(base)
    with pytest.raises(ValueError, match="base model's floating tensors are float16 but the"):
        nnslim.load(tmp_path / "m.safetensors", base)
    assert_same_state(before, model_state(base), "the refused base")
    # built as saved, then cast: the documented way
    back = nnslim.load(tmp_path / "m.safetensors", TinyMLP()).half()
    assert back(x.half()).dtype == torch.float16


@pytest.mark.parametrize(
    "make",
    [
        lambda: nnslim.Factorize(ratio=0.5),
        lambda: nnslim.Prune(ratio=0.5, structure="unstructured", pack=True),
        lambda: nnslim.ShareWeights(clusters=4),
        lambda: nnslim.Quantize(scheme="int8"),
        lambda: nnslim.Quantize(scheme="int8-dynamic"),
        lambda: nnslim.Quantize(scheme="int4", group_size=32, select=["2"]),
    ],
    ids=["factorize", "packed", "share", "int8", "int8-dynamic", "int4"],
)
def test_a_model_cast_after_its_transform_loads_in_the_dtype_it_was_saved(tmp_path, make):
    """The record rebuilds a module in the dtype its transform ran in; the file holds the
    tensors as saved (after a cast to bf16): loading gives them the file's dtype (factorized
    layers came back fp32 inside a bf16 model, and the forward failed)."""

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                             nn.Linear(32, 4))  # fmt: skip

    x = torch.randn(3, 16)
    model = mlp()
    make().apply(model, x)
    model = model.to(torch.bfloat16)
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", mlp().to(torch.bfloat16))
    dtypes = {v.dtype for v in back.state_dict().values() if v.is_floating_point()}
    assert dtypes == {v.dtype for v in model.state_dict().values() if v.is_floating_point()}
    # a quantized layer's weight is rebuilt in the dtype it computes in (its recorded
    # float_dtype, which the cast changed after the transform recorded it)
    for (p, m), n in zip(model.named_modules(), back.modules(), strict=True):
        if hasattr(m, "float_dtype"):
            assert m.float_dtype == n.float_dtype == "bfloat16", p
            assert n.weight.dtype == torch.bfloat16, p
    with torch.no_grad():
        assert torch.equal(back(x.bfloat16()), model(x.bfloat16()))
    # the record a loaded model carries has no float dtypes (a later save writes its own)
    assert "float_dtypes" not in back._nnslim_record


def test_a_module_of_ours_float_dtype_name_is_not_taken_for_a_quantized_layer(tmp_path):
    """A user's module with a ``float_dtype`` attribute of its own (not a torch dtype name) is
    not recorded as a quantized layer's: the file saves and loads."""

    class Tagged(nn.Linear):
        float_dtype = "fp16"

    def build():
        torch.manual_seed(0)
        return nn.Sequential(Tagged(8, 8), nn.ReLU(), nn.Linear(8, 4))

    model, x = build(), torch.randn(2, 8)
    nnslim.Quantize(scheme="int8", select=["2"]).apply(model, x)
    nnslim.save(model, tmp_path / "m.safetensors")
    back = nnslim.load(tmp_path / "m.safetensors", build())
    assert back[0].float_dtype == "fp16" and back[2].float_dtype == "float32"
    assert torch.equal(back(x), model(x))


def test_a_training_checkpoint_of_a_cast_quantized_model_loads_in_its_dtype(tmp_path):
    """The Trainer's checkpoints are nnslim files too: a quantized layer of a model cast to
    bf16 after its transform loads computing in bf16 and saying so."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    model, x = build(), torch.randn(4, 64)
    nnslim.Quantize(scheme="int8-dynamic", select=["0"]).apply(model, x)
    model = model.to(torch.bfloat16)
    data = [(x.bfloat16(), torch.randint(0, 4, (4,)))]
    opts = nnslim.TrainOptions(verbose=False)
    nnslim.Trainer(lr=1e-3, options=opts).fit(model, data, checkpoint_dir=tmp_path)
    (saved,) = tmp_path.glob("step-*/model.safetensors")
    back = nnslim.load(saved, build().to(torch.bfloat16))
    assert back[0].float_dtype == "bfloat16" and back[0].weight.dtype == torch.bfloat16
    assert torch.equal(back(x.bfloat16()), model(x.bfloat16()))
