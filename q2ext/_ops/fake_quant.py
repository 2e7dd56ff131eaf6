"""Schemas, argument checks, fake kernels and autograd of the fake-quant op family (one
kernel pair serves LSQ, LSQ+, PACT and ATen-style affine).  Semantics: q2ext/reference/fake_quant.py.

``fake_quant(x, scale, zero_point, offset, quant_min, quant_max, axis, mode,
grad_factor) -> y``
    ``x`` fp32/fp16/bf16 of any shape and strides; ``scale``, ``zero_point``,
    ``offset``: fp32 ``[1]`` (``axis=None``) or ``[x.shape[axis]]``; ``axis`` already
    normalised to ``[0, x.dim())``; ``mode`` is MODE_AFFINE (ATen's learnable fake quant),
    MODE_LSQ (LSQ / LSQ+: the same forward, the papers' gradients, no zero point) or
    MODE_PACT (then ``scale`` holds the clip value alpha). ``grad_factor`` is only used by the backward.
``fake_quant_backward(grad, x, ..., grad_factor, output_mask) -> (dx, dscale, dthird)``
    ``dthird`` is the zero-point gradient, or the offset gradient; an unrequested or
    non-existent gradient comes back as an empty tensor.
"""
from __future__ import annotations

import math

import torch

try:  # a private helper; the name has moved between torch releases
    from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
except ImportError:
    from torch._prims_common import is_non_overlapping_and_dense

from . import LIB, define, sanitize_scale

MODE_AFFINE = 0
MODE_PACT = 1
MODE_LSQ = 2
MODES = (MODE_AFFINE, MODE_PACT, MODE_LSQ)

_FQ_ARGS = (
    "Tensor scale, Tensor? zero_point, Tensor? offset, int quant_min, int quant_max, "
    "int? axis, int mode, float grad_factor"
)
FAKE_QUANT_SCHEMA = f"(Tensor x, {_FQ_ARGS}) -> Tensor"
FAKE_QUANT_BACKWARD_SCHEMA = (
    f"(Tensor grad, Tensor x, {_FQ_ARGS}, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)

_FLOAT_X = (torch.float32, torch.float16, torch.bfloat16)


def check_fake_quant_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode):
    """The checks every kernel relies on; messages name the argument."""
    torch._check(x.dtype in _FLOAT_X, lambda: f"x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(mode in MODES, lambda: f"unknown fake-quant mode {mode}")
    torch._check(quant_min < quant_max, lambda: f"quant_min ({quant_min}) must be < quant_max ({quant_max})")
    torch._check(
        quant_min >= -65536 and quant_max <= 65535,
        lambda: f"quant_min/quant_max must lie in [-65536, 65535], got [{quant_min}, {quant_max}]",
    )
    if axis is not None:
        torch._check(0 <= axis < x.dim(), lambda: f"axis {axis} out of range for x with {x.dim()} dims")
    channels = 1 if axis is None else x.shape[axis]
    torch._check(isinstance(scale, torch.Tensor), lambda: "scale must be a float32 tensor, got None")
    for name, t in (("scale", scale), ("zero_point", zero_point), ("offset", offset)):
        if t is None:
            continue
        torch._check(t.dtype == torch.float32, lambda: f"{name} must be float32, got {t.dtype}")
        torch._check(t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")
        torch._check(
            t.dim() <= 1 and t.numel() == channels,
            lambda: f"{name} must have shape [{channels}], got {list(t.shape)}",
        )
    torch._check(zero_point is None or offset is None, lambda: "pass zero_point or offset, not both")
    torch._check(
        mode != MODE_PACT or (quant_min == 0 and zero_point is None and offset is None),
        lambda: "PACT takes quant_min = 0 and no zero_point/offset",
    )
    torch._check(mode != MODE_LSQ or zero_point is None, lambda: "LSQ takes no zero_point (use offset for LSQ+)")


def _check_backward_args(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode):
    check_fake_quant_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    torch._check(grad.shape == x.shape and grad.dtype == x.dtype, lambda: "grad must match x in shape and dtype")


define("fake_quant" + FAKE_QUANT_SCHEMA, check_fake_quant_args)
define("fake_quant_backward" + FAKE_QUANT_BACKWARD_SCHEMA, _check_backward_args)


def dense_like(x: torch.Tensor) -> torch.Tensor:
    """Layout every kernel gives its outputs: x's own if dense, else contiguous."""
    xd = x if is_non_overlapping_and_dense(x) else x.contiguous()
    return torch.empty_like(xd)


def _empty(scale):
    return scale.new_empty((0,))


def backward_outputs_like(x, scale, zero_point, offset, output_mask):
    """Empty tensors shaped like the backward's outputs (used by fake and Triton kernels)."""
    third = zero_point if zero_point is not None else offset
    return (
        dense_like(x) if output_mask[0] else _empty(scale),
        torch.empty_like(scale, memory_format=torch.contiguous_format) if output_mask[1] else _empty(scale),
        torch.empty_like(third, memory_format=torch.contiguous_format)
        if output_mask[2] and third is not None
        else _empty(scale),
    )


def fake_quant_fake(x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor):
    check_fake_quant_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    return dense_like(x)


def fake_quant_backward_fake(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode,
                             grad_factor, output_mask):
    _check_backward_args(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    return backward_outputs_like(x, scale, zero_point, offset, output_mask)


torch.library.register_fake("q2ext::fake_quant", fake_quant_fake, lib=LIB)
torch.library.register_fake("q2ext::fake_quant_backward", fake_quant_backward_fake, lib=LIB)


def make_fake_quant_autograd(backward_op):
    """setup_context/backward pair for a fake-quant forward op whose backward is `backward_op`.

    Shared by the C++ op and the Triton op so both differentiate identically.
    """

    def setup_context(ctx, inputs, output):
        x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor = inputs
        ctx.save_for_backward(x, scale, zero_point, offset)
        ctx.args = (quant_min, quant_max, axis, mode, grad_factor)

    def backward(ctx, grad):
        x, scale, zero_point, offset = ctx.saved_tensors
        third_needed = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], third_needed]
        if not any(mask):
            return (None,) * 9
        dx, dscale, dthird = backward_op(grad, x, scale, zero_point, offset, *ctx.args, mask)
        return (
            dx if mask[0] else None,
            dscale if mask[1] else None,
            dthird if ctx.needs_input_grad[2] else None,
            dthird if ctx.needs_input_grad[3] else None,
            None, None, None, None, None,
        )

    return setup_context, backward


_setup, _backward = make_fake_quant_autograd(torch.ops.q2ext.fake_quant_backward)
torch.library.register_autograd("q2ext::fake_quant", _backward, setup_context=_setup, lib=LIB)


# ---------------------------------------------------------------- decomposition for Inductor
# Under torch.compile the kernels above would be opaque calls: Inductor cannot fuse them
# with the BatchNorm/ReLU before them or with the backward's pointwise ops, it copies
# their inputs and outputs between its channels_last layout and the strides the op was
# traced with.  Decomposed into ATen ops they become a few more fused pointwise/reduction
# loops in Inductor's own layout (its partitioner still decides what to save; today it
# keeps the quantized tensors, as for any pure-PyTorch LSQ).
# Only Inductor uses this (eager and other backends keep the kernels).  The arithmetic is
# that of csrc/include/q2ext/fake_quant_math.h (reciprocal multiply, half-to-even,
# fp32 sums); the compiled build of Inductor does not contract it into FMAs by default.

def _per_channel(t, x, axis):
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _decomp_params(x, scale, zero_point, offset, quant_min, quant_max, axis, mode):
    """(s, 1/s, zp, offset, PACT clip) broadcastable against x, in fp32."""
    s = sanitize_scale(_per_channel(scale, x, axis))
    clip = None
    if mode == MODE_PACT:
        clip, s = s, s / quant_max
    zp = 0.0
    if zero_point is not None:
        z = _per_channel(zero_point, x, axis)
        zp = torch.where(torch.isnan(z), 0.0, torch.round(z)).clamp(quant_min, quant_max)
    off = 0.0 if offset is None else _per_channel(offset, x, axis)
    return s, 1.0 / s, zp, off, clip


def _fake_quant_decomposition(x, scale, zero_point, offset, quant_min, quant_max, axis, mode, grad_factor):
    s, inv, zp, off, _ = _decomp_params(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    q = torch.round((x.float() - off) * inv) + zp
    c = torch.where(q < quant_min, float(quant_min), torch.where(q > quant_max, float(quant_max), q))
    return ((c - zp) * s + off).to(x.dtype)


def _fake_quant_backward_decomposition(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode,
                                       grad_factor, output_mask):
    s, inv, zp, off, clip = _decomp_params(x, scale, zero_point, offset, quant_min, quant_max, axis, mode)
    xf, dy = x.float(), grad.float()
    if mode == MODE_PACT:
        inside = (xf >= 0) & (xf < clip)
        clipped = xf >= clip
    elif mode == MODE_LSQ:  # the mask on the unrounded v (see the reference)
        v = (xf - off) * inv
        below, above = v <= quant_min, v >= quant_max
        inside = (v > quant_min) & (v < quant_max)
        clipped = below | above
    else:
        q = torch.round((xf - off) * inv) + zp
        below, above = q < quant_min, q > quant_max
        inside = (q >= quant_min) & (q <= quant_max)
        clipped = below | above
    dims = [d for d in range(x.dim()) if d != axis]

    def total(t):  # per-channel (or whole-tensor) fp32 sum, shaped [C]
        if axis is None:
            return t.sum().reshape(1)
        return t.sum(dim=dims) if dims else t

    g = float(grad_factor)
    dclip = total(torch.where(clipped, dy, 0.0)) if (mode == MODE_PACT or output_mask[2]) else None
    dx = torch.where(inside, grad, 0.0).to(grad.dtype) if output_mask[0] else scale.new_empty((0,))
    if not output_mask[1]:
        dscale = scale.new_empty((0,))
    elif mode == MODE_PACT:
        dscale = (g * dclip).reshape(scale.shape)
    elif mode == MODE_LSQ:
        edge = torch.where(below, float(quant_min), float(quant_max))
        el = torch.where(inside, dy * (torch.round(v) - v), torch.where(clipped, dy * edge, 0.0))
        dscale = (g * total(el)).reshape(scale.shape)
    else:
        inside_term = (dy * ((q - zp) * s - (xf - off))) * inv
        edge = torch.where(below, quant_min - zp, quant_max - zp)
        el = torch.where(inside, inside_term, torch.where(clipped, dy * edge, 0.0))
        dscale = (g * total(el)).reshape(scale.shape)
    third = zero_point if zero_point is not None else offset
    if not output_mask[2] or third is None:
        dthird = scale.new_empty((0,))
    elif zero_point is not None:
        dthird = (-g * s.reshape(-1) * dclip).reshape(third.shape)
    else:
        dthird = (g * dclip).reshape(third.shape)
    return dx, dscale, dthird


def register_compile_decompositions(forward_op, backward_op) -> bool:
    """Give Inductor the ATen decompositions of a fake-quant forward/backward op pair with
    the ``q2ext::fake_quant`` schemas.  Returns False when this torch has no Inductor."""
    try:
        from torch._inductor.decomposition import register_decomposition
    except ImportError:  # a torch build without Inductor: the op stays opaque
        return False
    register_decomposition(forward_op)(_fake_quant_decomposition)
    register_decomposition(backward_op)(_fake_quant_backward_decomposition)
    return True


register_compile_decompositions(torch.ops.q2ext.fake_quant.default, torch.ops.q2ext.fake_quant_backward.default)


# ---------------------------------------------------------------- quantizer formulas

def lsq_levels(bits: int, signed: bool):
    """(Q_N, Q_P) of a b-bit LSQ grid: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def lsq_grad_scale(numel: int, num_scales: int, q_p: int) -> float:
    """The LSQ paper's g = 1/sqrt(N * Q_P), N = elements per scale value."""
    n = max(numel // max(num_scales, 1), 1)
    return 1.0 / math.sqrt(n * q_p)
