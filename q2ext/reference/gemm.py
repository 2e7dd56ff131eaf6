"""Pure-PyTorch semantics of the int8/int4 inference GEMM ops: the test oracle and the
fallback kernels when q2ext._C is not built.  Written for clarity, not speed.

Activation quantisation (``quantize_activation``; also the first half of ``w8a8_linear``)::

    s = scale clamped to [FLT_EPSILON, FLT_MAX]   (NaN -> FLT_EPSILON), or, without a
        scale, per row s = max|x_row| * (1 / quant_max), clamped the same way
    q = round_half_even(clamp(x * (1 / s), quant_min, quant_max))   (NaN -> 0)

stored as int8 when quant_min < 0, else uint8 (same rounding as q2ext's fake quant).

W8A8 (``w8a8_mm``, ``w8a8_linear``): ``acc[m, n] = sum_k a[m, k] * b[n, k]`` in int32
(wrapping), then in fp32 with each product rounded:
``y = ((acc * a_scale[m]) * b_scale[n]) + bias[n]``, optional ReLU, cast to out_dtype.

W4A16 (``w4a16_mm``): ``w[n, k] = (q[n, k] - 8) * scales[k // g, n] + zeros[k // g, n]``
(tinygemm's convention), ``y = x @ w.T`` in fp32, cast to x's dtype.  The kernels agree
with this to fp32 accumulation accuracy (<= 1e-3 relative, norm-wise, before the cast),
not bit for bit: the AVX2 and scalar tiles dequantise each weight and multiply-add in
fp32; the AVX-512 tiles factor the group constants out,
``y = sum_g (scales[g] * sum_{k in g} x[:, k] * (q[:, k] - 8) + zeros[g] * sum_{k in g} x[:, k])``,
in fp32 FMAs for fp32 x and, for bfloat16 x on AVX512-BF16 CPUs, with the exact
products x * (q - 8) accumulated in fp32 by VDPBF16PS (when x holds a nonzero
|x| < 2^-96, which that instruction could flush, the fp32 tile is used instead).  Calls
with inf / NaN in x dequantise each weight, so they give the same inf / NaN outputs.
"""
from __future__ import annotations

import torch

from .._ops import sanitize_scale
from .._ops.gemm import dequantize_int4, unpack_int8_weight


def quantize_activation(x, scale, quant_min, quant_max):
    """(q, effective scale [M] or [1]) for x [M, K] fp32/bf16."""
    xf = x.float()
    if scale is None:
        mag = torch.where(torch.isnan(xf), 0.0, xf.abs())  # NaN never wins; inf stays inf
        s = sanitize_scale((mag.amax(dim=1) * (1.0 / quant_max)).float())
    else:
        s = sanitize_scale(scale.reshape(-1).float())
    per_row = s.numel() == x.shape[0] and x.shape[0] != 1
    v = xf * (1.0 / s).reshape(-1, 1) if per_row else xf * (1.0 / s[0])
    v = torch.where(torch.isnan(v), 0.0, v).clamp(quant_min, quant_max)
    q = torch.round(v).to(torch.int16).to(torch.int8 if quant_min < 0 else torch.uint8)
    return q, s.contiguous()


def int_mm(a, b):
    """Exact int32 (wrapping) a [M, K] @ b [N, K].T for 8-bit inputs."""
    return (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.int32)


def w8a8_epilogue(acc, a_scale, b_scale, bias, relu, out_dtype):
    if out_dtype == torch.int32:
        return acc
    a_s = a_scale.reshape(-1, 1) if a_scale.numel() == acc.shape[0] and acc.shape[0] != 1 \
        else a_scale.reshape(1, 1)
    y = (acc.float() * a_s) * b_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.reshape(1, -1)
    if relu:
        y = torch.relu(y)
    return y.to(out_dtype)


def w8a8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None, relu=False):
    """b: [N, K] int8, or its pack_int8_weight panels (N = b_scale.numel())."""
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if b.dim() == 4:
        b = unpack_int8_weight(b, b_scale.numel(), a.shape[1])
    return w8a8_epilogue(int_mm(a, b), a_scale, b_scale, bias, relu, out_dtype)


def w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max, relu=False):
    q, s = quantize_activation(x, x_scale, quant_min, quant_max)
    w = unpack_int8_weight(w_packed, w_scale.numel(), x.shape[1])
    return w8a8_epilogue(int_mm(q, w), s, w_scale, bias, relu, x.dtype)


def w4a16_mm(x, w_packed, scales, zeros, group_size):
    w = dequantize_int4(w_packed, scales, zeros, group_size)
    return (x.float() @ w.T).to(x.dtype)


KERNELS = {"quantize_activation": quantize_activation, "w8a8_mm": w8a8_mm, "w8a8_linear": w8a8_linear,
           "w4a16_mm": w4a16_mm}
