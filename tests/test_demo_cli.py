import json
import subprocess
import sys

import pytest

from nnslim import cli
from nnslim.demo import main as demo


def test_demo_prints_before_after_table():
    lines = []
    rows = demo(print_fn=lines.append, epochs=3)
    text = "\n".join(lines)
    assert rows[0]["model"] == "baseline (fp32)"
    assert "nnslim demo: before/after" in text and "size on disk" in text
    base, last = rows[0], rows[-1]
    assert last["macs"] <= 0.5 * base["macs"]
    assert last["bytes_on_disk"] < 0.3 * base["bytes_on_disk"]
    assert base["accuracy"] > 0.8


def test_cli_profile_json(capsys):
    assert cli.main(["profile", "torch.nn:Identity", "--input-shape", "2,3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["macs"] == 0 and out["params"] == 0


def test_cli_profile_table(capsys):
    assert cli.main(["profile", "tests.zoo:TinyCNN", "--input-shape", "1,3,8,8"]) == 0
    assert "conv1" in capsys.readouterr().out


def test_cli_bad_factory():
    with pytest.raises(SystemExit, match="expected MODULE:FACTORY"):
        cli.main(["profile", "torchvision.models.resnet18"])
    with pytest.raises(SystemExit, match="cannot import 'no_such_mod'"):
        cli.main(["profile", "no_such_mod:f"])


def test_python_dash_m_works():
    out = subprocess.run(
        [sys.executable, "-m", "nnslim", "--help"], capture_output=True, text=True, check=True
    )
    assert "profile" in out.stdout and "demo" in out.stdout


def test_cli_compress_with_recipe(tmp_path, capsys):
    import nnslim

    recipe = tmp_path / "recipe.json"
    recipe.write_text(nnslim.Compose([nnslim.Prune(ratio=0.5), nnslim.Quantize()]).to_json())
    out = tmp_path / "m.safetensors"
    code = cli.main(
        [
            "compress",
            "--recipe",
            str(recipe),
            "tests.zoo:TinyCNN",
            "--input-shape",
            "1,3,8,8",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "Compose" in text and "Prune" in text and "saved to" in text
    from tests.zoo import TinyCNN

    model = nnslim.load(out, TinyCNN())
    assert type(model.conv1).__name__ == "Int8Conv2d" and model.conv1.out_channels == 4


def test_cli_compress_bad_recipe(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"_type": "Nope"}')
    with pytest.raises(SystemExit, match="cannot read the recipe"):
        cli.main(["compress", "--recipe", str(bad), "tests.zoo:TinyCNN"])
