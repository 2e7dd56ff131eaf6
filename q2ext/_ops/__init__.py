"""The bottom layer of q2ext: every op's schema, argument checks, fake kernel and autograd
registration, one file per op family (``fake_quant``, ``gb_fusion``, ``ada_loss``, ``gemm``),
plus what all families share (this file).

The kernels live above: C++ (CPU, CUDA) in ``q2ext._C`` registered with
``TORCH_LIBRARY_IMPL``; Triton kernels as separately named ops in ``q2ext/triton``; the
pure-PyTorch reference in ``q2ext/reference``, which ``q2ext/_ext.py`` registers through
:func:`register_reference` when ``q2ext._C`` is not built.  Nothing in this package imports
anything above it.
"""
from __future__ import annotations

import inspect

import torch

LIB = torch.library.Library("q2ext", "DEF")  # noqa: TOR901 - the namespace owner

# Scales (and PACT clips) are used as clamp(s, SCALE_MIN, SCALE_MAX), NaN -> SCALE_MIN:
# FLT_EPSILON is where torch.ao's learnable fake-quant module clamps, FLT_MAX keeps 1/s finite.
SCALE_MIN = 1.1920928955078125e-07  # FLT_EPSILON
SCALE_MAX = 3.4028234663852886e38  # FLT_MAX


def sanitize_scale(s: torch.Tensor) -> torch.Tensor:
    """The one scale rule of every op: NaN, <= 0 or tiny -> SCALE_MIN, > SCALE_MAX -> SCALE_MAX.

    Keeps s's dtype (float64 stays float64); ``torch.where`` so that NaN lands on SCALE_MIN.
    """
    return torch.where(s > SCALE_MAX, SCALE_MAX, torch.where(s >= SCALE_MIN, s, SCALE_MIN)).to(s.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel computes in for inputs of ``dtype``: float64 stays float64,
    everything else (fp32/fp16/bf16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------- reference fallback

_checks: dict = {}
_registered: set = set()


def define(schema: str, check=None) -> None:
    """``LIB.define(schema)``, remembering the op's argument check for :func:`register_reference`.

    ``check`` takes the op's arguments (a prefix of them is enough) and raises with a message
    naming the argument; the compiled kernels run the same checks in C++.
    """
    LIB.define(schema)
    name = schema.split("(", 1)[0]
    if check is not None:
        _checks[name] = check


def register_reference(name: str, impl) -> None:
    """Register ``impl`` as the CPU and CUDA kernel of ``q2ext::<name>``, behind the op's
    argument check, so a direct ``torch.ops.q2ext.<name>`` call is checked exactly as with
    the compiled kernels.  Idempotent (a second call for the same op does nothing)."""
    if name in _registered:
        return
    check = _checks.get(name)
    kernel = impl if check is None else _checked(check, impl)
    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)
    _registered.add(name)


def _checked(check, impl):
    sig = inspect.signature(impl)
    n_check = check.__code__.co_argcount

    def kernel(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)  # the dispatcher omits trailing defaulted args
        bound.apply_defaults()
        full = list(bound.arguments.values())
        check(*full[:n_check])
        return impl(*full)

    kernel.__name__ = getattr(impl, "__name__", "reference_kernel")
    return kernel
