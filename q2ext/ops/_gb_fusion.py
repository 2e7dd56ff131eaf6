"""Public functional API of the Q-GBFusion op family (the Q² paper, Sec. 3.2).

:func:`gb_fusion` fuses K branch features, normalises each pixel over channels and, in the
backward, measures every branch's gradient energy and moves the controller state ``lam``
by the closed-loop law, on the device.  ``q2ext.nn.GBFusion`` is the module (it owns the
controller buffers); formulas: q2ext/reference/gb_fusion.py.  The op family has C++ CPU and
CUDA kernels and no Triton variant.
"""
from __future__ import annotations

import torch

from .._ops.gb_fusion import MODES, gb_fusion_apply

__all__ = ["gb_fusion"]


def _check_state(t, name, k):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (k,):
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"gb_fusion: {name} must be a float32 tensor of shape [{k}] (one value per branch), got {got}")


def gb_fusion(branches, lam, g_ema, tau=None, weight=None, bias=None, mode="concat", eps=1e-6, beta=0.1, eta=0.05,
              ctrl_eps=1e-6, lam_clip=4.0, update=True, sync=False, return_stats=False):
    """Differentiable Q-GBFusion: ``LayerNorm_channels(fuse(softmax(lam)_i * x_i))``.

    Args:
        branches: K >= 2 tensors (N, C_i, H, W) of one dtype (fp32/fp16/bf16/fp64), NCHW or
            channels_last.
        lam, g_ema: fp32 [K] controller buffers, mutated in place by the backward when
            ``update`` (lam gets no autograd gradient).  tau: fp32 [K] target offsets or None.
        weight, bias: [C] LayerNorm affine in the compute dtype, or None.
        mode: "concat" (C = sum C_i) or "add" (equal C_i).  eps: LayerNorm epsilon.
        beta, eta, ctrl_eps, lam_clip: the controller's EMA factor, gain, log epsilon, lam bound.
        sync: all-reduce the energies over the default process group before the update.
        return_stats: also return the per-pixel mean, rstd (N, H, W) and alpha [K].
    Returns: the fused (N, C, H, W) tensor in the branches' dtype, laid out like branches[0]
    (with ``return_stats``: ``(out, mean, rstd, alpha)``).
    """
    if isinstance(branches, torch.Tensor) or not isinstance(branches, (list, tuple)):
        raise TypeError(f"gb_fusion: branches must be a list of tensors, got {type(branches).__name__}")
    if mode not in MODES:
        raise ValueError(f"gb_fusion: mode must be 'concat' or 'add', got {mode!r}")
    k = len(branches)
    _check_state(lam, "lam", k)
    _check_state(g_ema, "g_ema", k)
    if tau is not None:
        _check_state(tau, "tau", k)
    out = gb_fusion_apply(list(branches), lam, g_ema, tau, weight, bias, MODES[mode], float(eps), float(beta),
                          float(eta), float(ctrl_eps), float(lam_clip), bool(update), bool(sync))
    return out if return_stats else out[0]
