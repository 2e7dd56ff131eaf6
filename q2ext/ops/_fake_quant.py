"""Public functional API of the fake-quant op family: ATen-compatible affine fake quant,
LSQ / LSQ+ and PACT.

Every function takes ``x`` of dtype float32, float16 or bfloat16 (math in fp32, result
in x's dtype) with any shape and strides, and learnable fp32 parameter tensors of
shape ``[1]`` (per-tensor, ``axis=None``) or ``[x.shape[axis]]`` (per-channel; ``axis``
may be negative).  They are differentiable in ``x`` and in every parameter, never
synchronise with the host, and work under ``torch.compile(fullgraph=True)``.
Numerics are defined in :mod:`q2ext.reference.fake_quant`.

Parameter edge cases (documented, tested): a scale (or PACT alpha) that is NaN,
``<= 0`` or below FLT_EPSILON acts as FLT_EPSILON, ``+inf`` as FLT_MAX (gradients are
then taken at that value); a NaN zero point acts as 0.  Input edge cases: NaN in x
gives NaN in y and no gradient contribution; +-inf saturate to the grid ends.
"""
from __future__ import annotations

import torch

from .. import backend
from .._ops.fake_quant import MODE_AFFINE, MODE_LSQ, MODE_PACT, lsq_grad_scale, lsq_levels

__all__ = ["fake_quant_affine", "lsq", "pact"]


def _fake_quant_op(device_type: str):
    return backend.op_for("fake_quant", device_type)


def _check_x(x, fn):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")


def _check_bits(bits, fn):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{fn}: bits must be an int in 2..8, got {bits!r}")


def _normalize_axis(axis, x, fn):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{fn}: axis must be an int or None, got {axis!r}")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{fn}: axis {axis} out of range for x with {x.dim()} dims")
    return axis % x.dim()


def _check_param(t, name, x, axis, fn, required=True):
    if t is None and not required:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a float32 tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{fn}: {name} must be float32, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    want = 1 if axis is None else x.shape[axis]
    if t.dim() > 1 or t.numel() != want:
        where = "per-tensor (axis=None)" if axis is None else f"per-channel along axis {axis}"
        raise ValueError(f"{fn}: {name} must have shape [{want}] for {where}, got {list(t.shape)}")


def fake_quant_affine(x, scale, zero_point, quant_min, quant_max, axis=None, grad_factor=1.0):
    """Learnable affine fake quantization with PyTorch's numerics.

    Forward is bit-identical (fp32) to ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` with ``zero_point`` rounded half-to-even
    and clamped to ``[quant_min, quant_max]`` (what ``torch._fake_quantize_learnable_*``
    do); gradients equal ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``'s
    up to summation order, ``grad_factor`` included, with two documented exceptions where
    ATen's backward disagrees with its own forward: (1) q2ext rounds the zero point
    half-to-even in the backward too (ATen's per-tensor backward uses ``trunc(zp + 0.5)``,
    which is ``zp + 1`` for negative integer zero points); (2) at exact ties
    ``x/s = k + 1/2`` q2ext rounds ``x/s`` and then adds the zero point, as the forward
    does (ATen's backward rounds ``x/s + zp`` in one step).

    Args:
        x: float32/float16/bfloat16 tensor, any shape and strides.
        scale: float32 ``[1]`` or ``[x.shape[axis]]``.
        zero_point: float32, same shape as ``scale``.
        quant_min, quant_max: ints with ``quant_min < quant_max`` within [-65536, 65535].
        axis: ``None`` (per-tensor) or the channel dimension.
        grad_factor: multiplies the scale and zero-point gradients.
    Returns: tensor like ``x``.
    """
    fn = "fake_quant_affine"
    _check_x(x, fn)
    axis = _normalize_axis(axis, x, fn)
    for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: {name} must be an int, got {v!r}")
    if quant_min >= quant_max:
        raise ValueError(f"{fn}: quant_min ({quant_min}) must be < quant_max ({quant_max})")
    if quant_min < -65536 or quant_max > 65535:
        raise ValueError(f"{fn}: quant_min/quant_max must lie in [-65536, 65535], got [{quant_min}, {quant_max}]")
    _check_param(scale, "scale", x, axis, fn)
    if zero_point is None:
        raise TypeError(f"{fn}: zero_point must be a float32 tensor (use zeros for symmetric grids)")
    _check_param(zero_point, "zero_point", x, axis, fn)
    op = _fake_quant_op(x.device.type)
    return op(x, scale, zero_point, None, quant_min, quant_max, axis, MODE_AFFINE, float(grad_factor))


def lsq(x, scale, bits, signed=True, axis=None, offset=None, grad_scale=None):
    """LSQ (Esser et al. 2019) and, with ``offset``, LSQ+ (Bhalgat et al. 2020).

    ``y = round(clamp(v, -Q_N, Q_P)) * s + offset`` with ``v = (x - offset) / s`` (``offset``
    = 0 for LSQ), computed as ATen does (multiply by 1/s, round half to even).  Gradients
    exactly the papers' (clip first, so the mask is taken on the unrounded v):
    ``dx = dy`` for ``-Q_N < v < Q_P``, else 0; ``ds = g * sum(dy * (round(v) - v))`` inside,
    ``g * sum(dy * -Q_N)`` for ``v <= -Q_N`` and ``g * sum(dy * Q_P)`` for ``v >= Q_P``;
    ``d offset = g * sum(dy)`` where clipped.  (:func:`fake_quant_affine` keeps ATen's rule,
    which takes the mask on the rounded v: the two differ for ``Q_P < v < Q_P + 1/2`` and the
    mirror band below ``-Q_N``.)

    Args:
        x: float32/float16/bfloat16 tensor, any shape and strides.
        scale: float32 ``[1]`` or ``[x.shape[axis]]``, the step size s.
        bits: int 2..8; signed grid ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``.
        signed: grid choice (use unsigned for non-negative activations).
        axis: ``None`` (per-tensor) or the channel dimension.
        offset: optional float32 learnable offset (LSQ+ beta), shaped like ``scale``.
        grad_scale: gradient scale g for ``scale`` and ``offset``; ``None`` means the
            paper's ``1/sqrt(N * Q_P)`` with N = elements per scale value.
    Returns: tensor like ``x``.
    """
    fn = "lsq"
    _check_x(x, fn)
    _check_bits(bits, fn)
    axis = _normalize_axis(axis, x, fn)
    _check_param(scale, "scale", x, axis, fn)
    _check_param(offset, "offset", x, axis, fn, required=False)
    q_n, q_p = lsq_levels(bits, bool(signed))
    g = lsq_grad_scale(x.numel(), scale.numel(), q_p) if grad_scale is None else float(grad_scale)
    op = _fake_quant_op(x.device.type)
    return op(x, scale, None, offset, -q_n, q_p, axis, MODE_LSQ, g)


def pact(x, alpha, bits, axis=None):
    """PACT (Choi et al. 2018): ``y = round(clamp(x, 0, alpha) / s) * s``, ``s = alpha/(2^b-1)``.

    Gradients: ``dx = dy`` where ``0 <= x < alpha``; ``d alpha = sum(dy)`` where
    ``x >= alpha``.

    Args:
        x: float32/float16/bfloat16 tensor, any shape and strides.
        alpha: float32 ``[1]`` (or ``[x.shape[axis]]`` with ``axis``), the learnable clip.
        bits: int 2..8 (unsigned grid).
    Returns: tensor like ``x``.
    """
    fn = "pact"
    _check_x(x, fn)
    _check_bits(bits, fn)
    axis = _normalize_axis(axis, x, fn)
    _check_param(alpha, "alpha", x, axis, fn)
    op = _fake_quant_op(x.device.type)
    return op(x, alpha, None, None, 0, 2 ** bits - 1, axis, MODE_PACT, 1.0)
