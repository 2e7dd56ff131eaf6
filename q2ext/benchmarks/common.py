"""Timing and reporting helpers shared by the q2ext benchmarks.

Every number is the median of repeated runs after warm-up (torch.utils.benchmark),
baselines are measured in the same process right next to q2ext, and every report starts
with the machine, thread count, torch version and date.
"""
from __future__ import annotations

import datetime
import platform

import statistics

import torch
from torch.utils import benchmark

from .._ext import cpu_isa


def machine_info() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (f"{datetime.date.today().isoformat()} | {cpu}, {torch.get_num_threads()} threads, "
            f"q2ext CPU path {cpu_isa()}{gpu} | torch {torch.__version__}")


def median_seconds(fn, min_run_time: float = 0.5, sync_cuda: bool = False) -> float:
    """Median wall time of fn() after warm-up."""
    for _ in range(2):
        fn()
    if sync_cuda:
        torch.cuda.synchronize()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_medians(fns, min_run_time: float = 0.5, rounds: int = 5, sync_cuda: bool = False) -> list:
    """Median wall time of each fn, measured in interleaved rounds (fn0, fn1, ..., fn0, ...),
    each round a median over min_run_time / rounds; returns the median over rounds per fn.
    A slow spell of a shared machine then hits every path, not just the one it fell on."""
    fns = list(fns)
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(median_seconds(fn, min_run_time / rounds, sync_cuda=sync_cuda))
    return [statistics.median(t) for t in times]


def print_table(rows, headers) -> str:
    """Render rows (lists of str) as a GitHub-markdown table; returns the text."""
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    lines = [fmt.format(*headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
