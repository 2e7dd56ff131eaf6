"""Public functional API of the int8/int4 inference GEMM op family.

Inference only (no autograd): QAT trains through fake quant, and :mod:`q2ext.nn`'s
Int8Linear / Int8Conv2d / Int4Linear call these with the learned scales.  Numerics are
defined in :mod:`q2ext.reference.gemm`; the CPU kernels pick AVX512-VNNI (+BF16), AVX2
or scalar tiles at run time (``q2ext.set_cpu_isa`` forces one).  ``w8a8_mm`` and
``w4a16_mm`` also have Triton kernels (q2ext/triton/gemm.py), chosen by
:mod:`q2ext.backend`.  No function here synchronises with the host.
"""
from __future__ import annotations

import torch

from .. import backend
from .._ops import gemm as _layouts

__all__ = ["quantize_activation", "w8a8_mm", "w8a8_linear", "w4a16_mm",
           "pack_int8_weight", "unpack_int8_weight", "pack_int4", "unpack_int4", "dequantize_int4"]


def _tensor(t, name, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")


def quantize_activation(x, scale=None, quant_min=-128, quant_max=127):
    """Quantise activations to 8 bits (or fewer, via the range).

    Args:
        x: [M, K] float32 or bfloat16.
        scale: float32 [1] (per tensor, e.g. a learned LSQ step) or [M] (per row), or
            None for dynamic per-row scales max|x_row| / quant_max.
        quant_min, quant_max: integer range inside [-128, 127] (int8 result) or [0, 255]
            (uint8 result).
    Returns:
        (q [M, K] int8/uint8, scale float32 [1] or [M]) with
        q = round_half_even(clamp(x / scale, quant_min, quant_max)).
    """
    _tensor(x, "x", "quantize_activation")
    return backend.op_for("quantize_activation", x.device.type)(x, scale, quant_min, quant_max)


def w8a8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.float32, relu=False):
    """y = relu?((a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias), int32 accumulation.

    Args:
        a: [M, K] int8 or uint8 (quantised activations).
        b: [N, K] int8 (quantised weights, nn.Linear layout), or
            ``pack_int8_weight(b, signed_act=a.dtype == torch.int8)`` packed once for
            repeated calls (the kernels then skip the per-call repack; N = len(b_scale)).
        a_scale: float32 [M] or [1];  b_scale: float32 [N];  bias: float32 [N] or None.
        out_dtype: torch.float32, torch.bfloat16, or torch.int32 for the raw exact
            accumulator (then no bias/relu).
    Returns: [M, N] of out_dtype.
    """
    _tensor(a, "a", "w8a8_mm")
    return backend.op_for("w8a8_mm", a.device.type)(a, b, a_scale, b_scale, bias, out_dtype, relu)


def pack_int8_weight(w, signed_act=True):
    """Pack an int8 weight [N, K] once for :func:`w8a8_linear`.

    Returns the VNNI panels [ceil(N/64), ceil(K/4), 64, 4]: uint8 (holding w + 128) for
    signed int8 activations, int8 for unsigned (uint8) activations.
    """
    _tensor(w, "w", "pack_int8_weight")
    if w.dim() != 2 or w.dtype != torch.int8:
        raise TypeError(f"pack_int8_weight: w must be a 2-D int8 tensor, got {w.dtype} {list(w.shape)}")
    return _layouts.pack_int8_weight(w, signed_act)


def unpack_int8_weight(w_packed, n, k):
    """Exact inverse of :func:`pack_int8_weight`: the [n, k] int8 weight."""
    return _layouts.unpack_int8_weight(w_packed, n, k)


def w8a8_linear(x, w_packed, w_scale, x_scale=None, bias=None, quant_min=-128, quant_max=127,
                relu=False):
    """Quantise x and multiply by a packed int8 weight in one op (x is read once).

    Args:
        x: [M, K] float32 or bfloat16.
        w_packed: from :func:`pack_int8_weight` (``signed_act = quant_min < 0``).
        w_scale: float32 [N] per-output-channel weight scales.
        x_scale: float32 [1] / [M], or None for dynamic per-row scales.
        bias: float32 [N] or None;  relu: fuse a ReLU into the epilogue.
    Returns: [M, N] in x's dtype, equal to
        ``w8a8_mm(q, w, s, w_scale, bias)`` with ``q, s = quantize_activation(x, ...)``.
    """
    _tensor(x, "x", "w8a8_linear")
    return backend.op_for("w8a8_linear", x.device.type)(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max, relu)


def pack_int4(q):
    """Pack int4 codes [N, K] (integers 0..15; weight = (q - 8) * scale + zero) into the
    uint8 layout [ceil(N/16), K, 8] that :func:`w4a16_mm` reads."""
    _tensor(q, "q", "pack_int4")
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack_int4: q must be a 2-D integer tensor, got {q.dtype} {list(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4: q must hold integers in 0..15")
    return _layouts.pack_int4(q)


def unpack_int4(w_packed, n):
    """Exact inverse of :func:`pack_int4`: uint8 codes [n, K]."""
    return _layouts.unpack_int4(w_packed, n)


def dequantize_int4(w_packed, scales, zeros, group_size):
    """The float32 weight [N, K] that :func:`w4a16_mm` multiplies with."""
    return _layouts.dequantize_int4(w_packed, scales, zeros, group_size)


def w4a16_mm(x, w_packed, scales, zeros, group_size=128):
    """y = x @ W.T with W[n, k] = (q[n, k] - 8) * scales[k // g, n] + zeros[k // g, n].

    Args:
        x: [M, K] float32 or bfloat16 (K a multiple of group_size).
        w_packed: uint8 [ceil(N/16), K, 8] from :func:`pack_int4`.
        scales, zeros: float32 [K / group_size, N].
        group_size: 32, 64 or 128.
    Returns: [M, N] in x's dtype (fp32 accumulation; the AVX-512 kernels factor the
    group scale out of the k loop, bfloat16 x uses AVX512-BF16 where the CPU has it:
    the same result to <= 1e-3 relative error, see :mod:`q2ext.reference.gemm`).
    """
    _tensor(x, "x", "w4a16_mm")
    return backend.op_for("w4a16_mm", x.device.type)(x, w_packed, scales, zeros, group_size)
