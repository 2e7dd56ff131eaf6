"""Which kernel runs an op: the one readable selector.

Backends:
  ``native``  the ``q2ext::<op>`` op: q2ext._C's C++ kernel on CPU/CUDA, or the
              pure-PyTorch reference when the extension is not built;
  ``triton``  the separately named ``q2ext::<op>_triton`` op (CUDA, or CPU under
              ``TRITON_INTERPRET=1`` for tests).

Ops with a Triton variant: fake_quant (and its backward), w8a8_mm, w4a16_mm; the others
(gb_fusion, ada_loss, quantize_activation, w8a8_linear) run natively whatever the backend.
Every op family's public wrapper asks :func:`op_for` which op to call.

``auto`` (the default; override with ``Q2EXT_BACKEND`` or :func:`set_backend`) takes
``native`` when it has a compiled kernel for the device, else ``triton`` when it can
run there, else ``native`` (reference).  Asking for a backend that cannot run raises an
error listing every reason.  Nothing here queries a device at import time.
"""
from __future__ import annotations

import os

import torch

from . import _ext

BACKENDS = ("auto", "native", "triton")
TRITON_OPS = frozenset({"fake_quant", "fake_quant_backward", "w8a8_mm", "w4a16_mm"})
_requested = None


def set_backend(name: str) -> None:
    """Force the backend for every q2ext op: 'auto', 'native' or 'triton'."""
    global _requested
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _requested = name


def requested_backend() -> str:
    name = _requested or os.environ.get("Q2EXT_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"Q2EXT_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def _native_reasons(device_type: str) -> list[str]:
    if device_type == "cpu":
        return [] if _ext.has_compiled() else ["q2ext._C is not built (reference kernels only)"]
    if device_type == "cuda":
        if not _ext.has_compiled():
            return ["q2ext._C is not built (reference kernels only)"]
        if not _ext.compiled_with_cuda():
            return ["q2ext._C was built without CUDA (Q2EXT_USE_CUDA=0 or no toolkit)"]
        return []
    return [f"no native kernel for device type {device_type!r}"]


def _triton_reasons(device_type: str) -> list[str]:
    reasons = []
    if not _ext.has_triton():
        reasons.append("triton is not importable")
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        reasons.append("Triton runs on the CPU only under TRITON_INTERPRET=1")
    elif device_type not in ("cpu", "cuda"):
        reasons.append(f"Triton has no kernels for device type {device_type!r}")
    return reasons


def select(device_type: str) -> str:
    """'native' or 'triton' for a tensor on `device_type`, per the rules above."""
    want = requested_backend()
    if want == "auto":
        if not _native_reasons(device_type):
            return "native"
        if device_type == "cuda" and not _triton_reasons(device_type):
            return "triton"
        return "native"  # reference fallback, always available
    reasons = _native_reasons(device_type) if want == "native" else _triton_reasons(device_type)
    if want == "native" and reasons == ["q2ext._C is not built (reference kernels only)"]:
        return "native"
    if reasons:
        raise RuntimeError(f"q2ext backend {want!r} cannot run on {device_type}: " + "; ".join(reasons))
    return want


def op_for(name: str, device_type: str):
    """The op that runs ``q2ext::<name>`` on ``device_type``: ``torch.ops.q2ext.<name>`` (native)
    or ``torch.ops.q2ext.<name>_triton`` when :func:`select` picks Triton and the op has a Triton
    variant (:data:`TRITON_OPS`).  Raises, listing every reason, when the requested backend
    cannot run on the device."""
    if name in TRITON_OPS and select(device_type) == "triton":
        return getattr(torch.ops.q2ext, name + "_triton")
    return getattr(torch.ops.q2ext, name)


def cache_dir() -> str:
    """Where q2ext keeps what it measures or trains once per machine (int8 engine choices, the
    demo's FP32 checkpoints): ``$Q2EXT_CACHE_DIR``, else ``$XDG_CACHE_HOME/q2ext``, else
    ``~/.cache/q2ext``."""
    if os.environ.get("Q2EXT_CACHE_DIR"):
        return os.environ["Q2EXT_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "q2ext")
