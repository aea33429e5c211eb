"""Wall-clock latency: the median of repeated timed runs after warm-up."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark.utils.timer import timer as clock

from ..base.inputs import Inputs

__all__ = ["RUNTIMES", "Latency", "measure_latency", "num_threads"]

#: where a forward can be timed: torch eager, or the ONNX file ``nnslim.export`` writes run in
#: ONNX Runtime (its CPU provider)
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
    runtime: str = "eager",
) -> Latency:
    """Time ``model(*inputs)`` under ``torch.no_grad()``, or the model exported and run in
    ONNX Runtime.

    Args:
        model: the model (its train/eval mode is left as it is).
        inputs: the inputs.
        warmup: untimed runs first.
        repeat: timed runs (at least this many).
        threads: intra-op threads for the measurement (``None``: torch's current setting).
        min_time_s: keep timing until this much time has passed (more runs for fast models).
        runtime: ``"eager"`` (torch) or ``"onnxruntime"``: the model written by
            :func:`nnslim.export` (fixed shapes, its integer layers as ONNX Runtime's integer
            operators) and timed in an ONNX Runtime CPU session with ``threads`` intra-op
            threads (the session's creation, where it folds constants, is not timed).
    """
    if runtime not in RUNTIMES:
        raise ValueError(
            f"measure_latency(runtime=...): expected one of {', '.join(RUNTIMES)}, got {runtime!r}."
        )
    if runtime == "onnxruntime":
        return _onnxruntime_latency(model, inputs, warmup, repeat, threads, min_time_s)
    with num_threads(threads) as nt, torch.no_grad():
        return _timed(lambda: inputs.call(model), warmup, repeat, min_time_s, nt)


def _timed(run: Any, warmup: int, repeat: int, min_time_s: float, threads: int) -> Latency:
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


def _onnxruntime_latency(
    model: nn.Module,
    inputs: Inputs,
    warmup: int,
    repeat: int,
    threads: int | None,
    min_time_s: float,
) -> Latency:
    from ..io.export import export, onnxruntime_feed, require_packages

    require_packages("onnx", "onnxruntime")
    import onnxruntime as ort

    n = threads if threads is not None else torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="nnslim-ort-") as d:
        path = export(model, inputs, os.path.join(d, "m.onnx"), dynamic=False, check=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = n
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = onnxruntime_feed(session, inputs)
    return _timed(lambda: session.run(None, feed), warmup, repeat, min_time_s, n)
