"""The demo behind ``make demo``: a small CNN on scikit-learn's digits, compressed end to end.

Trains a small CNN on the 8x8 digits that ship inside scikit-learn (no download), profiles it,
prunes it to half its MACs with a short fine-tune, quantizes it to int8, and prints a
before/after table: accuracy, parameters, MACs, size on disk and CPU latency. Two side rows
show the other transforms on the pruned model: factorized (with a short fine-tune) and
weight-shared.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base.inputs import Inputs
from .base.table import format_table, human
from .io.save import save
from .profiling import measure_latency, profile
from .train import Distillation, Trainer, TrainOptions
from .transforms.factorize import Factorize
from .transforms.prune import Prune
from .transforms.quantize import Quantize
from .transforms.share import ShareWeights

__all__ = ["DigitsCNN", "load_digits", "main"]


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digit images."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(4 * width, 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits from scikit-learn as ``(x_train, y_train, x_test, y_test)``, 75/25 split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo needs scikit-learn for its digits data: pip install 'nnslim[demo]'"
        ) from e
    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n = int(0.75 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 3e-3,
    teacher: nn.Module | None = None,
    seed: int = 0,
) -> None:
    """Train with :class:`nnslim.Trainer` (Adam, batch 64), distilling from ``teacher``."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    Trainer(
        optimizer=torch.optim.Adam,
        lr=lr,
        teacher=teacher,
        distillation=Distillation(temperature=2.0, alpha=0.5),
        options=TrainOptions(verbose=False),
    ).fit(model, loader, epochs=epochs)
    model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _row(name: str, model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, Any]:
    example = x_test[:1]
    prof = profile(model, example, memory=False)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        save(model, path)
        size = os.path.getsize(path)
    return {
        "model": name,
        "accuracy": accuracy(model, x_test, y_test),
        "params": prof.params,
        "macs": prof.macs,
        "bytes_on_disk": size,
        "latency_ms": None,
        "_model": copy.deepcopy(model).eval(),
    }


def _latencies(rows: list[dict[str, Any]], x: torch.Tensor, rounds: int = 5) -> None:
    """Time every row's model in turns (round-robin), so that a slow spell of a shared machine
    falls on all of them alike; each row gets the median of its rounds' medians."""
    inputs = Inputs((x,))
    per_row: list[list[float]] = [[] for _ in rows]
    for _ in range(rounds):
        for i, r in enumerate(rows):
            lat = measure_latency(r["_model"], inputs, warmup=2, repeat=10, threads=1)
            per_row[i].append(lat.median_ms)
    for r, times in zip(rows, per_row):
        r["latency_ms"] = statistics.median(times)
        del r["_model"]


def main(print_fn: Callable[[str], None] = print, epochs: int = 12) -> list[dict[str, Any]]:
    """Run the demo and print the table; returns the rows."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits()
    print_fn(f"digits: {len(x_train)} train / {len(x_test)} test images (scikit-learn, 8x8)")
    model = DigitsCNN()
    train(model, x_train, y_train, epochs=epochs)
    rows = [_row("baseline (fp32)", model, x_test, y_test)]
    print_fn(f"\nbaseline profile:\n{profile(model, x_test[:1]).table(depth=1)}")
    teacher = copy.deepcopy(model)

    report = Prune(macs=0.5).apply(model, x_test[:1])
    print_fn(f"\n{report.table(max_rows=8)}")
    rows.append(_row("pruned to 50% MACs", model, x_test, y_test))
    train(model, x_train, y_train, epochs=max(epochs // 2, 1), lr=1e-3, teacher=teacher)
    rows.append(_row("  + fine-tuned (distilled)", model, x_test, y_test))

    # the other two transforms, each on a copy of the pruned model (side branches of the table)
    for name, alt_t, tune in (
        ("  (alt.) + factorized, 70% params, tuned", Factorize(params=0.7), True),
        ("  (alt.) + weights shared, 16 values", ShareWeights(clusters=16), False),
    ):
        alt = copy.deepcopy(model)
        alt_t.apply(alt, x_test[:1])
        if tune:
            train(alt, x_train, y_train, epochs=max(epochs // 4, 1), lr=1e-3, teacher=teacher)
        rows.append(_row(name, alt, x_test, y_test))

    report = Quantize(scheme="int8").apply(model, x_test[:1])
    print_fn(f"\n{report.table(max_rows=8)}")
    rows.append(_row("  + int8 weights", model, x_test, y_test))

    _latencies(rows, x_test[:64])
    base = rows[0]
    table = format_table(
        [
            "model",
            "accuracy",
            "params",
            "MACs",
            "size on disk",
            "latency (bs 64, 1 thread)",
            "vs baseline",
        ],
        [
            [
                r["model"],
                f"{100 * r['accuracy']:.2f}%",
                human(r["params"]),
                human(r["macs"]),
                human(r["bytes_on_disk"], "B"),
                f"{r['latency_ms']:.3f} ms",
                f"size {r['bytes_on_disk'] / base['bytes_on_disk']:.2f}x, "
                f"MACs {r['macs'] / base['macs']:.2f}x, "
                f"latency {r['latency_ms'] / base['latency_ms']:.2f}x",
            ]
            for r in rows
        ],
        title="\nnnslim demo: before/after",
    )
    print_fn(table)
    print_fn(
        f"\n(done in {time.perf_counter() - t0:.1f} s, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)"
    )
    return rows


if __name__ == "__main__":  # pragma: no cover
    main()
