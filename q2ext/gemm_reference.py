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

from .reference import SCALE_MAX, SCALE_MIN

NB8 = 64  # output columns per W8A8 panel (csrc/include/q2ext/gemm_kernels.h)
NB4 = 16  # output columns per W4A16 block


def sanitize_scale(s: torch.Tensor) -> torch.Tensor:
    s = s.float()
    return torch.where(s > SCALE_MAX, SCALE_MAX, torch.where(s >= SCALE_MIN, s, SCALE_MIN))


def quantize_activation(x, scale, quant_min, quant_max):
    """(q, effective scale [M] or [1]) for x [M, K] fp32/bf16."""
    xf = x.float()
    if scale is None:
        mag = torch.where(torch.isnan(xf), 0.0, xf.abs())  # NaN never wins; inf stays inf
        s = sanitize_scale(mag.amax(dim=1) * (1.0 / quant_max))
    else:
        s = sanitize_scale(scale.reshape(-1))
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


def pack_int8_weight(w, signed_act):
    """[N, K] int8 -> VNNI panels [ceil(N/64), ceil(K/4), 64, 4]: uint8 holding w + 128
    (for int8 activations) or int8 holding w (for uint8 activations); padding is 0."""
    n, k = w.shape
    panels, kq = -(-n // NB8), -(-k // 4)
    body = (w.view(torch.uint8) ^ 0x80) if signed_act else w
    padded = torch.zeros(panels * NB8, kq * 4, dtype=body.dtype, device=w.device)
    padded[:n, :k] = body
    return padded.view(panels, NB8, kq, 4).permute(0, 2, 1, 3).contiguous()


def unpack_int8_weight(w_packed, n, k):
    """Inverse of pack_int8_weight: the [n, k] int8 weight."""
    panels, kq = w_packed.shape[:2]
    w = w_packed.permute(0, 2, 1, 3).reshape(panels * NB8, kq * 4)[:n, :k]
    if w_packed.dtype == torch.uint8:
        w = w ^ 0x80
    return w.contiguous().view(torch.int8)


def w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max, relu=False):
    q, s = quantize_activation(x, x_scale, quant_min, quant_max)
    w = unpack_int8_weight(w_packed, w_scale.numel(), x.shape[1])
    return w8a8_epilogue(int_mm(q, w), s, w_scale, bias, relu, x.dtype)


def pack_int4(q):
    """[N, K] integer codes in 0..15 -> uint8 [ceil(N/16), K, 8]: byte j of row k of block
    b holds column 16b+j in the low and 16b+8+j in the high nibble (zero padded)."""
    n, k = q.shape
    blocks = -(-n // NB4)
    padded = torch.zeros(blocks * NB4, k, dtype=torch.uint8, device=q.device)
    padded[:n] = q.to(torch.uint8)
    cols = padded.view(blocks, NB4, k).permute(0, 2, 1)  # [blocks, K, 16]
    return (cols[..., :8] | (cols[..., 8:] << 4)).contiguous()


def unpack_int4(w_packed, n):
    """Exact inverse of pack_int4: [n, K] uint8 codes in 0..15."""
    blocks, k, _ = w_packed.shape
    cols = torch.cat([w_packed & 15, w_packed >> 4], dim=-1)  # [blocks, K, 16]
    return cols.permute(0, 2, 1).reshape(blocks * NB4, k)[:n].contiguous()


def dequantize_int4(w_packed, scales, zeros, group_size):
    """The fp32 weight [N, K] a w4a16_mm computes with."""
    n = scales.shape[1]
    q = unpack_int4(w_packed, n).float()
    s = scales.T.repeat_interleave(group_size, dim=1)
    z = zeros.T.repeat_interleave(group_size, dim=1)
    return (q - 8.0) * s + z


def w4a16_mm(x, w_packed, scales, zeros, group_size):
    w = dequantize_int4(w_packed, scales, zeros, group_size)
    return (x.float() @ w.T).to(x.dtype)
