"""Schemas, argument checks, fake kernels and weight layouts of the int8/int4 inference
GEMM ops.

Kernels: C++ CPU in csrc/cpu/gemm*, CUDA in csrc/cuda/gemm* (both registered by q2ext._C),
else the reference (q2ext/reference/gemm.py, which also documents the semantics).  These
ops are inference-only: they have no autograd formula (QAT trains through fake quant).
The packed weight layouts are defined here, below every kernel, because the kernels, the
layers and the export all read them.

``quantize_activation(x [M, K] f32|bf16, scale [1]|[M] f32 or None, quant_min, quant_max)
-> (q [M, K] int8|uint8, scale [1]|[M] f32)``
``w8a8_mm(a [M, K] int8|uint8, b [N, K] int8 or pack_int8_weight(w, signed_act=a is int8),
a_scale [M]|[1] f32, b_scale [N] f32,
bias [N] f32 or None, out_dtype f32|bf16|int32 (default f32), relu) -> [M, N]``
``w8a8_linear(x [M, K] f32|bf16, w_packed, w_scale [N] f32, x_scale [1]|[M] or None,
bias, quant_min, quant_max, relu) -> [M, N] in x's dtype`` (quantises x inside)
``w4a16_mm(x [M, K] f32|bf16, w_packed uint8 [ceil(N/16), K, 8], scales [K/g, N] f32,
zeros [K/g, N] f32, group_size 32|64|128) -> [M, N] in x's dtype``
"""
from __future__ import annotations

import torch

from . import LIB, ceil_div, define

# Shared with the separately named Triton ops (q2ext/triton/gemm.py).
W8A8_MM_SCHEMA = ("(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias=None, "
                  "ScalarType? out_dtype=None, bool relu=False) -> Tensor")
W4A16_MM_SCHEMA = "(Tensor x, Tensor w_packed, Tensor scales, Tensor zeros, int group_size) -> Tensor"

NB8 = 64  # output columns per W8A8 panel (csrc/cpu/gemm_kernels.h)
NB4 = 16  # output columns per W4A16 block
_X_DTYPES = (torch.float32, torch.bfloat16)


def _check_vec(t, name, n, allow_one, like, fn):
    torch._check(t.dtype == torch.float32, lambda: f"{fn}: {name} must be float32, got {t.dtype}")
    torch._check(t.device == like.device, lambda: f"{fn}: {name} is on {t.device} but the input on {like.device}")
    ok = t.dim() <= 1 and (t.numel() == n or (allow_one and t.numel() == 1))
    torch._check(ok, lambda: f"{fn}: {name} must have shape [{n}]{' or [1]' if allow_one else ''}, got {list(t.shape)}")


def _check_x(x, fn):
    torch._check(x.dim() == 2 and x.dtype in _X_DTYPES,
                 lambda: f"{fn}: x must be a 2-D float32 or bfloat16 tensor, got {x.dtype} {list(x.shape)}")


def _check_act_range(qmin, qmax, fn):
    ok = qmin < qmax and ((-128 <= qmin and qmax <= 127) or (0 <= qmin and qmax <= 255))
    torch._check(ok, lambda: f"{fn}: [quant_min, quant_max] = [{qmin}, {qmax}] must lie in "
                             "[-128, 127] (int8) or [0, 255] (uint8)")


def check_quantize_activation(x, scale, quant_min, quant_max):
    fn = "q2ext.quantize_activation"
    _check_x(x, fn)
    _check_act_range(quant_min, quant_max, fn)
    if scale is not None:
        _check_vec(scale, "scale", x.shape[0], True, x, fn)


def w8a8_mm_n(b, b_scale):
    """N of w8a8_mm: rows of a 2-D b, else (packed by pack_int8_weight) b_scale's length."""
    return b_scale.numel() if b.dim() == 4 else b.shape[0]


def check_w8a8_mm(a, b, a_scale, b_scale, bias, out_dtype, relu):
    fn = "q2ext.w8a8_mm"
    torch._check(a.dim() == 2 and a.dtype in (torch.int8, torch.uint8),
                 lambda: f"{fn}: a must be a 2-D int8 or uint8 tensor, got {a.dtype} {list(a.shape)}")
    torch._check(a.device == b.device, lambda: f"{fn}: b is on {b.device} but a on {a.device}")
    n = w8a8_mm_n(b, b_scale)
    if b.dim() == 4:  # pack_int8_weight output
        k, signed = a.shape[1], a.dtype == torch.int8
        want = [ceil_div(n, NB8), ceil_div(k, 4), NB8, 4]
        torch._check(list(b.shape) == want and b.is_contiguous(),
                     lambda: f"{fn}: a packed b must be the contiguous output of pack_int8_weight, shape {want} "
                             f"for N=b_scale.numel()={n}, K={k}; got {list(b.shape)}")
        torch._check(b.dtype == (torch.uint8 if signed else torch.int8),
                     lambda: f"{fn}: the packed b was packed for {'unsigned' if signed else 'signed'} activations "
                             f"but a is {a.dtype} (pack_int8_weight(w, signed_act={signed}))")
    else:
        torch._check(b.dim() == 2 and b.dtype == torch.int8,
                     lambda: f"{fn}: b must be a 2-D int8 tensor [N, K] or the output of pack_int8_weight, got "
                             f"{b.dtype} {list(b.shape)}")
        torch._check(a.shape[1] == b.shape[1], lambda: f"{fn}: a is [M, K={a.shape[1]}] but b is [N, K={b.shape[1]}]")
    _check_vec(a_scale, "a_scale", a.shape[0], True, a, fn)
    _check_vec(b_scale, "b_scale", n, False, a, fn)
    if bias is not None:
        _check_vec(bias, "bias", n, False, a, fn)
    od = torch.float32 if out_dtype is None else out_dtype
    torch._check(od in (torch.float32, torch.bfloat16, torch.int32),
                 lambda: f"{fn}: out_dtype must be float32, bfloat16 or int32, got {od}")
    torch._check(od != torch.int32 or (bias is None and not relu),
                 lambda: f"{fn}: out_dtype=int32 returns the raw accumulator: no bias or relu")
    return od


def check_w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max):
    fn = "q2ext.w8a8_linear"
    _check_x(x, fn)
    _check_act_range(quant_min, quant_max, fn)
    torch._check(w_scale.dim() == 1 and w_scale.numel() > 0, lambda: f"{fn}: w_scale must be a 1-D float32 tensor [N]")
    n, k = w_scale.shape[0], x.shape[1]
    _check_vec(w_scale, "w_scale", n, False, x, fn)
    want = [ceil_div(n, NB8), ceil_div(k, 4), NB8, 4]
    torch._check(w_packed.dim() == 4 and list(w_packed.shape) == want and w_packed.is_contiguous(),
                 lambda: f"{fn}: w_packed must be the contiguous output of pack_int8_weight, shape {want} "
                         f"for N={n}, K={k}; got {list(w_packed.shape)}")
    signed = quant_min < 0
    torch._check(w_packed.dtype == (torch.uint8 if signed else torch.int8),
                 lambda: f"{fn}: w_packed was packed for {'unsigned' if signed else 'signed'} activations "
                         f"but quant_min={quant_min} (pack_int8_weight(w, signed_act={signed}))")
    if x_scale is not None:
        _check_vec(x_scale, "x_scale", x.shape[0], True, x, fn)
    if bias is not None:
        _check_vec(bias, "bias", n, False, x, fn)
    return n


def check_w4a16_mm(x, w_packed, scales, zeros, group_size):
    fn = "q2ext.w4a16_mm"
    _check_x(x, fn)
    k = x.shape[1]
    torch._check(group_size in (32, 64, 128), lambda: f"{fn}: group_size must be 32, 64 or 128, got {group_size}")
    torch._check(k % group_size == 0, lambda: f"{fn}: K={k} (x.shape[1]) must be a multiple of group_size={group_size}")
    torch._check(scales.dim() == 2 and scales.dtype == torch.float32,
                 lambda: f"{fn}: scales must be a 2-D float32 tensor [K / group_size, N], got "
                         f"{scales.dtype} {list(scales.shape)}")
    g, n = k // group_size, scales.shape[1]
    torch._check(scales.shape[0] == g, lambda: f"{fn}: scales must have K / group_size = {g} rows, got {scales.shape[0]}")
    torch._check(zeros.dtype == torch.float32 and zeros.shape == scales.shape,
                 lambda: f"{fn}: zeros must be float32 with the shape of scales {list(scales.shape)}, "
                         f"got {zeros.dtype} {list(zeros.shape)}")
    want = [ceil_div(n, NB4), k, 8]
    torch._check(w_packed.dtype == torch.uint8 and w_packed.dim() == 3 and list(w_packed.shape) == want
                 and w_packed.is_contiguous(),
                 lambda: f"{fn}: w_packed must be the contiguous uint8 output of pack_int4, shape {want} for "
                         f"N={n}, K={k}; got {w_packed.dtype} {list(w_packed.shape)} (unpacked weights? use pack_int4)")
    for name, t in (("w_packed", w_packed), ("scales", scales), ("zeros", zeros)):
        torch._check(t.device == x.device, lambda: f"{fn}: {name} is on {t.device} but x on {x.device}")
    return n


define("quantize_activation(Tensor x, Tensor? scale, int quant_min, int quant_max) -> (Tensor, Tensor)",
       check_quantize_activation)
define("w8a8_mm" + W8A8_MM_SCHEMA, check_w8a8_mm)
define("w8a8_linear(Tensor x, Tensor w_packed, Tensor w_scale, Tensor? x_scale, Tensor? bias, "
       "int quant_min, int quant_max, bool relu=False) -> Tensor", check_w8a8_linear)
define("w4a16_mm" + W4A16_MM_SCHEMA, check_w4a16_mm)


@torch.library.register_fake("q2ext::quantize_activation", lib=LIB)
def _quantize_activation_fake(x, scale, quant_min, quant_max):
    check_quantize_activation(x, scale, quant_min, quant_max)
    m = x.shape[0]
    per_row = scale is None or (scale.numel() == m and m != 1)
    q = x.new_empty(x.shape, dtype=torch.int8 if quant_min < 0 else torch.uint8)
    return q, x.new_empty((m,) if per_row else (1,), dtype=torch.float32)


@torch.library.register_fake("q2ext::w8a8_mm", lib=LIB)
def _w8a8_mm_fake(a, b, a_scale, b_scale, bias=None, out_dtype=None, relu=False):
    od = check_w8a8_mm(a, b, a_scale, b_scale, bias, out_dtype, relu)
    return a.new_empty((a.shape[0], w8a8_mm_n(b, b_scale)), dtype=od)


@torch.library.register_fake("q2ext::w8a8_linear", lib=LIB)
def _w8a8_linear_fake(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max, relu=False):
    n = check_w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max)
    return x.new_empty((x.shape[0], n))


@torch.library.register_fake("q2ext::w4a16_mm", lib=LIB)
def _w4a16_mm_fake(x, w_packed, scales, zeros, group_size):
    n = check_w4a16_mm(x, w_packed, scales, zeros, group_size)
    return x.new_empty((x.shape[0], n))


# ---------------------------------------------------------------- weight layouts

def pack_int8_weight(w, signed_act):
    """[N, K] int8 -> VNNI panels [ceil(N/64), ceil(K/4), 64, 4]: uint8 holding w + 128
    (for int8 activations) or int8 holding w (for uint8 activations); padding is 0."""
    n, k = w.shape
    panels, kq = ceil_div(n, NB8), ceil_div(k, 4)
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


def pack_int4(q):
    """[N, K] integer codes in 0..15 -> uint8 [ceil(N/16), K, 8]: byte j of row k of block
    b holds column 16b+j in the low and 16b+8+j in the high nibble (zero padded)."""
    n, k = q.shape
    blocks = ceil_div(n, NB4)
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
    """The fp32 weight [N, K] a w4a16_mm computes with: (q - 8) * scale + zero per group."""
    n = scales.shape[1]
    q = unpack_int4(w_packed, n).float()
    s = scales.T.repeat_interleave(group_size, dim=1)
    z = zeros.T.repeat_interleave(group_size, dim=1)
    return (q - 8.0) * s + z
