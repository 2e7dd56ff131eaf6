"""Loads the kernels: the compiled extension q2ext._C if it was built, else the reference
kernels (the one place that registers them); the Triton ops when triton is importable.
Reports what exists.

Importing q2ext never fails because the extension is missing: a warning is issued and
the reference kernels are registered instead.  Nothing here touches a device.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

from . import _ops, reference

try:
    if os.environ.get("Q2EXT_NO_EXTENSION") == "1":  # lets tests exercise the fallback
        raise ImportError("disabled by Q2EXT_NO_EXTENSION=1")
    from . import _C  # noqa: F401  (registers the CPU/CUDA kernels)
except ImportError as exc:
    _C = None
    warnings.warn(
        f"q2ext._C is not built ({exc}); using the pure-PyTorch reference kernels. "
        "Build with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )
    for _name, _kernel in reference.KERNELS.items():
        _ops.register_reference(_name, _kernel)


def has_compiled() -> bool:
    return _C is not None


def compiled_with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


if has_triton():  # registers q2ext::<op>_triton; triton is an optional dependency
    from .triton import fake_quant as _triton_fake_quant  # noqa: F401
    from .triton import gemm as _triton_gemm  # noqa: F401


def cpu_isa() -> str:
    """The CPU code path the kernels use now ('avx512', 'avx2', 'scalar' or 'reference')."""
    return _C.cpu_isa() if _C is not None else "reference"


def set_cpu_isa(name: str) -> None:
    """Force the CPU code path: 'auto', 'avx512', 'avx2' or 'scalar' (for tests and benchmarks)."""
    if _C is None:
        raise RuntimeError("q2ext._C is not built: there is no CPU code path to choose")
    _C.set_cpu_isa(name)
