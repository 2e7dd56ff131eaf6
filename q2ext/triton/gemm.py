"""Triton kernels of the inference GEMMs: ``q2ext::w8a8_mm_triton`` and
``q2ext::w4a16_mm_triton``.

Same schemas, argument checks and semantics as ``q2ext::w8a8_mm`` / ``q2ext::w4a16_mm``
(q2ext/_ops/gemm.py; numerics in q2ext/reference/gemm.py):

* W8A8: int8 x int8 tiles through ``tl.dot`` with int32 accumulation (tensor cores on
  a GPU), then the fused epilogue ``((acc * a_scale) * b_scale) + bias``, ReLU, cast,
  with both products rounded on their own (q2ext/triton/_common.py ``_mul``): bit
  identical to the reference and to the C++/CUDA kernels.  uint8 activations run as
  int8 ``a - 128`` (tensor cores take one integer type for both operands) and get
  ``128 * sum_k b[n, k]`` added back, which is exact in wrapping int32 arithmetic.
* W4A16: the packed int4 weight is dequantised in registers, one K tile at a time, and
  multiplied in fp32 (``tf32x3`` on NVIDIA: three TF32 tensor-core products whose
  error is at fp32's level; plain TF32 would be off by ~1e-3).

Both walk the output in ``BLOCK_M x BLOCK_N`` tiles, grouped ``GROUP_M`` tile rows at a
time so that the B panels a wave of programs reads stay in L2.  Block sizes come from
``_w8a8_config`` / ``_w4a16_config``: GPU-shaped tiles on CUDA, and under
``TRITON_INTERPRET=1`` as few programs as possible (the interpreter costs about a
millisecond per program).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops.gemm import (
    W4A16_MM_SCHEMA,
    W8A8_MM_SCHEMA,
    _w4a16_mm_fake,
    _w8a8_mm_fake,
    check_w4a16_mm,
    check_w8a8_mm,
    unpack_int8_weight,
)
from ._common import I64_LIMIT, INTERPRET, _load_f32, _mul, _next_pow2, _to_storage, _use_rn, register_op

__all__ = ["w8a8_mm_triton", "w4a16_mm_triton"]

# Largest tiles under the interpreter (tests may lower them to get several tiles and
# K steps out of small shapes).  Bigger tiles mean fewer programs and fewer numpy calls.
_INTERP_W8 = (64, 64, 512)  # BLOCK_M, BLOCK_N, BLOCK_K
_INTERP_W4 = (64, 128, 128)  # BLOCK_M, BLOCK_N, BLOCK_K (at most group_size)
_I64_LIMIT = I64_LIMIT  # module-level so that tests can lower it


# --------------------------------------------------------------------------- kernels

@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M tile rows at a time (L2 reuse of B)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
          I64: tl.constexpr):
    """This program's rows rm, columns rn, K offsets rk, their masks, and rm/rn as offsets:
    64-bit only where 32 bits could overflow (I64)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if I64:
        rm_o = rm.to(tl.int64)
        rn_o = rn.to(tl.int64)
    else:
        rm_o = rm
        rn_o = rn
    return rm, rn, rk, rm < M, rn < N, rm_o, rn_o


@triton.jit
def _w8a8_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm,
                 A_UNSIGNED: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                 RELU: tl.constexpr, OUT_INT32: tl.constexpr, OUT_BF16: tl.constexpr,
                 RN: tl.constexpr, I64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    rm, rn, rk, mask_m, mask_n, rm_o, rn_o = _tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, I64)
    # B is [N, K] (nn.Linear layout): its [BLOCK_K, BLOCK_N] tile is K-major, the
    # operand layout int8 tensor-core MMAs want, without any transpose.
    a_ptrs = a_ptr + rm_o[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn_o[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if A_UNSIGNED:
        b_sum = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        # Padding is 0 in both operands, so the K tail adds nothing (for uint8 A the
        # shifted a = -128 meets b = 0).
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0)
        if A_UNSIGNED:
            a = (a ^ 0x80).to(tl.int8, bitcast=True)  # a - 128
            b_sum += tl.sum(b.to(tl.int32), axis=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if A_UNSIGNED:
        acc += 128 * b_sum[None, :]

    c_ptrs = c_ptr + rm_o[:, None] * stride_cm + rn_o[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    if OUT_INT32:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        if A_PER_ROW:
            a_s = tl.load(as_ptr + rm, mask=mask_m, other=0.0)[:, None]
        else:
            a_s = tl.load(as_ptr)
        b_s = tl.load(bs_ptr + rn, mask=mask_n, other=0.0)[None, :]
        y = _mul(_mul(acc.to(tl.float32), a_s, RN), b_s, RN)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=mask_n, other=0.0)[None, :]
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)  # as torch.relu: NaN and -0.0 pass through
        tl.store(c_ptrs, _to_storage(y, c_ptr, OUT_BF16), mask=c_mask)


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_xk,
                  GROUP: tl.constexpr, X_BF16: tl.constexpr, DOT_PREC: tl.constexpr, I64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """BLOCK_K divides the group size (both powers of two, BLOCK_K <= group), hence K:
    one row of scales/zeros per K step and no K mask."""
    rm, rn, rk, mask_m, mask_n, rm_o, rn_o = _tile(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, I64)
    # pack_int4 layout [ceil(N/16), K, 8]: column n sits in byte n % 8 of row k of block
    # n // 16, in the low nibble for n % 16 < 8, else the high one.  Each byte is loaded
    # for its two columns; the second load hits L1.
    w_col = (rn_o // 16) * K * 8 + rn_o % 8
    shift = ((rn // 8) % 2) * 4
    x_ptrs = rm_o[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + w_col[None, :] + rk[:, None] * 8
    s_ptrs = s_ptr + rn_o  # row k0 // GROUP of scales / zeros
    z_ptrs = z_ptr + rn_o
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_f32(x_ptr, x_ptrs, mask_m[:, None], X_BF16)
        byte = tl.load(w_ptrs, mask=mask_n[None, :], other=0).to(tl.int32)
        q = ((byte >> shift[None, :]) & 15).to(tl.float32)
        s = tl.load(s_ptrs, mask=mask_n, other=0.0)
        z = tl.load(z_ptrs, mask=mask_n, other=0.0)
        # May be contracted into an FMA on a GPU (one rounding instead of the
        # reference's two): far inside the kernel's fp32-level tolerance.
        w = (q - 8.0) * s[None, :] + z[None, :]
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * 8
        if (k0 + BLOCK_K) % GROUP == 0:  # pointer steps: no int32 product to overflow
            s_ptrs += N
            z_ptrs += N
    y_ptrs = y_ptr + rm_o[:, None] * N + rn_o[None, :]
    tl.store(y_ptrs, _to_storage(acc, y_ptr, X_BF16), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- host side

def _w8a8_config(m, n, k, device_type):
    """Tile sizes and launch options.  GPU: Triton's matmul-tutorial shapes for int8
    (K tiles of 128 bytes and more); small M (decode) takes short, wide tiles so the
    weight streams through more programs.  Untuned on H200 so far."""
    if INTERPRET or device_type != "cuda":
        bm, bn, bk = _INTERP_W8
        return dict(BLOCK_M=min(bm, max(16, _next_pow2(m))), BLOCK_N=min(bn, max(16, _next_pow2(n))),
                    BLOCK_K=min(bk, max(32, _next_pow2(k))), GROUP_M=8, num_warps=4)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)


def _w4a16_config(m, n, group_size, device_type):
    if INTERPRET or device_type != "cuda":
        bm, bn, bk = _INTERP_W4
        return dict(BLOCK_M=min(bm, max(16, _next_pow2(m))), BLOCK_N=min(bn, max(16, _next_pow2(n))),
                    BLOCK_K=min(bk, group_size), GROUP_M=8, num_warps=4)
    if m <= 16:  # decode: memory bound; narrow tiles give N / 32 programs to fill the SMs
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(group_size, 128), GROUP_M=1, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(group_size, 64), GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=min(group_size, 64), GROUP_M=8, num_warps=8, num_stages=3)


def _dot_precision(device_type):
    # tf32x3 exists on NVIDIA only; the interpreter multiplies in fp32 (numpy) anyway.
    if device_type == "cuda" and torch.version.hip is None and not INTERPRET:
        return "tf32x3"
    return "ieee"


def _grid(m, n, cfg):
    return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)


def _w8a8_mm_triton(a, b, a_scale, b_scale, bias=None, out_dtype=None, relu=False):
    od = check_w8a8_mm(a, b, a_scale, b_scale, bias, out_dtype, relu)
    m, k = a.shape
    if b.dim() == 4:  # pack_int8_weight output: this kernel tiles B [N, K] itself
        b = unpack_int8_weight(b, b_scale.numel(), k)
    n = b.shape[0]
    out = torch.empty((m, n), dtype=od, device=a.device)
    if m == 0 or n == 0:
        return out
    a_s = a_scale.reshape(-1).contiguous()
    b_s = b_scale.contiguous()
    bias_t = bias.contiguous() if bias is not None else b_s  # dummy, never read
    cfg = _w8a8_config(m, n, k, a.device.type)
    # Bound on every offset formed, masked lanes included.
    reach = max((m + cfg["BLOCK_M"]) * max(abs(a.stride(0)), 1) + k * abs(a.stride(1)),
                (n + cfg["BLOCK_N"]) * max(abs(b.stride(0)), 1) + k * abs(b.stride(1)),
                (m + cfg["BLOCK_M"]) * n + cfg["BLOCK_N"])
    torch.library.wrap_triton(_w8a8_kernel)[_grid(m, n, cfg)](
        a, b, out, a_s, b_s, bias_t, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        A_UNSIGNED=a.dtype == torch.uint8, A_PER_ROW=a_s.numel() == m and m != 1,
        HAS_BIAS=bias is not None, RELU=bool(relu), OUT_INT32=od == torch.int32,
        OUT_BF16=od == torch.bfloat16, RN=_use_rn(a), I64=reach >= _I64_LIMIT, **cfg,
    )
    return out


def _w4a16_mm_triton(x, w_packed, scales, zeros, group_size):
    n = check_w4a16_mm(x, w_packed, scales, zeros, group_size)
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    sc, zc = scales.contiguous(), zeros.contiguous()
    cfg = _w4a16_config(m, n, group_size, x.device.type)
    reach = max((m + cfg["BLOCK_M"]) * max(abs(x.stride(0)), 1) + k * abs(x.stride(1)),
                w_packed.numel() + 16 * k * 8, (m + cfg["BLOCK_M"]) * n + cfg["BLOCK_N"],
                sc.numel() + cfg["BLOCK_N"])
    torch.library.wrap_triton(_w4a16_kernel)[_grid(m, n, cfg)](
        x, w_packed, sc, zc, out, m, n, k, x.stride(0), x.stride(1), group_size,
        X_BF16=x.dtype == torch.bfloat16, DOT_PREC=_dot_precision(x.device.type),
        I64=reach >= _I64_LIMIT, **cfg,
    )
    return out


w8a8_mm_triton = register_op("q2ext::w8a8_mm_triton", _w8a8_mm_triton, W8A8_MM_SCHEMA, _w8a8_mm_fake)
w4a16_mm_triton = register_op("q2ext::w4a16_mm_triton", _w4a16_mm_triton, W4A16_MM_SCHEMA, _w4a16_mm_fake)
