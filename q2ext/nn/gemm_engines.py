"""Which GEMM engine runs each int inference layer, on the machine at hand.

Engines:
  ``q2ext``   q2ext's own kernels (:func:`q2ext.ops.w8a8_linear` / ``w8a8_mm`` /
              ``w4a16_mm``: AVX512-VNNI/AVX2 C++ tiles, CUDA, Triton); every device.
  ``onednn``  oneDNN through torch's own ops (``torch.ops.onednn.qlinear_pointwise`` /
              ``qconv2d_pointwise``, weights prepacked once, bias and ReLU as post-ops):
              int8 layers on x86 CPUs.  oneDNN picks its ISA itself (AMX-INT8 where the CPU
              has it, else VNNI / AVX2), so the engine runs on every x86 CPU.  Its int8
              conv is offered only on shapes where it was verified (square kernels, the
              usual paddings, >= 2x2 strided outputs: see Int8Conv2d); signed int8 codes
              reach it as uint8 with zero point 128, the same numbers.
  ``torch``   torch's weight-only int4 CPU GEMM (``aten._weight_int4pack_mm_for_cpu``):
              Int4Linear on the CPU.

Hand-written kernels win on some CPUs and lose badly on others, so nothing is fixed
here: with ``auto`` (the default) the first forward of a layer with a new input shape
times every engine that can run it, on that very input (one warm-up call, then
interleaved rounds; the fastest call wins), like cuDNN's benchmark mode; an engine whose output
there differs from q2ext's beyond epilogue rounding is ruled out for the shape.  The decision is
cached per (shape, machine): in memory, and in ``<cache dir>/gemm_engines.json``
(``$Q2EXT_CACHE_DIR``, else ``$XDG_CACHE_HOME/q2ext``, else ``~/.cache/q2ext``) so a
later process on the same machine does not measure again.  The machine key is the CPU
model, the thread count, q2ext's CPU path and the torch version.

Overrides, most specific first: ``layer.engine = "onednn"`` (or ``q2ext.convert(...,
engine=...)``), then ``Q2EXT_INT8_ENGINE=q2ext|onednn|auto`` (int8 layers) and
``Q2EXT_INT4_ENGINE=q2ext|torch|auto`` (Int4Linear).  Forcing an engine that cannot run
an input raises, listing why.  Under ``torch.compile`` nothing is timed and every layer
runs q2ext's kernels: they trace and lower everywhere, while Inductor's lowering of
oneDNN's ops wants the packed weight as a graph constant (a layer attribute is not).
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings

import torch

from .._ext import cpu_isa
from ..backend import cache_dir

INT8_ENGINES = ("q2ext", "onednn")
INT4_ENGINES = ("q2ext", "torch")
ENV = {"int8": "Q2EXT_INT8_ENGINE", "int4": "Q2EXT_INT4_ENGINE"}
_ENGINES = {"int8": INT8_ENGINES, "int4": INT4_ENGINES}
CACHE_FILE = "gemm_engines.json"

_memory: dict = {}  # {machine key: {shape key: engine}}
_loaded_from: set = set()  # cache files already merged into _memory


def check_engine(name, kind="int8", what="engine"):
    """``name`` if it is 'auto' or an engine of `kind` ('int8' or 'int4'), else ValueError naming `what`."""
    allowed = ("auto",) + _ENGINES[kind]
    if name not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {name!r}")
    return name


def requested_engine(kind="int8") -> str:
    """The engine asked for by the environment (``Q2EXT_INT8_ENGINE`` / ``Q2EXT_INT4_ENGINE``), default 'auto'."""
    return check_engine(os.environ.get(ENV[kind], "auto"), kind, ENV[kind])


def onednn_reasons(x: torch.Tensor) -> list:
    """Why the oneDNN engine cannot run on `x` ([] when it can)."""
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"oneDNN runs on the CPU, the input is on {x.device}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reasons.append(f"oneDNN's int8 ops are used on x86 CPUs only, this is {platform.machine()}")
    if not torch.backends.mkldnn.is_available():
        reasons.append("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    elif not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        reasons.append("this torch build lacks torch.ops.onednn.qlinear_pointwise")
    return reasons


def int4pack_reasons(x: torch.Tensor, n: int, k: int, group_size: int) -> list:
    """Why torch's int4pack CPU GEMM cannot run an Int4Linear on `x` ([] when it can)."""
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"aten._weight_int4pack_mm_for_cpu runs on the CPU, the input is on {x.device}")
    if n % 16:
        reasons.append(f"aten._weight_int4pack_mm_for_cpu needs out_features % 16 == 0, got {n}")
    if k % 2 or k % group_size:
        reasons.append(f"aten._weight_int4pack_mm_for_cpu needs in_features even and a multiple of group_size, got {k}")
    return reasons


_cpu_name = None


def machine_key() -> str:
    """CPU model, thread count, q2ext's CPU path and torch version (what a choice depends on)."""
    global _cpu_name
    if _cpu_name is None:
        _cpu_name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                _cpu_name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), _cpu_name)
        except OSError:
            pass
    return f"{_cpu_name} | {torch.get_num_threads()} threads | q2ext {cpu_isa()} | torch {torch.__version__}"


def settled(layer_engine: str, chosen, kind: str = "int8") -> bool:
    """Whether a layer may reuse `chosen`, the engine it ran for this shape before, without
    asking again: the layer's and the environment's settings still allow it.  Keeps the
    per-call cost of the choice to two dict lookups."""
    return chosen is not None and layer_engine in ("auto", chosen) and \
        os.environ.get(ENV[kind], "auto") in ("auto", chosen)


def _cache_path():
    return os.path.join(cache_dir(), CACHE_FILE)


def _load():
    path = _cache_path()
    if path in _loaded_from:
        return
    _loaded_from.add(path)
    try:
        with open(path) as f:
            disk = json.load(f)
    except (OSError, ValueError):
        return  # no cache yet, or a broken one: it is only a cache
    if isinstance(disk, dict):
        for mk, table in disk.items():
            if isinstance(table, dict):
                _memory.setdefault(mk, {}).update({k: v for k, v in table.items() if isinstance(v, str)})


def _save():
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(_memory, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError:
        pass  # read-only home etc.: the in-memory cache still holds


def cached_engine(shape_key: str):
    """The engine recorded for `shape_key` on this machine, or None."""
    _load()
    return _memory.get(machine_key(), {}).get(shape_key)


def clear_cache(disk: bool = False) -> None:
    """Forget every measured choice (in memory; also the cache file with ``disk=True``)."""
    _memory.clear()
    _loaded_from.clear()
    if disk:
        try:
            os.remove(_cache_path())
        except OSError:
            pass


def agree(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether two engines' outputs are the same numbers up to epilogue rounding (and, for
    bf16, the output's own rounding): max |got - ref| <= tol * max |ref|.  A wrong result
    (a mis-read layout, a wrong accumulator) is off by O(1) of that scale."""
    tol = 1e-4 if ref.dtype == torch.float32 else 3e-2
    if got.shape != ref.shape:
        return False
    scale = float(ref.float().abs().max()) if ref.numel() else 0.0
    return bool(ref.numel() == 0 or float((got.float() - ref.float()).abs().max()) <= tol * scale + 1e-6)


def measure(candidates: dict, rounds: int = 3, calls: int = 2, outputs: dict | None = None) -> dict:
    """{engine: seconds} of the zero-argument callables in `candidates`: one warm-up call
    each (oneDNN creates its primitive there; its result goes to `outputs` when given),
    then `rounds` interleaved rounds of `calls` calls; each engine's fastest call counts.
    Interference from other processes only ever adds time, so the minimum is the least
    noisy estimate, and interleaving spreads a slow spell over every engine."""
    for name, fn in candidates.items():
        out = fn()
        if outputs is not None:
            outputs[name] = out
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            best = float("inf")
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name].append(best)
    return {name: min(t) for name, t in times.items()}


def choose(shape_key: str, candidates: dict, reasons: dict, forced: str = "auto", kind: str = "int8") -> str:
    """The engine for one layer call.

    Args:
        shape_key: the layer and input shape (what the cache is keyed on, with the machine).
        candidates: {engine: zero-argument callable running the call} for the engines
            that can run it.
        reasons: {engine: [why not]} for the engines that cannot.
        forced: the layer's own setting ('auto' defers to the environment).
        kind: 'int8' or 'int4' (which environment variable applies).
    """
    want = check_engine(forced, kind, "the layer's engine") if forced != "auto" else requested_engine(kind)
    if want != "auto":
        if want not in candidates:
            raise RuntimeError(f"int engine {want!r} cannot run this layer ({shape_key}): "
                               + "; ".join(reasons.get(want, ["not available"])))
        return want
    if len(candidates) == 1:
        return next(iter(candidates))
    hit = cached_engine(shape_key)
    if hit in candidates:
        return hit
    outputs = {}
    times = measure(candidates, outputs=outputs)
    # An engine whose result differs from q2ext's (the reference-tested kernels) on this
    # very input is not used for the shape: oneDNN's int8 conv gave wrong numbers for
    # some rare shapes in testing, and a speed win is no reason to risk that.
    wrong = [e for e in times if e != "q2ext" and not agree(outputs[e], outputs["q2ext"])]
    for e in wrong:
        warnings.warn(f"int engine {e!r} disagrees with q2ext's kernels on {shape_key}; not used for it",
                      RuntimeWarning, stacklevel=3)
        del times[e]
    best = min(times, key=times.get)
    _memory.setdefault(machine_key(), {})[shape_key] = best
    _save()
    return best
