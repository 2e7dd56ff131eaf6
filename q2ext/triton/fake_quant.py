"""Triton kernels of the fake-quant op family: ``q2ext::fake_quant_triton`` and
``q2ext::fake_quant_backward_triton``.

Same schemas, semantics and output conventions as the C++ ops ``q2ext::fake_quant`` /
``q2ext::fake_quant_backward`` (see q2ext/_ops.py); the per-element arithmetic follows
csrc/include/q2ext/fake_quant_math.h step by step so that the result is bit-identical
to the C++ kernels and to q2ext/reference/fake_quant.py:

* every product is rounded on its own: in compiled CUDA code through PTX ``mul.rn.f32``
  (inline assembly, as CUDA's ``__fmul_rn``; Triton enables FP fusion by default, and
  an explicit rounding modifier is never contracted into an FMA), divisions through
  ``div_rn`` (``/`` is approximate on NVIDIA); under ``TRITON_INTERPRET=1`` numpy rounds
  each operation once anyway;
* round half to even is ``(v + 1.5*2^23) - 1.5*2^23`` (libdevice's rint does not exist
  in the interpreter), exact for |v| < 2^22 and on the correct side of the grid beyond;
* bf16 is converted by hand (bit shifts, round to nearest even, NaN kept quiet), as in
  the C++ header: the interpreter's fp32 -> bf16 cast truncates.  fp16 uses Triton's
  own conversions (round to nearest even both on the GPU and in the interpreter).

Memory walk: ``x`` is made dense (its own layout if non-overlapping and dense, else
contiguous) and walked as ``[outer, C, inner]``, ``inner`` being the memory stride of
the channel axis.  The backward writes ``grad_x`` and per-program fp32 partial sums of
the scale term and the clip term in one pass, then a second small kernel sums the
partials of each channel in a fixed order in fp64 and writes the parameter gradients:
deterministic, no atomics, no host synchronisation.  Partial sums per (channel, chunk):

* per-tensor (C == 1): 1-D chunks of ``BLOCK`` elements;
* per-channel: tiles of ``[BLOCK elements, CB channels]``, element e of channel c at
  memory offset ``(e // inner) * C * inner + c * inner + e % inner``, reduced over the
  elements.  ``inner == 1`` (channels innermost, e.g. channels_last activations): rows
  of up to 128 channels, coalesced along the channels; ``inner > 1``: tall tiles along
  the contiguous runs, several channels per tile when the channels are short.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ops.fake_quant import (
    FAKE_QUANT_BACKWARD_SCHEMA,
    FAKE_QUANT_SCHEMA,
    backward_outputs_like,
    check_fake_quant_args,
    fake_quant_backward_fake,
    fake_quant_fake,
    is_non_overlapping_and_dense as _is_dense,
    make_fake_quant_autograd,
)
from ._common import I64_LIMIT, _div, _load_f32, _mul, _next_pow2, _to_storage, _use_rn, register_op

__all__ = ["fake_quant_triton", "fake_quant_backward_triton"]

_FWD_BLOCK = 4096  # elements per program (the interpreter costs ~1 ms per program)
_BWD_BLOCK = 4096  # elements (or tile elements) per backward program
_NUM_WARPS = 8
_I64_LIMIT = I64_LIMIT  # module-level so that tests can lower it


# --------------------------------------------------------------------------- helpers

@triton.jit
def _round_half_even(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _sanitize_scale(s):
    # NaN, <= 0 or tiny -> FLT_EPSILON; +inf -> FLT_MAX.
    return tl.where(s > 3.4028234663852886e38, 3.4028234663852886e38,
                    tl.where(s >= 1.1920928955078125e-07, s, 1.1920928955078125e-07))


@triton.jit
def _channel_params(scale_ptr, zp_ptr, off_ptr, c, cmask, qmin, qmax,
                    MODE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_OFF: tl.constexpr,
                    SCALAR: tl.constexpr, RN: tl.constexpr):
    """(s, inv, zp, off, clip) of channel(s) c, as fq_math's make_channel.

    SCALAR: c is a scalar channel index (no mask); else c is a tensor masked by cmask.
    """
    if SCALAR:
        raw = tl.load(scale_ptr + c)
    else:
        raw = tl.load(scale_ptr + c, mask=cmask, other=1.0)
    sane = _sanitize_scale(raw)
    zero = sane - sane  # +0 with the parameters' shape (sane is finite); no multiply to fuse
    if MODE == 1:  # MODE_PACT: the parameter is the clip value alpha
        clip = sane
        s = _div(clip, qmax, RN)
        zp = zero
        off = zero
    else:
        clip = zero
        s = sane
        if HAS_ZP:
            if SCALAR:
                zraw = tl.load(zp_ptr + c)
            else:
                zraw = tl.load(zp_ptr + c, mask=cmask, other=0.0)
            r = tl.where(zraw == zraw, _round_half_even(zraw), 0.0)
            zp = tl.where(r < qmin, qmin, tl.where(r > qmax, qmax, r))
        else:
            zp = zero
        if HAS_OFF:
            if SCALAR:
                off = tl.load(off_ptr + c)
            else:
                off = tl.load(off_ptr + c, mask=cmask, other=0.0)
        else:
            off = zero
    inv = _div(1.0, s, RN)
    # Absent zero point / offset are explicit +0s so that every later operation runs
    # exactly as in C++ (e.g. q + 0 turns -0 into +0).
    return s, inv, zp, off, clip


@triton.jit
def _grid(x, inv, zp, off, RN: tl.constexpr):
    return _round_half_even(_mul(x - off, inv, RN)) + zp


# --------------------------------------------------------------------------- kernels

@triton.jit
def _fq_forward_kernel(x_ptr, y_ptr, scale_ptr, zp_ptr, off_ptr, numel, inner, C, qmin, qmax,
                       MODE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_OFF: tl.constexpr,
                       PER_CHANNEL: tl.constexpr, IS_BF16: tl.constexpr, RN: tl.constexpr,
                       I64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if I64:  # 64-bit offsets only where 32 bits could overflow (division is costly)
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if PER_CHANNEL:
        c = (offs // inner) % C
        s, inv, zp, off, clip = _channel_params(scale_ptr, zp_ptr, off_ptr, c, mask, qmin, qmax,
                                                MODE, HAS_ZP, HAS_OFF, False, RN)
    else:
        s, inv, zp, off, clip = _channel_params(scale_ptr, zp_ptr, off_ptr, 0, None, qmin, qmax,
                                                MODE, HAS_ZP, HAS_OFF, True, RN)
    x = _load_f32(x_ptr, offs, mask, IS_BF16)
    q = _grid(x, inv, zp, off, RN)
    cq = tl.where(q < qmin, qmin, tl.where(q > qmax, qmax, q))
    y = _mul(cq - zp, s, RN) + off
    tl.store(y_ptr + offs, _to_storage(y, y_ptr, IS_BF16), mask=mask)


@triton.jit
def _fq_backward_kernel(dy_ptr, x_ptr, dx_ptr, ps_ptr, pc_ptr, scale_ptr, zp_ptr, off_ptr,
                        numel, inner, C, K, qmin, qmax,
                        MODE: tl.constexpr, HAS_ZP: tl.constexpr, HAS_OFF: tl.constexpr,
                        LAYOUT: tl.constexpr, IS_BF16: tl.constexpr, WRITE_DX: tl.constexpr,
                        NEED_SUMS: tl.constexpr, RN: tl.constexpr, I64: tl.constexpr,
                        BLOCK: tl.constexpr, CB: tl.constexpr):
    """LAYOUT 0 (per-tensor): program = chunk of BLOCK elements -> partial pid.
    LAYOUT 1 (per-channel): program = (channel block cb, chunk rb), a tile of BLOCK
    elements of each of CB channels (element e of channel c sits at memory offset
    (e // inner) * C * inner + c * inner + e % inner) -> partials c*K + rb."""
    pid = tl.program_id(0)
    if I64:
        pid_w = pid.to(tl.int64)
    else:
        pid_w = pid
    if LAYOUT == 0:
        offs = pid_w * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        s, inv, zp, off, clip = _channel_params(scale_ptr, zp_ptr, off_ptr, 0, None, qmin, qmax,
                                                MODE, HAS_ZP, HAS_OFF, True, RN)
    else:
        cb = pid // K
        rb = pid % K
        e = (pid_w % K) * BLOCK + tl.arange(0, BLOCK)
        ch = cb * CB + tl.arange(0, CB)
        cmask = ch < C
        mask = (e[:, None] < numel // C) & cmask[None, :]
        chw = (pid_w // K) * CB + tl.arange(0, CB)
        offs = (e[:, None] // inner) * (C * inner) + chw[None, :] * inner + e[:, None] % inner
        s1, inv1, zp1, off1, clip1 = _channel_params(scale_ptr, zp_ptr, off_ptr, ch, cmask, qmin, qmax,
                                                     MODE, HAS_ZP, HAS_OFF, False, RN)
        s = s1[None, :]
        inv = inv1[None, :]
        zp = zp1[None, :]
        off = off1[None, :]
        clip = clip1[None, :]

    dy_raw = tl.load(dy_ptr + offs, mask=mask)
    x = _load_f32(x_ptr, offs, mask, IS_BF16)
    if MODE == 1:
        inside = (x >= 0.0) & (x < clip)
        clipped = x >= clip
    elif MODE == 2:  # MODE_LSQ: the mask on the unrounded v (clip first)
        v = _mul(x - off, inv, RN)
        q = _round_half_even(v)
        below = v <= qmin
        above = v >= qmax
        inside = (v > qmin) & (v < qmax)
        clipped = below | above
    else:
        q = _grid(x, inv, zp, off, RN)
        below = q < qmin
        above = q > qmax
        inside = (q >= qmin) & (q <= qmax)
        clipped = below | above
    if WRITE_DX:
        tl.store(dx_ptr + offs, tl.where(inside, dy_raw, 0.0), mask=mask)
    if NEED_SUMS:
        if IS_BF16:
            dy = (dy_raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            dy = dy_raw.to(tl.float32)
        dclip = tl.where(clipped & mask, dy, 0.0)
        if MODE == 1:
            dscale = tl.zeros_like(dclip)  # unused: the PACT alpha gradient is the clip term
        elif MODE == 2:
            edge = tl.where(below, qmin, qmax)
            dscale = tl.where(inside, _mul(dy, q - v, RN), tl.where(clipped, _mul(dy, edge, RN), 0.0))
            dscale = tl.where(mask, dscale, 0.0)
        else:
            yq = _mul(q - zp, s, RN)
            inside_term = _mul(_mul(dy, yq - (x - off), RN), inv, RN)
            edge = tl.where(below, qmin - zp, qmax - zp)
            dscale = tl.where(inside, inside_term, tl.where(clipped, _mul(dy, edge, RN), 0.0))
            dscale = tl.where(mask, dscale, 0.0)
        if LAYOUT == 1:
            pidx = ch * K + rb
            tl.store(ps_ptr + pidx, tl.sum(dscale, axis=0), mask=cmask)
            tl.store(pc_ptr + pidx, tl.sum(dclip, axis=0), mask=cmask)
        else:
            tl.store(ps_ptr + pid, tl.sum(dscale, axis=0))
            tl.store(pc_ptr + pid, tl.sum(dclip, axis=0))


@triton.jit
def _fq_finalize_kernel(ps_ptr, pc_ptr, scale_ptr, g_ptr, dscale_ptr, dthird_ptr, C, K,
                        MODE: tl.constexpr, HAS_ZP: tl.constexpr, WRITE_DSCALE: tl.constexpr,
                        WRITE_DTHIRD: tl.constexpr, CB: tl.constexpr, KB: tl.constexpr):
    """Per channel: fixed-order fp64 sum of the K partials, then the parameter gradients
    (as the C++ op: dscale = g*sum_scale (PACT: g*sum_clip); dzp = (-g*s)*sum_clip;
    doffset = g*sum_clip), computed in fp64 and rounded once to fp32."""
    pid = tl.program_id(0)
    ch = pid * CB + tl.arange(0, CB)
    cmask = ch < C
    acc_s = tl.zeros([CB], dtype=tl.float64)
    acc_c = tl.zeros([CB], dtype=tl.float64)
    for k0 in range(0, K, KB):
        kk = k0 + tl.arange(0, KB)
        m2 = cmask[:, None] & (kk[None, :] < K)
        idx = ch[:, None] * K + kk[None, :]
        acc_s += tl.sum(tl.load(ps_ptr + idx, mask=m2, other=0.0).to(tl.float64), axis=1)
        acc_c += tl.sum(tl.load(pc_ptr + idx, mask=m2, other=0.0).to(tl.float64), axis=1)
    g = tl.load(g_ptr)
    if WRITE_DSCALE:
        if MODE == 1:
            dscale = g * acc_c
        else:
            dscale = g * acc_s
        tl.store(dscale_ptr + ch, dscale.to(tl.float32), mask=cmask)
    if WRITE_DTHIRD:
        if HAS_ZP:
            s = _sanitize_scale(tl.load(scale_ptr + ch, mask=cmask, other=1.0))
            dthird = (-g * s.to(tl.float64)) * acc_c
        else:
            dthird = g * acc_c
        tl.store(dthird_ptr + ch, dthird.to(tl.float32), mask=cmask)


# --------------------------------------------------------------------------- host side

def _geometry(xd: torch.Tensor, axis):
    """(numel, channels, inner) of the [outer, C, inner] memory walk (fq_geometry in C++)."""
    numel = xd.numel()
    if axis is not None and xd.shape[axis] > 1:
        return numel, xd.shape[axis], xd.stride(axis)
    return numel, 1, numel


def _param_ptrs(scale, zero_point, offset):
    sc = scale.contiguous()
    zp = zero_point.contiguous() if zero_point is not None else sc  # dummy, never read
    off = offset.contiguous() if offset is not None else sc  # dummy, never read
    return sc, zp, off


def _fake_quant_triton(x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor):
    check_fake_quant_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    xd = x if _is_dense(x) else x.contiguous()
    y = torch.empty_like(xd)
    numel, channels, inner = _geometry(xd, axis)
    if numel == 0:
        return y
    sc, zp, off = _param_ptrs(scale, zero_point, offset)
    grid = (triton.cdiv(numel, _FWD_BLOCK),)
    i64 = numel + 2 * _FWD_BLOCK >= _I64_LIMIT
    torch.library.wrap_triton(_fq_forward_kernel)[grid](
        xd, y, sc, zp, off, numel, inner, channels, float(quant_min), float(quant_max),
        MODE=mode, HAS_ZP=zero_point is not None, HAS_OFF=offset is not None,
        PER_CHANNEL=channels > 1, IS_BF16=x.dtype == torch.bfloat16, RN=_use_rn(x),
        I64=i64, BLOCK=_FWD_BLOCK, num_warps=_NUM_WARPS,
    )
    return y


def _fake_quant_backward_triton(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode,
                                grad_factor, output_mask):
    check_fake_quant_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    torch._check(grad.shape == x.shape and grad.dtype == x.dtype, lambda: "grad must match x in shape and dtype")
    dx, dscale, dthird = backward_outputs_like(x, scale, zero_point, offset, output_mask)
    write_dx = bool(output_mask[0])
    write_dscale = bool(output_mask[1])
    write_dthird = bool(output_mask[2]) and (zero_point is not None or offset is not None)
    need_sums = write_dscale or write_dthird
    if not (write_dx or need_sums):
        return dx, dscale, dthird

    xd = x if _is_dense(x) else x.contiguous()
    dy = grad if grad.stride() == xd.stride() else torch.empty_like(xd).copy_(grad)
    numel, channels, inner = _geometry(xd, axis)
    sc, zp, off = _param_ptrs(scale, zero_point, offset)
    rn = _use_rn(x)

    if channels == 1:
        layout, block, cb = 0, _BWD_BLOCK, 1
        k = triton.cdiv(numel, block)
        programs = k
    else:
        layout = 1
        per_channel = numel // channels
        if inner == 1:  # channels innermost: rows of C, tiles wide along the channels
            cb = min(128, _next_pow2(channels))
            block = max(1, min(_BWD_BLOCK // cb, _next_pow2(per_channel)))
        else:  # long runs per channel: tall tiles, several channels if runs are short
            block = min(_BWD_BLOCK, max(16, _next_pow2(per_channel)))
            cb = max(1, min(_next_pow2(channels), _BWD_BLOCK // block))
        k = triton.cdiv(per_channel, block)
        programs = triton.cdiv(channels, cb) * k

    # Bound on every offset the kernel forms, masked lanes included: 64-bit offsets
    # (and divisions) only where 32 bits could overflow.
    if layout == 0:
        i64 = numel + 2 * block >= _I64_LIMIT
    else:
        i64 = numel + (block + 1) * channels + (channels + cb + 1) * inner + block >= _I64_LIMIT
    nparts = channels * k if need_sums else 0
    ps = torch.empty((nparts,), dtype=torch.float32, device=x.device)
    pc = torch.empty((nparts,), dtype=torch.float32, device=x.device)
    if numel > 0:
        torch.library.wrap_triton(_fq_backward_kernel)[(programs,)](
            dy, xd, dx, ps, pc, sc, zp, off,
            numel, inner, channels, k, float(quant_min), float(quant_max),
            MODE=mode, HAS_ZP=zero_point is not None, HAS_OFF=offset is not None,
            LAYOUT=layout, IS_BF16=x.dtype == torch.bfloat16, WRITE_DX=write_dx,
            NEED_SUMS=need_sums, RN=rn, I64=i64, BLOCK=block, CB=cb, num_warps=_NUM_WARPS,
        )
    if need_sums and numel == 0:
        # No elements: every sum is 0; the same formulas give the same signed zeros.
        g = float(grad_factor)
        if write_dscale:
            dscale.fill_(g * 0.0)
        if write_dthird:
            dthird.fill_(-g * 0.0 if zero_point is not None else g * 0.0)
    elif need_sums:
        # grad_factor travels as an fp64 tensor (a fill, no host sync): a Python float
        # kernel argument would be rounded to fp32.
        g = torch.full((1,), float(grad_factor), dtype=torch.float64, device=x.device)
        kb = min(1024, _next_pow2(k))
        fcb = max(1, min(_next_pow2(channels), 4096 // kb))
        torch.library.wrap_triton(_fq_finalize_kernel)[(triton.cdiv(channels, fcb),)](
            ps, pc, sc, g, dscale, dthird,
            channels, k,
            MODE=mode, HAS_ZP=zero_point is not None, WRITE_DSCALE=write_dscale,
            WRITE_DTHIRD=write_dthird, CB=fcb, KB=kb, num_warps=4,
        )
    return dx, dscale, dthird


fake_quant_triton = register_op("q2ext::fake_quant_triton", _fake_quant_triton, FAKE_QUANT_SCHEMA,
                                fake_quant_fake)
fake_quant_backward_triton = register_op("q2ext::fake_quant_backward_triton", _fake_quant_backward_triton,
                                         FAKE_QUANT_BACKWARD_SCHEMA, fake_quant_backward_fake)

_setup_context, _backward = make_fake_quant_autograd(torch.ops.q2ext.fake_quant_backward_triton)
torch.library.register_autograd("q2ext::fake_quant_triton", _backward, setup_context=_setup_context)
