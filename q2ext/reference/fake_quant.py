"""Pure-PyTorch semantics of the fake-quant ops: the test oracle and the fallback kernel.

Written for clarity, not speed.  Every function accepts float64 inputs (math then runs
in float64); fp32/fp16/bf16 inputs are computed in fp32 and cast back, exactly as the
kernels do, and gradient reductions are summed in float64.

Fake quantization (shared by ``fake_quant_affine``, ``lsq``, ``lsq+`` and ``pact``)::

    s   = scale clamped to [FLT_EPSILON, FLT_MAX]   (NaN -> FLT_EPSILON)
    zp  = clamp(round_half_even(zero_point), qmin, qmax)   (NaN -> 0)
    q   = round_half_even((x - offset) * (1/s)) + zp       # mask is taken on q
    y   = (clamp(q, qmin, qmax) - zp) * s + offset

This is ATen's ``fake_quantize_per_{tensor,channel}_affine`` (reciprocal multiply,
half-to-even, integer zero point added after rounding) extended by an LSQ+ offset.
NaN in x gives NaN in y; +-inf saturate to the grid ends.

Backward, MODE_AFFINE (ATen's learnable fake-quant gradient: the mask is taken on the
rounded, unclamped q)::

    dx      = dy                  inside (qmin <= q <= qmax), else 0
    dscale  = g * sum(dy * ((clamp(q) - zp) * s - (x - offset)) / s)   inside
            + g * sum(dy * (qmin - zp))  below  + g * sum(dy * (qmax - zp))  above
    dzp     = g * sum(-dy * s)    where clipped (below or above)
    doffset = g * sum(dy)         where clipped

Backward, MODE_LSQ (LSQ, Esser et al. 2019, and LSQ+, Bhalgat et al. 2020: clip first, so
the mask is taken on the unrounded v = (x - offset) / s; zp = 0)::

    dx      = dy                  inside (qmin < v < qmax), else 0
    dscale  = g * sum(dy * (round(v) - v))   inside
            + g * sum(dy * qmin)  below (v <= qmin)  + g * sum(dy * qmax)  above (v >= qmax)
    doffset = g * sum(dy)         where clipped (below or above)

The two differ only in the bands qmax < v < qmax + 1/2 and qmin - 1/2 <= v < qmin (and at
v = qmin or qmax exactly), where ATen's rule passes dx and gives ``qmax - v`` to the scale
while LSQ clips.  ``round(v) - v`` is exact in fp32 (the two are within a factor of 2, or
round(v) = 0).  NaN elements contribute nothing.  PACT (clip alpha, s = alpha / qmax,
qmin = 0)::

    dx = dy where 0 <= x < alpha;   dalpha = sum(dy where x >= alpha)
"""
from __future__ import annotations

import torch

from .._ops import compute_dtype, sanitize_scale
from .._ops.fake_quant import MODE_LSQ, MODE_PACT, dense_like, lsq_grad_scale, lsq_levels


def _per_channel(t, x, axis, ct):
    """[C] parameter -> broadcastable against x along `axis` (or a scalar-like [1])."""
    t = t.to(ct)
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _params(x, scale, zero_point, offset, quant_min, quant_max, axis, mode):
    ct = compute_dtype(x.dtype)
    s = sanitize_scale(_per_channel(scale, x, axis, ct))
    clip = None
    if mode == MODE_PACT:
        clip = s
        s = clip / quant_max
    inv = 1.0 / s
    zero = torch.zeros((), dtype=ct, device=x.device)
    zp = zero
    if zero_point is not None:
        z = _per_channel(zero_point, x, axis, ct)
        zp = torch.where(torch.isnan(z), zero, torch.round(z)).clamp(quant_min, quant_max)
    off = zero if offset is None else _per_channel(offset, x, axis, ct)
    return s, inv, zp, off, clip


def _grid(xc, inv, zp, off):
    return torch.round((xc - off) * inv) + zp


def fake_quant(x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor=1.0):
    """Forward of ``q2ext::fake_quant`` (schema in q2ext/_ops/fake_quant.py)."""
    s, inv, zp, off, _ = _params(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    xc = x.to(s.dtype)
    q = _grid(xc, inv, zp, off)
    c = torch.where(q < quant_min, float(quant_min), torch.where(q > quant_max, float(quant_max), q))
    y = ((c - zp) * s + off).to(x.dtype)
    return dense_like(x).copy_(y)


def fake_quant_backward(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor=1.0):
    """(dx, dscale, dthird) of ``q2ext::fake_quant``; dthird is d zero_point, or d offset, or None."""
    s, inv, zp, off, clip = _params(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    ct = s.dtype
    xc, dy = x.to(ct), grad.to(ct)
    zero = torch.zeros((), dtype=ct, device=x.device)
    if mode == MODE_PACT:
        inside = (xc >= 0) & (xc < clip)
        clipped = xc >= clip
        dscale_el = zero.expand_as(xc)
    elif mode == MODE_LSQ:
        v = (xc - off) * inv
        below, above = v <= quant_min, v >= quant_max
        inside = (v > quant_min) & (v < quant_max)
        clipped = below | above
        edge = torch.where(below, float(quant_min), float(quant_max))
        dscale_el = torch.where(inside, dy * (torch.round(v) - v), torch.where(clipped, dy * edge, zero))
    else:
        q = _grid(xc, inv, zp, off)
        below, above = q < quant_min, q > quant_max
        inside = (q >= quant_min) & (q <= quant_max)
        clipped = below | above
        inside_term = (dy * ((q - zp) * s - (xc - off))) * inv
        edge = torch.where(below, quant_min - zp, quant_max - zp)
        dscale_el = torch.where(inside, inside_term, torch.where(clipped, dy * edge, zero))
    dx = torch.where(inside, grad, torch.zeros_like(grad))
    dclip_el = torch.where(clipped, dy, zero)

    dims = [d for d in range(x.dim()) if d != axis]

    def total(t):  # sum per channel (or over everything), in float64
        t = t.to(torch.float64)
        if axis is None:
            return t.sum().reshape(1)
        return t.sum(dim=dims) if dims else t  # sum(dim=[]) would reduce everything

    sum_scale, sum_clip = total(dscale_el), total(dclip_el)
    g = float(grad_factor)
    out_dtype = scale.dtype
    dscale = (g * (sum_clip if mode == MODE_PACT else sum_scale)).to(out_dtype).reshape(scale.shape)
    dthird = None
    if zero_point is not None:
        s_flat = s.reshape(-1).to(torch.float64)
        dthird = (-g * s_flat * sum_clip).to(out_dtype).reshape(zero_point.shape)
    elif offset is not None:
        dthird = (g * sum_clip).to(out_dtype).reshape(offset.shape)
    return dx, dscale, dthird


def fake_quant_backward_op(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor,
                           output_mask):
    """``q2ext::fake_quant_backward`` with the op's output conventions (fallback kernel)."""
    dx, dscale, dthird = fake_quant_backward(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode,
                                             grad_factor)
    def empty():  # a fresh tensor per missing output: op outputs must never alias
        return scale.new_empty((0,))

    dx_out = dense_like(x).copy_(dx) if output_mask[0] else empty()
    return (
        dx_out,
        dscale.contiguous() if output_mask[1] else empty(),
        dthird.contiguous() if output_mask[2] and dthird is not None else empty(),
    )


# ---------------------------------------------------------------- quantizer formulas

def lsq(x, scale, bits, signed=True, axis=None, offset=None, grad_scale=None):
    """LSQ / LSQ+ forward: round(clamp((x - offset)/s, -Q_N, Q_P)) * s + offset."""
    q_n, q_p = lsq_levels(bits, signed)
    return fake_quant(x, scale, None, offset, -q_n, q_p, axis, MODE_LSQ)


def lsq_backward(grad, x, scale, bits, signed=True, axis=None, offset=None, grad_scale=None):
    """(dx, dscale, doffset) of LSQ/LSQ+, scale/offset gradients multiplied by g."""
    q_n, q_p = lsq_levels(bits, signed)
    g = lsq_grad_scale(x.numel(), scale.numel(), q_p) if grad_scale is None else grad_scale
    return fake_quant_backward(grad, x, scale, None, offset, -q_n, q_p, axis, MODE_LSQ, g)


def pact(x, alpha, bits, axis=None):
    """PACT forward: round(clamp(x, 0, alpha) / s) * s with s = alpha / (2^b - 1)."""
    return fake_quant(x, alpha, None, None, 0, 2 ** bits - 1, axis, MODE_PACT)


def pact_backward(grad, x, alpha, bits, axis=None):
    """(dx, dalpha) of PACT."""
    dx, dalpha, _ = fake_quant_backward(grad, x, alpha, None, None, 0, 2 ** bits - 1, axis, MODE_PACT)
    return dx, dalpha


KERNELS = {"fake_quant": fake_quant, "fake_quant_backward": fake_quant_backward_op}
