"""The Q-GBFusion deployment passes (the Q² paper, Eq. 11-12 and App. 7.1): calibrate the
per-pixel LayerNorm of every fusion node to constants, replace the node by a constant
affine and fold it into the convolutions that follow, then (optionally) a short
fine-tune of the model without LayerNorm.

Two calibrated replacements of ``LN(h)`` (h = fuse(alpha_i x_i), per pixel over channels):

- ``mode="scalar"`` (Eq. 11): ``(h - mu) / sigma`` with mu = E[mu_pixel], sigma =
  E[sqrt(var_pixel + eps)] over the calibration pixels;
- ``mode="per_channel"``: ``A_c h_c + B_c`` per channel c (i.e. per input channel of the
  next conv), A_c, B_c the least-squares fit of the LayerNorm output on its input over
  the calibration pixels (A_c = cov(h_c, y_c) / var(h_c), B_c = E[y_c] - A_c E[h_c]).  It
  contains the scalar form (A_c = 1/sigma, B_c = -mu/sigma) as one candidate, so it fits
  the calibration data at least as well; a channel that never varies keeps the scalar A.

Where the node feeds float convs only, the affine goes into their weights (Eq. 12):
``W' = W diag(A alpha)``, ``b' = b + W B`` (``fold_shift="bias"``; exact for unpadded
convs, a padded conv's border taps then see the un-shifted zero) or B stays in front
(``"keep"``, exact).  A *quantized* conv (QuantConv2d) keeps the affine in front of it (a
FixedFusion): its per-output-channel weight steps cannot absorb a per-input-channel
factor without re-rounding the trained codes (``Q(W diag(a)) != Q(W) diag(a)``), and its
learned input step was trained on the normalised input.  ``q2ext.convert`` then runs that
affine as one elementwise pass in front of the int8 conv.

Replacing a per-pixel normalisation by constants changes the function the model was
trained with; App. 7.1 recovers the loss with a short fine-tune after removing the
LayerNorm (task loss only, Adam, lr 2e-5, a small subset): :class:`FinetuneSpec`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from .._ops.gb_fusion import MODES, fuse_branches
from ..nn.fake_quant_layers import QUANT_LAYERS
from ..nn.gb_fusion import FixedFusion, GBFusion
from ._surgery import eval_no_grad

__all__ = ["calibrate_gbfusion", "fold_gbfusion", "FinetuneSpec", "finetune", "FOLD_MODES"]

FOLD_MODES = ("scalar", "per_channel")


@dataclass
class FinetuneSpec:
    """The short fine-tune after removing LayerNorm (App. 7.1).

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the task loss only (the
            model's forward and the criterion, e.g. ``F.cross_entropy(model(x), y)``).
        batches: the small subset, re-iterated cyclically: a list (or any re-iterable) of
            whatever ``loss_fn`` takes as ``batch``.
        steps: Adam steps (>= 1).
        lr: Adam learning rate (the paper's 2e-5).
    The model trains in train mode, except that BatchNorm layers keep their running
    statistics (eval): a few steps on a small subset must not re-estimate them.
    """
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batches: Iterable
    steps: int = 100
    lr: float = 2e-5

    def __post_init__(self):
        if not callable(self.loss_fn):
            raise TypeError(f"FinetuneSpec: loss_fn must be callable, got {type(self.loss_fn).__name__}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"FinetuneSpec: steps must be an int >= 1, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (self.lr > 0 and
                                                                                      math.isfinite(self.lr)):
            raise ValueError(f"FinetuneSpec: lr must be a finite number > 0, got {self.lr!r}")
        try:
            it = iter(self.batches)
        except TypeError:
            raise TypeError(f"FinetuneSpec: batches must be iterable, got {type(self.batches).__name__}") from None
        if it is self.batches:
            raise TypeError("FinetuneSpec: batches must be re-iterable (a list, not a one-shot iterator or generator)")


def finetune(model: nn.Module, spec: FinetuneSpec) -> list:
    """Run ``spec`` on ``model`` in place (Adam over every trainable parameter); returns the
    per-step losses (floats).  Every module's train flag is restored afterwards."""
    if not isinstance(spec, FinetuneSpec):
        raise TypeError(f"finetune: spec must be a q2ext.FinetuneSpec, got {type(spec).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameter")
    opt = torch.optim.Adam(params, lr=spec.lr)
    modes = {m: m.training for m in model.modules()}
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    losses = []
    try:
        with torch.enable_grad():
            batches = itertools.cycle(spec.batches)
            for _ in range(spec.steps):
                batch = next(batches, None)
                if batch is None:
                    raise ValueError("FinetuneSpec: batches is empty")
                loss = spec.loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError("FinetuneSpec: loss_fn must return a scalar tensor")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for m, t in modes.items():
            m.training = t
    return losses


def _run(model, calib_batches, arg="calib_batches"):
    n = 0
    with eval_no_grad(model):
        for batch in calib_batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
            n += 1
    if n == 0:
        raise ValueError(f"{arg} is empty")


def calibrate_gbfusion(model: nn.Module, calib_batches) -> list:
    """Freeze every GBFusion and estimate its LN constants (Eq. 11) on calibration data.

    calib_batches: an iterable of model inputs (a tensor or a tuple of positional args).
    Afterwards each GBFusion runs with ``use_constants=True``:
    ``(fuse(alpha_i x_i) - mean) / std`` -- the "unfolded with constants" model.
    Returns the [(name, GBFusion)] calibrated.
    """
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        raise ValueError("calibrate_gbfusion: the model has no GBFusion module (run insert_gbfusion first)")
    for _, m in nodes:
        m.freeze()
        m.use_constants = False
        m.start_calibration()
    _run(model, calib_batches)
    for _, m in nodes:
        m.finish_calibration()
        m.use_constants = True
    return nodes


class _ChannelStats:
    """Per-channel sums of h, y = LN(h), h^2 and h*y (fp64) over calibration pixels."""

    def __init__(self, m: GBFusion):
        self.m, self.sums = m, None

    def __call__(self, mod, args, out):
        branches = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        with torch.no_grad():
            h = fuse_branches(branches, self.m.alpha.to(branches[0].device), MODES[self.m.mode], torch.float64)
            y = out.double()
            dims = [d for d in range(h.dim()) if d != 1]
            s = torch.stack([h.sum(dims), y.sum(dims), (h * h).sum(dims), (h * y).sum(dims)])
            count = h.numel() // h.shape[1]
        self.sums = (s, count) if self.sums is None else (self.sums[0] + s, self.sums[1] + count)

    def affine(self):
        (sh, sy, shh, shy), n = self.sums[0], self.sums[1]
        mh, my = sh / n, sy / n
        var = shh / n - mh * mh
        cov = shy / n - mh * my
        fallback = 1.0 / self.m.const_std.double().to(var.device)
        a = torch.where(var > 1e-12 * (shh / n).clamp_min(1e-300), cov / var.clamp_min(1e-300), fallback)
        return a, my - a * mh


def _calibrate_per_channel(model, calib_batches):
    """Scalar and per-channel constants in one pass; {node name: (A [C], B [C])} fp64."""
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        raise ValueError("fold_gbfusion: the model has no GBFusion module (run insert_gbfusion first)")
    stats, hooks = {}, []
    for name, m in nodes:
        m.freeze()
        m.use_constants = False
        m.start_calibration()
        stats[name] = _ChannelStats(m)
        hooks.append(m.register_forward_hook(stats[name]))
    try:
        _run(model, calib_batches)
    finally:
        for h in hooks:
            h.remove()
    for _, m in nodes:
        m.finish_calibration()
        m.use_constants = True
    return {name: st.affine() for name, st in stats.items()}


def _affine_of(m: GBFusion, channels, per_channel=None):
    """(branch_weights [K], per-channel scale [C], shift [C]) of the calibrated node, fp64."""
    alpha = m.alpha.double()
    if per_channel is not None:
        a, b = per_channel
        return alpha, a.to(alpha.device), b.to(alpha.device)
    mu, sigma = m.const_mean.double(), m.const_std.double()
    c = sum(channels) if m.mode == "concat" else channels[0]
    w = m.weight.detach().double() if m.weight is not None else torch.ones(c, dtype=torch.float64,
                                                                           device=alpha.device)
    b = m.bias.detach().double() if m.bias is not None else torch.zeros_like(w)
    return alpha, w / sigma, b - w * mu / sigma


def _conv_consumers(gm, target):
    """The float Conv2d modules (path, module) that read the node's output, through Identity;
    or None when anything else (a quantized conv included) reads it."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    if len(calls) != 1:
        return None
    out, frontier = [], list(calls[0].users)
    while frontier:
        u = frontier.pop()
        if u.op != "call_module":
            return None
        mod = gm.get_submodule(u.target)
        if isinstance(mod, nn.Identity):
            frontier.extend(u.users)
        elif (isinstance(mod, nn.Conv2d) and not isinstance(mod, QUANT_LAYERS) and mod.groups == 1
              and len(u.args) == 1 and not u.kwargs):
            out.append((u.target, mod))
        else:
            return None
    return out or None


@torch.no_grad()
def _fold_into_conv(conv, scale, shift, fold_shift):
    w = conv.weight.double()
    if fold_shift == "bias":
        delta = (w.sum((2, 3)) * shift.to(w.device).reshape(1, -1)).sum(1)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=w.device))
        conv.bias.copy_((conv.bias.double() + delta).to(conv.bias.dtype))
    conv.weight.copy_((w * scale.to(w.device).reshape(1, -1, 1, 1)).to(conv.weight.dtype))


def fold_gbfusion(model: nn.Module, calib_batches=None, fold_shift: str = "bias", *, mode: str = "scalar",
                  finetune: FinetuneSpec | None = None) -> list:
    """Deploy form of every GBFusion (App. 7.1): freeze alpha, LN -> calibrated constants,
    fold alpha and the constants into the following float conv(s) (Eq. 12), optionally
    fine-tune.

    Args:
        model: a model with GBFusion modules (e.g. after insert_gbfusion); modified in place.
        calib_batches: iterable of model inputs (tensors or tuples of positional args)
            to calibrate on; None reuses the constants of an earlier
            :func:`calibrate_gbfusion` (scalar mode only).
        fold_shift: "bias" (Eq. 12: b' = b + W shift; exact for unpadded convs) or "keep"
            (the per-channel shift stays in the FixedFusion: exact everywhere).
        mode: "scalar" (Eq. 11) or "per_channel" (A_c, B_c per channel; needs
            calib_batches).  See the module docstring.
        finetune: a :class:`FinetuneSpec` run after the fold, or None.
    Where the output feeds anything but float convs (a quantized conv, FPN's top-down
    path), one constant per-channel affine (FixedFusion) replaces the node.  Returns one
    dict per node: name, mode, mean, std, folded_into (conv paths or []), exact; with a
    fine-tune also ``finetune_losses`` (every step's loss) on each row.
    """
    if fold_shift not in ("bias", "keep"):
        raise ValueError(f"fold_gbfusion: fold_shift must be 'bias' or 'keep', got {fold_shift!r}")
    if mode not in FOLD_MODES:
        raise ValueError(f"fold_gbfusion: mode must be one of {FOLD_MODES}, got {mode!r}")
    if finetune is not None and not isinstance(finetune, FinetuneSpec):
        raise TypeError(f"fold_gbfusion: finetune must be a q2ext.FinetuneSpec or None, got {type(finetune).__name__}")
    per_channel = {}
    if mode == "per_channel":
        if calib_batches is None:
            raise ValueError("fold_gbfusion: mode='per_channel' needs calib_batches (model inputs to calibrate on)")
        per_channel = _calibrate_per_channel(model, calib_batches)
    elif calib_batches is not None:
        calibrate_gbfusion(model, calib_batches)
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes or any(m.const_mean is None for _, m in nodes):
        raise ValueError("fold_gbfusion: every GBFusion must be calibrated (pass calib_batches)")
    rows = []
    for name, m in nodes:
        if m.branch_channels is None:
            raise ValueError(f"fold_gbfusion: {name} saw no calibration forward")
        alpha, scale, shift = _affine_of(m, m.branch_channels, per_channel.get(name))
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        convs = _conv_consumers(parent, attr) if isinstance(parent, fx.GraphModule) else None
        foldable = bool(convs) and all(conv.in_channels == scale.numel() for _, conv in convs)
        # concat: alpha of each branch goes into its input channels; add: the branches
        # share channels, so alpha stays behind as the branch weights
        full = scale * torch.repeat_interleave(alpha, torch.tensor(m.branch_channels, device=alpha.device)) \
            if m.mode == "concat" else scale
        # "keep" leaves shift / scale in front of the scaled conv: needs every scale != 0
        if foldable and (fold_shift == "bias" or bool((full != 0).all())):
            weights = torch.ones_like(alpha) if m.mode == "concat" else alpha
            for _, conv in convs:
                _fold_into_conv(conv, full, shift, fold_shift)
            new = FixedFusion(m.mode, weights, None, shift / full if fold_shift == "keep" else None,
                              m.calib_dtype)
            exact = fold_shift == "keep" or all(p == 0 for _, conv in convs for p in _padding(conv))
            rows.append({"name": name, "folded_into": [f"{parent_path}.{p}" if parent_path else p for p, _ in convs],
                         "exact": exact})
        else:
            new = FixedFusion(m.mode, alpha, scale, shift, m.calib_dtype)
            rows.append({"name": name, "folded_into": [], "exact": True})
        rows[-1].update(mode=mode, mean=float(m.const_mean), std=float(m.const_std))
        setattr(parent, attr, new.to(m.lam.device).train(m.training))
    if finetune is not None:
        losses = _finetune(model, finetune)
        for r in rows:
            r["finetune_losses"] = losses
    return rows


_finetune = finetune  # fold_gbfusion's `finetune` argument shadows the function inside it


def _padding(conv):
    p = conv.padding
    return (1,) if isinstance(p, str) and p != "valid" else ((0,) if isinstance(p, str) else tuple(p))
