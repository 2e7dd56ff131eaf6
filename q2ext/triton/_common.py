"""Pieces shared by q2ext's Triton kernels (fake quant, int GEMMs).

* ``_mul`` / ``_div``: fp32 operations rounded once each, so that a kernel matches the
  C++ kernels and the references bit for bit on a GPU (Triton contracts mul + add into
  FMAs by default; ``/`` is approximate on NVIDIA);
* ``_load_f32`` / ``_to_storage``: bf16 <-> fp32 by hand (the interpreter's fp32 -> bf16
  cast truncates; the references round to nearest even);
* ``register_op``: one place that decides how a Triton op is registered (triton_op on
  a GPU, an opaque custom op under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, like triton itself: tests/conftest.py sets it before anything imports triton.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
I64_LIMIT = 2**31  # offsets at or above this need 64-bit arithmetic


@triton.jit
def _mul(a, b, RN: tl.constexpr):
    """fp32 a * b rounded once, never fused with a following add.

    RN (compiled CUDA code): PTX ``mul.rn.f32`` as inline assembly, like CUDA's
    ``__fmul_rn``: an explicit rounding modifier keeps ptxas from contracting it into an
    FMA, and the asm keeps LLVM from turning it back into a plain ``fmul`` (it does so
    with libdevice's ``mul_rn``, which moreover flushes subnormals under Triton's FTZ
    setting).  Under the interpreter numpy rounds every operation anyway.
    """
    if RN:
        a, b = tl.broadcast(a, b)
        r = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        r = a * b
    return r


@triton.jit
def _div(a, b, RN: tl.constexpr):
    """IEEE division (Triton's ``/`` is approximate on NVIDIA GPUs)."""
    if RN:
        r = tl.math.div_rn(a, b)
    else:
        r = a / b
    return r


@triton.jit
def _load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask)
    if IS_BF16:
        bits = v.to(tl.uint16, bitcast=True).to(tl.uint32)
        f = (bits << 16).to(tl.float32, bitcast=True)
    else:
        f = v.to(tl.float32)
    return f


@triton.jit
def _to_storage(f, out_ptr, IS_BF16: tl.constexpr):
    """fp32 -> the element type of out_ptr, rounding to nearest even."""
    if IS_BF16:
        u = f.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        quiet = (u >> 16) | 0x40
        bits = tl.where(f != f, quiet, rounded)
        r = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = f.to(out_ptr.dtype.element_ty)
    return r


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _use_rn(x: torch.Tensor) -> bool:
    """Explicitly rounded PTX multiplies and div_rn: compiled CUDA code only.

    (Not the interpreter; on ROCm plain operations are used, which the compiler may
    contract into FMAs: q2ext's bit-exactness guarantee covers CUDA.)"""
    return x.device.type == "cuda" and not INTERPRET and torch.version.hip is None


def register_op(qualname: str, fn, schema: str, fake):
    """Register ``fn`` (which launches its kernels through ``torch.library.wrap_triton``)
    as the op ``qualname``; returns the ``torch.ops`` overload packet.

    Compiled Triton (CUDA): ``torch.library.triton_op``, so that torch.compile/Inductor
    sees the kernels through wrap_triton.  Under TRITON_INTERPRET=1, wrap_triton hands
    back the interpreted kernel itself (it cannot be traced), and triton_op's
    fake/functional implementations would launch it on fake tensors; ``fn`` is then an
    opaque custom op with the shared fake kernel ``fake``.
    """
    if INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=(), schema=schema)
        op.register_fake(fake)
    else:
        torch.library.triton_op(qualname, fn, mutates_args=(), schema=schema)
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name)
