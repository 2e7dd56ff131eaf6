"""Timing, memory and reporting helpers shared by the q2ext benchmarks.

Every number is the median of repeated runs after warm-up, baselines are measured in
the same process right next to q2ext, and every report starts with the machine (CPU
model and the ISA extensions the kernels can use), thread count, torch version and date.

Peak memory of a step is measured by torch.profiler's memory profile: every allocation
and free of the CPU (or CUDA) allocator during the step, in time order, summed; the peak
of the running sum is the step's peak above what was allocated when it started.  It
counts every tensor, those allocated inside torch.compile'd code and autograd included;
it does not count memory that libraries allocate around the tensor allocator (oneDNN's
scratch space).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .._ext import cpu_isa

# /proc/cpuinfo flags -> the names the tables print, for the ISA extensions q2ext's CPU
# kernels (and oneDNN under PyTorch's convolutions) can use.
_ISA_FLAGS = (("avx512f", "AVX512"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
              ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"), ("amx_bf16", "AMX-BF16"),
              ("amx_int8", "AMX-INT8"), ("avx2", "AVX2"))


def _cpuinfo() -> tuple[str, set]:
    cpu, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == (platform.processor() or "unknown CPU"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return cpu, flags


def cpu_description() -> str:
    """CPU model and the ISA extensions it has, e.g. 'Intel(R) Xeon(R) ... [AVX512, AMX, ...]'."""
    cpu, flags = _cpuinfo()
    isa = [name for flag, name in _ISA_FLAGS if flag in flags]
    if "AVX512" in isa and "AVX2" in isa:
        isa.remove("AVX2")
    return f"{cpu} [{', '.join(isa) if isa else 'no AVX2/AVX-512/AMX flags found'}]"


def machine_info() -> str:
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (f"{datetime.date.today().isoformat()} | {cpu_description()}, {torch.get_num_threads()} threads, "
            f"q2ext CPU path {cpu_isa()}{gpu} | torch {torch.__version__}")


def median_seconds(fn, min_run_time: float = 0.5, sync_cuda: bool = False) -> float:
    """Median wall time of fn() after warm-up: fn runs in blocks sized to ~0.05 s, blocks
    are repeated for at least `min_run_time` (at least 3 blocks), the median block mean is
    returned (torch.utils.benchmark's blocked_autorange rule)."""
    def sync():
        if sync_cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    per_block = max(1, int(0.05 / once))
    means, spent = [], 0.0
    while spent < min_run_time or len(means) < 3:
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        sync()
        dt = time.perf_counter() - t0
        means.append(dt / per_block)
        spent += dt
    return statistics.median(means)


# Lines the profiler writes to the process's stderr: libkineto's start/stop log (and its
# failed GPU query on machines without a GPU driver), and c10's note that a tensor
# allocated before profiling was freed (the measured steps free the previous step's
# tensors).  Not ours, not the user's, no information.
_PROFILER_NOISE = re.compile(r"^((USDT|STAGE|ERROR|WARNING|INFO):\S+ \S+ \d+:\d+ \S+\.cpp:\d+\]"
                             r"|\[W\d+ \S+ CPUAllocator\.cpp:\d+\] Memory block of unknown size)")


@contextlib.contextmanager
def _profiler_lines_dropped():
    """Run the body with fd 2 captured; write back every line except the profiler's noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(True) if not _PROFILER_NOISE.match(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def quiet_profile(**kwargs):
    """``torch.profiler.profile(**kwargs)`` without the profiler's lines on stderr (other
    lines written to stderr meanwhile are written out when it ends)."""
    with _profiler_lines_dropped(), profile(**kwargs) as prof:
        yield prof


def import_cpp_extension_quietly() -> None:
    """Import torch.utils.cpp_extension with its logger quiet.

    Inductor imports it when the benchmarks' torch.compile variants compile, and on a
    machine with a CUDA toolkit but no GPU its import logs "No CUDA runtime is found, using
    CUDA_HOME=...", which says nothing about the benchmark.  Imported once here (the warning
    is only issued at import), later imports are silent."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        log.setLevel(level)


def peak_memory_bytes(fn, setup=None, device: str = "cpu") -> int:
    """Peak bytes allocated above the starting level while fn() runs, after one warm-up
    call and then ``setup()`` (e.g. the optimizer's ``zero_grad(set_to_none=True)``, so
    that the previous step's gradients are gone before the measured step starts); see the
    module docstring for what is counted."""
    fn()
    if setup is not None:
        setup()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with quiet_profile(activities=activities, profile_memory=True) as prof:
        fn()
    want = torch.device(device).type
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).split(".")[-1].lower() == want)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


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
