"""The Q-GBFusion deployment passes (the Q² paper, Eq. 11-12 and App. 7): calibrate the
per-pixel LayerNorm of every fusion node to constants, then fold alpha and the constants
into the convolutions that follow."""
from __future__ import annotations

import torch
from torch import fx, nn

from ..nn.gb_fusion import FixedFusion, GBFusion
from ._surgery import eval_no_grad


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
    with eval_no_grad(model):
        for batch in calib_batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    for _, m in nodes:
        m.finish_calibration()
        m.use_constants = True
    return nodes


def _affine_of(m: GBFusion, channels):
    """(branch_weights [K], per-channel scale [C], shift [C]) of the calibrated node, fp64."""
    alpha = m.alpha.double()
    mu, sigma = m.const_mean.double(), m.const_std.double()
    c = sum(channels) if m.mode == "concat" else channels[0]
    w = m.weight.detach().double() if m.weight is not None else torch.ones(c, dtype=torch.float64,
                                                                           device=alpha.device)
    b = m.bias.detach().double() if m.bias is not None else torch.zeros_like(w)
    return alpha, w / sigma, b - w * mu / sigma


def _conv_consumers(gm, target):
    """The Conv2d modules (path, module) that read the node's output, through Identity; or None."""
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
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1 and len(u.args) == 1 and not u.kwargs:
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


def fold_gbfusion(model: nn.Module, calib_batches=None, fold_shift: str = "bias") -> list:
    """Deploy form of every GBFusion (App. 7): freeze alpha, LN -> calibrated constants,
    and fold alpha, 1/sigma and -mu/sigma into the following conv(s) (Eq. 12).

    Args:
        model: a model with GBFusion modules (e.g. after insert_gbfusion).
        calib_batches: iterable of model inputs for calibrate_gbfusion; None when the model
            was calibrated already.
        fold_shift: "bias" (Eq. 12: b' = b + W (shift); exact for unpadded convs, the zero
            padding of a padded conv then sees the un-shifted zero at the borders) or "keep"
            (the per-channel shift stays in the FixedFusion: exact everywhere).
    Where the output feeds anything but convs (e.g. FPN's top-down path), one constant
    per-channel affine (FixedFusion) replaces the node.  Returns one dict per node:
    name, mean, std, folded_into (conv paths or []), exact.
    """
    if fold_shift not in ("bias", "keep"):
        raise ValueError(f"fold_shift must be 'bias' or 'keep', got {fold_shift!r}")
    if calib_batches is not None:
        calibrate_gbfusion(model, calib_batches)
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes or any(m.const_mean is None for _, m in nodes):
        raise ValueError("fold_gbfusion: every GBFusion must be calibrated (pass calib_batches)")
    rows = []
    for name, m in nodes:
        if m.branch_channels is None:
            raise ValueError(f"fold_gbfusion: {name} saw no calibration forward")
        alpha, scale, shift = _affine_of(m, m.branch_channels)
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
        rows[-1].update(mean=float(m.const_mean), std=float(m.const_std))
        setattr(parent, attr, new.to(m.lam.device))
    return rows


def _padding(conv):
    p = conv.padding
    return (1,) if isinstance(p, str) and p != "valid" else ((0,) if isinstance(p, str) else tuple(p))
