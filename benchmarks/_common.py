"""Helpers shared by the benchmark scripts: tables, JSON output, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nnslim.base.table import format_table

RESULTS = Path(os.environ.get("NNSLIM_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"command": "python " + " ".join(sys.argv), "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def median_time(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(headers: list[str], rows: list[list[Any]], title: str = "") -> None:
    print(format_table(headers, rows, title=title))
