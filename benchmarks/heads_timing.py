"""Timing for the head-count study: interleaved rounds over every (runtime, head count) model of a
cell, medians per model, and the facts of the machine that ran them (used by ``inference_heads.py``).

For each (batch, seq) cell the models are timed side by side in one run: warm-up, then interleaved
rounds (round-robin over the models, the starting model rotating each round), median per model,
so machine noise hits all of them alike. A call shorter than ``min_measure_s`` is repeated inside
one measurement, the same count for every model of the cell.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import transformers

#: A model of a cell: (runtime, head count), e.g. ("torch", 12) or ("onnxruntime", 3).
Key = tuple[str, int]


class Timer(Protocol):
    """Seconds per call of ``fn`` (which runs one forward), measured over ``number`` calls."""

    def __call__(
        self, fn: Callable[[], object], *, heads: int, batch: int, seq: int, number: int
    ) -> float: ...


def make_wall_timer(device: str) -> Timer:
    """Wall-clock seconds per call, the device synchronised before and after (CUDA)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timer(fn, *, heads, batch, seq, number):
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        return (time.perf_counter() - start) / number

    return timer


@dataclass
class Cell:
    """The timings of one (batch, seq) cell: seconds per call, one entry per round, per model."""

    batch: int
    seq: int
    rounds: int
    number: int
    times: dict[Key, list[float]]

    def ms(self, h: int, runtime: str = "torch") -> float:
        """Median milliseconds per call of the ``h``-head model on ``runtime``."""
        return 1000.0 * statistics.median(self.times[(runtime, h)])

    def spread_pct(self, h: int, runtime: str = "torch") -> float:
        """Interquartile range of the rounds relative to the median, in %."""
        values = self.times[(runtime, h)]
        if len(values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return 100.0 * (q3 - q1) / statistics.median(values)


def reduction_pct(t_base: float, t_h: float) -> float:
    """Time reduction of a head count vs the baseline, in %: (t_base − t_h) / t_base."""
    return 100.0 * (t_base - t_h) / t_base


def time_cell(
    calls: dict[Key, Callable[[], object]],
    *,
    batch: int,
    seq: int,
    timer: Timer,
    device: str,
    warmup: int,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    min_measure_s: float,
) -> Cell:
    """Warm every model up, then time them in interleaved rounds; the rounds are chosen from
    ``budget_s`` (at least ``min_rounds``, at most ``max_rounds``)."""
    keys = list(calls)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm: dict[Key, float] = {}
    for _ in range(max(1, warmup)):  # interleaved too; the last pass's wall time calibrates the cell
        for key in keys:
            sync()
            start = time.perf_counter()
            calls[key]()
            sync()
            warm[key] = time.perf_counter() - start
    number = max(1, math.ceil(min_measure_s / max(min(warm.values()), 1e-9)))
    round_cost = number * sum(warm.values())
    rounds = max(min_rounds, min(max_rounds, int(budget_s // max(round_cost, 1e-9))))
    times: dict[Key, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(timer(calls[key], heads=key[1], batch=batch, seq=seq, number=number))
    return Cell(batch, seq, rounds, number, times)


def device_facts(device: str, runtimes: list[str] | tuple[str, ...] = ("torch",)) -> list[str]:
    """Versions, the CPU (and GPU) model, thread counts and the load average at start: what a
    reader needs to judge the timings."""
    facts = [
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"
    ]
    if "onnxruntime" in runtimes:
        import onnxruntime

        facts[0] += f", onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        facts.append(f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    model_name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    threads = f"torch threads {torch.get_num_threads()}"
    if "onnxruntime" in runtimes:
        threads += f", onnxruntime intra-op threads {torch.get_num_threads()}"
    facts.append(
        f"CPU: {model_name}; {os.cpu_count()} logical CPUs; {threads}; "
        f"load average (1/5/15 min) at start: {load}"
    )
    return facts
