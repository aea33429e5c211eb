"""Wall-clock latency: the median of repeated timed runs after warm-up."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark.utils.timer import timer as clock

from ..base.inputs import Inputs

__all__ = ["RUNTIMES", "Latency", "measure_latency", "num_threads", "time_runs"]

#: where a forward can be timed: torch eager, or the ONNX file :func:`nnslim.export` writes,
#: run in ONNX Runtime (its CPU provider; ``nnslim.io.export.onnxruntime_latency``)
RUNTIMES = ("eager", "onnxruntime")


@dataclass(frozen=True)
class Latency:
    """Latency statistics in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    threads: int

    def __str__(self) -> str:
        return (
            f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}; "
            f"{self.runs} runs, {self.threads} threads)"
        )


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Temporarily set ``torch.set_num_threads`` (``None`` keeps the current setting)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def measure_latency(
    model: nn.Module,
    inputs: Inputs,
    *,
    warmup: int = 3,
    repeat: int = 20,
    threads: int | None = None,
    min_time_s: float = 0.0,
) -> Latency:
    """Time ``model(*inputs)`` under ``torch.no_grad()`` (the exported file in ONNX Runtime:
    :func:`nnslim.io.export.onnxruntime_latency`).

    Args:
        model: the model (its train/eval mode is left as it is).
        inputs: the inputs.
        warmup: untimed runs first.
        repeat: timed runs (at least this many).
        threads: torch intra-op threads for the measurement (``None``: current setting).
        min_time_s: keep timing until this much time has passed (more runs for fast models).
    """
    with num_threads(threads) as nt, torch.no_grad():
        return time_runs(lambda: inputs.call(model), warmup, repeat, min_time_s, nt)


def time_runs(run: Any, warmup: int, repeat: int, min_time_s: float, threads: int) -> Latency:
    """``run()`` timed: the median (and deciles) of at least ``repeat`` calls after ``warmup``,
    until ``min_time_s`` has passed."""
    # torch.utils.benchmark's clock: it waits for the accelerator (CUDA kernels run
    # asynchronously: without it a GPU run would time the launch, not the work)
    times: list[float] = []
    for _ in range(warmup):
        run()
    start = clock()
    while len(times) < repeat or (clock() - start) < min_time_s:
        t0 = clock()
        run()
        times.append((clock() - t0) * 1e3)
        if len(times) > 100 * max(repeat, 1):
            break
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Latency(statistics.median(times), q[0], q[-1], len(times), threads)
