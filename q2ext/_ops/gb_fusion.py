"""Schemas, argument checks, fake kernels and autograd of the Q-GBFusion ops.

Kernels: C++ CPU (csrc/cpu/gb_fusion*) and CUDA (csrc/cuda/gb_fusion*) in q2ext._C, else the
reference (q2ext/reference/gb_fusion.py, also the formulas' documentation).

``gb_fusion_forward(branches, lam, weight, bias, mode, eps) -> (out, mean, rstd, alpha)``
    branches: 2..16 tensors (N, C_i, H, W), one dtype (fp32/fp16/bf16/fp64), one device;
    mode MODE_CONCAT or MODE_ADD (equal C_i); lam fp32 [K]; weight/bias [C] in the compute
    dtype (fp32, fp64 for fp64 branches) or None.  No autograd of its own.
``gb_fusion_backward(grad, branches, alpha, weight, mean, rstd, mode, out=None) -> (grads, dw, db, g_sq)``
    The LN backward, every branch's gradient and g_sq[i] = ||dL/dx_i||^2 (fp32 [K]).
    ``out`` (optional) must be the forward's output for these arguments.  Without affine
    and with fp32/fp64 branches it is exactly the normalised y the backward needs, so the
    CPU kernel reads it instead of recomputing y from the K branches (add mode: one
    tensor read instead of K); the result is the same either way.
``gb_fusion_update(lam!, g_ema!, g_sq, tau, beta, eta, eps, lam_clip) -> ()``
    The controller law, in place on the fp32 [K] buffers, on their device (no host sync).
``gb_fusion(branches, lam, g_ema, tau, weight, bias, mode, eps, beta, eta, ctrl_eps,
lam_clip, update, sync) -> (out, mean, rstd, alpha)``
    The differentiable op the module calls: forward = gb_fusion_forward; its backward runs
    gb_fusion_backward, then (update=True) gb_fusion_update on lam/g_ema.  lam gets no
    autograd gradient.  sync=True all-reduces g_sq (mean over ranks) before the update so
    that lam stays identical on every DDP rank.

Why the controller rides on a separate op: the kernel ops stay pure (opcheck, reuse), and
the mutation of lam/g_ema happens in the backward graph as a declared in-place op, which
AOTAutograd keeps (torch.compile(fullgraph=True) matches eager, see the tests).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import LIB, compute_dtype, define

MODE_CONCAT = 0
MODE_ADD = 1
MODES = {"concat": MODE_CONCAT, "add": MODE_ADD}
MAX_BRANCHES = 16  # the CUDA kernels pass branch pointers by value in a fixed-size struct


def output_format(x: torch.Tensor) -> torch.memory_format:
    """Every op lays its (N, C, H, W) outputs out like the first branch: NHWC or NCHW."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def channel_offsets(branches, mode):
    """Per-branch first output channel (concat) or 0 (add), and the fused channel count."""
    offs, c = [], 0
    for b in branches:
        offs.append(c if mode == MODE_CONCAT else 0)
        c = c + b.shape[1] if mode == MODE_CONCAT else b.shape[1]
    return offs, c


def softmax_alpha(lam):
    """alpha = softmax(lam) as every backend computes it: in float64, rounded once to fp32."""
    return torch.softmax(lam.detach().to(torch.float64), 0).to(torch.float32)


def fuse_branches(branches, alpha, mode, ct):
    """h = cat_i(alpha_i x_i) or sum_i alpha_i x_i (left to right, like the kernels), in dtype ct."""
    a = alpha.to(ct)
    scaled = [x.to(ct) * a[i] for i, x in enumerate(branches)]
    if mode == MODE_CONCAT:
        return torch.cat(scaled, 1)
    h = scaled[0]
    for s in scaled[1:]:
        h = h + s
    return h


def gb_fusion_composite(branches, alpha, weight, bias, mode, eps):
    """The forward in ordinary differentiable PyTorch ops (autograd gives the backward): what
    an exporter can translate and what the fused kernels are benchmarked against.
    alpha is given (frozen), mode is MODE_CONCAT or MODE_ADD, weight/bias [C] or None."""
    ct = compute_dtype(branches[0].dtype)
    h = fuse_branches(branches, alpha, mode, ct)
    mean = h.mean(1, keepdim=True)
    var = (h - mean).square().mean(1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    return y.to(branches[0].dtype)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_branches(branches, mode):
    """Checks shared by every kernel; messages name the offending argument."""
    torch._check(mode in (MODE_CONCAT, MODE_ADD), lambda: f"mode must be 0 (concat) or 1 (add), got {mode}")
    k = len(branches)
    torch._check(k >= 2, lambda: f"branches must hold at least 2 tensors, got {k}")
    torch._check(k <= MAX_BRANCHES, lambda: f"branches holds {k} tensors; at most {MAX_BRANCHES} are supported")
    x0 = branches[0]
    torch._check(x0.dim() == 4, lambda: f"branches[0] must be 4-D (N, C, H, W), got shape {list(x0.shape)}")
    torch._check(x0.dtype in _DTYPES, lambda: f"branches[0] must be float32/16, bfloat16 or float64, got {x0.dtype}")
    for i, x in enumerate(branches[1:], 1):
        torch._check(x.dim() == 4, lambda: f"branches[{i}] must be 4-D (N, C, H, W), got shape {list(x.shape)}")
        for d, name in ((0, "N"), (2, "H"), (3, "W")):
            torch._check(
                x.shape[d] == x0.shape[d],
                lambda: f"branches[{i}] has {name}={x.shape[d]} but branches[0] has {name}={x0.shape[d]}",
            )
        torch._check(x.dtype == x0.dtype, lambda: f"branches[{i}] is {x.dtype} but branches[0] is {x0.dtype}")
        torch._check(x.device == x0.device, lambda: f"branches[{i}] is on {x.device} but branches[0] on {x0.device}")
        if mode == MODE_ADD:
            torch._check(
                x.shape[1] == x0.shape[1],
                lambda: f"mode add needs equal channels: branches[{i}] has C={x.shape[1]}, "
                f"branches[0] has C={x0.shape[1]}",
            )


def _check_vec(name, t, n, dtype, device):
    torch._check(t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
    torch._check(t.device == device, lambda: f"{name} is on {t.device} but branches[0] is on {device}")
    torch._check(t.dim() == 1 and t.shape[0] == n, lambda: f"{name} must have shape [{n}], got {list(t.shape)}")


def check_forward_args(branches, lam, weight, bias, mode, eps):
    check_branches(branches, mode)
    x0 = branches[0]
    _check_vec("lam", lam, len(branches), torch.float32, x0.device)
    _, c = channel_offsets(branches, mode)
    torch._check((weight is None) == (bias is None), lambda: "pass both weight and bias, or neither")
    if weight is not None:
        _check_vec("weight", weight, c, compute_dtype(x0.dtype), x0.device)
        _check_vec("bias", bias, c, compute_dtype(x0.dtype), x0.device)
    torch._check(eps > 0, lambda: f"eps must be > 0, got {eps}")
    return c


define("gb_fusion_forward(Tensor[] branches, Tensor lam, Tensor? weight, Tensor? bias, int mode, float eps)"
       " -> (Tensor, Tensor, Tensor, Tensor)", check_forward_args)


def _nchw(x0, c):
    n, _, h, w = x0.shape
    return x0.new_empty((n, c, h, w)).contiguous(memory_format=output_format(x0))


def forward_fake(branches, lam, weight, bias, mode, eps):
    c = check_forward_args(branches, lam, weight, bias, mode, eps)
    x0 = branches[0]
    n, _, h, w = x0.shape
    stats = x0.new_empty((n, h, w), dtype=compute_dtype(x0.dtype))
    return _nchw(x0, c), stats, torch.empty_like(stats), torch.empty_like(lam)


def check_backward_args(grad, branches, alpha, weight, mean, rstd, mode, out=None):
    check_branches(branches, mode)
    x0 = branches[0]
    _, c = channel_offsets(branches, mode)
    n, _, h, w = x0.shape
    torch._check(grad.shape == (n, c, h, w) and grad.dtype == x0.dtype,
                 lambda: f"grad must be {x0.dtype} of shape {[n, c, h, w]}, got {grad.dtype} {list(grad.shape)}")
    _check_vec("alpha", alpha, len(branches), torch.float32, x0.device)
    for name, t in (("mean", mean), ("rstd", rstd)):
        torch._check(t.shape == (n, h, w) and t.dtype == compute_dtype(x0.dtype),
                     lambda: f"{name} must be {compute_dtype(x0.dtype)} of shape {[n, h, w]}")
    if weight is not None:
        _check_vec("weight", weight, c, compute_dtype(x0.dtype), x0.device)
    if out is not None:
        torch._check(out.shape == grad.shape and out.dtype == grad.dtype and out.device == x0.device,
                     lambda: f"out must be the forward's output, {grad.dtype} {list(grad.shape)} on {x0.device}; "
                             f"got {out.dtype} {list(out.shape)} on {out.device}")
    return c


define("gb_fusion_backward(Tensor grad, Tensor[] branches, Tensor alpha, Tensor? weight, Tensor mean, "
       "Tensor rstd, int mode, Tensor? out=None) -> (Tensor[], Tensor, Tensor, Tensor)", check_backward_args)


def saved_output_pays(branches, weight):
    """Whether the autograd saves the output for the backward (see gb_fusion_backward)."""
    return weight is None and branches[0].dtype in (torch.float32, torch.float64)


def backward_fake(grad, branches, alpha, weight, mean, rstd, mode, out=None):
    c = check_backward_args(grad, branches, alpha, weight, mean, rstd, mode, out)
    x0 = branches[0]
    ct = compute_dtype(x0.dtype)
    grads = [x.new_empty(x.shape).contiguous(memory_format=output_format(x)) for x in branches]
    if weight is not None:
        dw, db = x0.new_empty((c,), dtype=ct), x0.new_empty((c,), dtype=ct)
    else:
        dw, db = x0.new_empty((0,), dtype=ct), x0.new_empty((0,), dtype=ct)
    return grads, dw, db, alpha.new_empty((len(branches),))


def check_update_args(lam, g_ema, g_sq, tau, lam_clip):
    k = lam.shape[0] if lam.dim() == 1 else -1
    torch._check(lam.dim() == 1 and lam.dtype == torch.float32, lambda: f"lam must be fp32 [K], got {lam.dtype}")
    for name, t in (("g_ema", g_ema), ("g_sq", g_sq)) + ((("tau", tau),) if tau is not None else ()):
        _check_vec(name, t, k, torch.float32, lam.device)
    torch._check(lam_clip > 0, lambda: f"lam_clip must be > 0, got {lam_clip}")


def _check_update_op_args(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip):
    check_update_args(lam, g_ema, g_sq, tau, lam_clip)


define("gb_fusion_update(Tensor(a!) lam, Tensor(b!) g_ema, Tensor g_sq, Tensor? tau, float beta, float eta, "
       "float eps, float lam_clip) -> ()", _check_update_op_args)
define("gb_fusion(Tensor[] branches, Tensor lam, Tensor g_ema, Tensor? tau, Tensor? weight, Tensor? bias, "
       "int mode, float eps, float beta, float eta, float ctrl_eps, float lam_clip, bool update, bool sync)"
       " -> (Tensor, Tensor, Tensor, Tensor)")


def update_fake(lam, g_ema, g_sq, tau, beta, eta, eps, lam_clip):
    check_update_args(lam, g_ema, g_sq, tau, lam_clip)


def gb_fusion_fake(branches, lam, g_ema, tau, weight, bias, mode, eps, beta, eta, ctrl_eps, lam_clip, update, sync):
    return forward_fake(branches, lam, weight, bias, mode, eps)


torch.library.register_fake("q2ext::gb_fusion_forward", forward_fake, lib=LIB)
torch.library.register_fake("q2ext::gb_fusion_backward", backward_fake, lib=LIB)
torch.library.register_fake("q2ext::gb_fusion_update", update_fake, lib=LIB)
torch.library.register_fake("q2ext::gb_fusion", gb_fusion_fake, lib=LIB)


def _gb_fusion_impl(branches, lam, g_ema, tau, weight, bias, mode, eps, beta, eta, ctrl_eps, lam_clip, update,
                    sync):
    return torch.ops.q2ext.gb_fusion_forward(branches, lam, weight, bias, mode, eps)


for _key in ("CPU", "CUDA"):
    LIB.impl("gb_fusion", _gb_fusion_impl, _key)


def _all_reduce_mean(t):
    """Mean of t over the default process group; traceable (functional collective)."""
    world = dist.get_world_size()
    return funcol.all_reduce(t, "sum", dist.group.WORLD) / world


def _setup_context(ctx, inputs, output):
    branches, lam, g_ema, tau, weight, bias, mode, eps, beta, eta, ctrl_eps, lam_clip, update, sync = inputs
    out, mean, rstd, alpha = output
    ctx.k = len(branches)
    ctx.has_weight = weight is not None
    # Saving the output costs no memory in practice (the next layer keeps it for its own
    # backward) and spares the backward K-1 tensor reads; like torch.sigmoid's, an
    # in-place change of the output then makes autograd's backward refuse to run.
    y = out if saved_output_pays(branches, weight) else None
    ctx.save_for_backward(*branches, alpha, mean, rstd, weight, y)
    # lam/g_ema are deliberately not saved with save_for_backward: the update below
    # mutates them, and a retained graph would then refuse its second backward.
    ctx.state = (lam, g_ema, tau)
    ctx.args = (mode, beta, eta, ctrl_eps, lam_clip, update, sync)
    ctx.mark_non_differentiable(mean, rstd, alpha)


def _backward_core(ctx, grad, need_branches):
    """(branch grads or None, dw, db): the kernel backward, then the controller update."""
    saved = ctx.saved_tensors
    k = ctx.k
    branches, (alpha, mean, rstd, weight, y) = list(saved[:k]), saved[k:]
    mode, beta, eta, ctrl_eps, lam_clip, update, sync = ctx.args
    grads, dw, db, g_sq = torch.ops.q2ext.gb_fusion_backward(grad, branches, alpha, weight, mean, rstd, mode, y)
    if update:
        lam, g_ema, tau = ctx.state
        if sync:
            g_sq = _all_reduce_mean(g_sq)
        torch.ops.q2ext.gb_fusion_update(lam, g_ema, g_sq, tau, beta, eta, ctrl_eps, lam_clip)
    return [g if need_branches else None for g in grads], dw, db


def _backward(ctx, grad, _gmean, _grstd, _galpha):
    needs = ctx.needs_input_grad
    branch_grads, dw, db = _backward_core(ctx, grad, needs[0])
    return (branch_grads, None, None, None, dw if ctx.has_weight and needs[4] else None,
            db if ctx.has_weight and needs[5] else None) + (None,) * 8


torch.library.register_autograd("q2ext::gb_fusion", _backward, setup_context=_setup_context, lib=LIB)


class _EagerGBFusion(torch.autograd.Function):
    """Eager path of q2ext::gb_fusion: the same ops, saved tensors and backward as the
    registered autograd above, without torch.library's per-call argument flattening
    (~150 us per call on this project's CI CPU, as long as a small node's kernels take).
    torch.compile traces the registered op instead (see :func:`gb_fusion_apply`)."""

    @staticmethod
    def forward(ctx, weight, bias, rest, *branches):
        lam, g_ema, tau, mode, eps, beta, eta, ctrl_eps, lam_clip, update, sync = rest
        output = torch.ops.q2ext.gb_fusion_forward(list(branches), lam, weight, bias, mode, eps)
        _setup_context(ctx, (list(branches), lam, g_ema, tau, weight, bias) + tuple(rest[3:]), output)
        return output

    @staticmethod
    def backward(ctx, grad, _gmean, _grstd, _galpha):
        needs = ctx.needs_input_grad
        branch_grads, dw, db = _backward_core(ctx, grad, any(needs[3:]))
        return (dw if ctx.has_weight and needs[0] else None, db if ctx.has_weight and needs[1] else None,
                None, *branch_grads)


def gb_fusion_apply(branches, lam, g_ema, tau, weight, bias, mode, eps, beta, eta, ctrl_eps, lam_clip, update,
                    sync):
    """``q2ext::gb_fusion`` with autograd: the registered op under torch.compile (and
    whenever nothing needs a gradient), the equivalent eager Function otherwise."""
    needs_grad = torch.is_grad_enabled() and (any(b.requires_grad for b in branches) or (
        weight is not None and (weight.requires_grad or bias.requires_grad)))
    if torch.compiler.is_compiling() or not needs_grad:
        return torch.ops.q2ext.gb_fusion(branches, lam, g_ema, tau, weight, bias, mode, eps, beta, eta, ctrl_eps,
                                         lam_clip, update, sync)
    rest = (lam, g_ema, tau, mode, eps, beta, eta, ctrl_eps, lam_clip, update, sync)
    return _EagerGBFusion.apply(weight, bias, rest, *branches)
