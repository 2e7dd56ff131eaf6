"""Pure-PyTorch semantics of the Q-GBFusion ops: the test oracle and the fallback kernel.

Written for clarity, not speed.  float64 branches are computed in float64; fp32/fp16/bf16
branches in fp32 (the kernels do the same) and cast back.  Shapes: K branches
``(N, C_i, H, W)``; ``C = sum(C_i)`` (concat) or ``C_i`` (add, all equal).

Forward (``gb_fusion_forward``)::

    alpha = softmax(lam)             # fp32 [K], evaluated in fp64 and rounded once
    h     = cat_i(alpha_i * x_i)   or   sum_i alpha_i * x_i     # (N, C, H, W)
    mean  = mean_c h,  var = mean_c (h - mean)^2,  rstd = 1/sqrt(var + eps)   # (N, H, W)
    y     = (h - mean) * rstd;  out = y * weight_c + bias_c  (affine optional)

Backward (``gb_fusion_backward``), per pixel, with gy = grad * weight (or grad)::

    dh    = rstd * (gy - mean_c(gy) - y * mean_c(gy * y))
    dx_i  = alpha_i * dh[channels of branch i]      (add: alpha_i * dh)
    g_sq_i = sum(dx_i^2)   over the whole mini-batch, in float64, returned as fp32 [K]
    dweight_c = sum(grad * y),  dbias_c = sum(grad)     over N, H, W

Controller update (``gb_fusion_update``, in place on lam and g_ema, fp32 [K])::

    G      = sqrt(g_sq)
    g_ema  = G  where g_ema == 0 (first update: no EMA warm-up bias)  else (1-beta) g_ema + beta G
    e      = log(g_ema + eps) - mean_j log(g_ema_j + eps) - tau
    lam    = clamp(lam - eta * e, -lam_clip, lam_clip)
A step whose g_sq holds inf/NaN (an AMP overflow step) changes nothing.
"""
from __future__ import annotations

import torch

from .._ops import compute_dtype
from .._ops.gb_fusion import channel_offsets, output_format, softmax_alpha
from .._ops.gb_fusion import fuse_branches as _fuse
from .._ops.gb_fusion import gb_fusion_composite  # noqa: F401  (the composite form, for tests and benchmarks)


def _bc(v):  # [C] -> (1, C, 1, 1)
    return v.reshape(1, -1, 1, 1)


def gb_fusion_forward(branches, lam, weight, bias, mode, eps):
    """(out, mean, rstd, alpha) of ``q2ext::gb_fusion_forward`` (schema in q2ext/_ops/gb_fusion.py).

    branches: K tensors (N, C_i, H, W) of one float dtype; lam: fp32 [K]; weight, bias:
    [C] in the compute dtype or None.  out: branches' dtype, (N, C, H, W), laid out like
    branches[0]; mean, rstd: compute dtype (N, H, W); alpha: fp32 [K].
    """
    x0 = branches[0]
    ct = compute_dtype(x0.dtype)
    alpha = softmax_alpha(lam)
    h = _fuse(branches, alpha, mode, ct)
    mean = h.mean(1)
    var = (h - mean[:, None]).square().mean(1)
    rstd = torch.rsqrt(var + eps)
    y = (h - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * _bc(weight.to(ct)) + _bc(bias.to(ct))
    out = torch.empty(y.shape, dtype=x0.dtype, device=x0.device).contiguous(memory_format=output_format(x0))
    out.copy_(y)
    return out, mean.contiguous(), rstd.contiguous(), alpha.contiguous()


def gb_fusion_backward(grad, branches, alpha, weight, mean, rstd, mode, out=None):
    """(grad_branches, grad_weight, grad_bias, g_sq) of ``q2ext::gb_fusion_backward``.

    grad: (N, C, H, W) like the forward's out; mean, rstd: the forward's saved statistics.
    out: the forward's output or None; not read here: where kernels use it (no affine,
    fp32/fp64) it equals the y recomputed below, value for value.
    grad_branches: list of K tensors shaped and laid out like the branches; grad_weight,
    grad_bias: [C] (empty when weight is None); g_sq: fp32 [K], ||dL/dx_i||^2.
    """
    x0 = branches[0]
    ct = compute_dtype(x0.dtype)
    h = _fuse(branches, alpha, mode, ct)
    m, r = mean.to(ct)[:, None], rstd.to(ct)[:, None]
    y = (h - m) * r
    g = grad.to(ct)
    gy = g * _bc(weight.to(ct)) if weight is not None else g
    dh = r * (gy - gy.mean(1, keepdim=True) - y * (gy * y).mean(1, keepdim=True))
    offs, _ = channel_offsets(branches, mode)
    a = alpha.to(ct)
    grads, g_sq = [], []
    for i, x in enumerate(branches):
        d = a[i] * dh[:, offs[i]:offs[i] + x.shape[1]]
        g_sq.append(d.to(torch.float64).square().sum())
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=output_format(x))
        grads.append(out.copy_(d))
    empty = torch.empty(0, dtype=ct, device=x0.device)
    if weight is not None:
        dw = (g * y).to(torch.float64).sum((0, 2, 3)).to(ct)
        db = g.to(torch.float64).sum((0, 2, 3)).to(ct)
    else:
        dw, db = empty, empty.clone()
    return grads, dw, db, torch.stack(g_sq).to(torch.float32)


def gb_fusion_update_values(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip):
    """The controller law as a pure function: returns (new_lam, new_g_ema), fp32 [K]."""
    g = g_sq.to(torch.float32).sqrt()
    ema = torch.where(g_ema > 0, (1.0 - beta) * g_ema + beta * g, g)
    logs = torch.log(ema + eps)
    e = logs - logs.mean()
    if tau is not None:
        e = e - tau.to(torch.float32)
    new_lam = (lam - eta * e).clamp(-lam_clip, lam_clip)
    ok = torch.isfinite(g_sq).all()  # skip AMP overflow steps (no host sync: a select)
    return torch.where(ok, new_lam, lam), torch.where(ok, ema, g_ema)


def gb_fusion_update(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip):
    """``q2ext::gb_fusion_update``: the closed-loop law applied in place to lam and g_ema."""
    new_lam, new_ema = gb_fusion_update_values(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip)
    lam.copy_(new_lam)
    g_ema.copy_(new_ema)


def _update_op(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip):
    gb_fusion_update(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip)


KERNELS = {"gb_fusion_forward": gb_fusion_forward, "gb_fusion_backward": gb_fusion_backward,
           "gb_fusion_update": _update_op}
