"""Q-GBFusion: a fusion node with closed-loop gradient balancing (Q² paper, Sec. 3.2).

The module replaces a neck/decoder fusion (``torch.cat(branches, 1)`` or ``a + b``) by
``LayerNorm_channels(fuse(alpha_i * x_i))`` with ``alpha = softmax(lam)``; every training
backward measures each branch's gradient energy ``G_i = ||dL/dx_i||_2`` inside the kernel
and moves ``lam`` by the feedback law (Eq. 8-10) on the device, no host sync.  Formulas:
q2ext/reference/gb_fusion.py; ops: q2ext/_ops/gb_fusion.py.

DDP: with ``sync_ddp=True`` (default) and an initialised process group of more than one
rank, each backward all-reduces the K squared norms (mean over ranks) before the update,
so every rank applies the same law to the same numbers and lam stays identical (DDP's
buffer broadcast from rank 0 then changes nothing).  The collective is a functional
all_reduce, so it also traces under torch.compile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._ops import compute_dtype
from .._ops.gb_fusion import MODES, fuse_branches, softmax_alpha
from ..ops._gb_fusion import gb_fusion

_CONTROLLER_BUFFERS = ("lam", "g_ema", "tau")


class GBFusion(nn.Module):
    """Gradient-balanced fusion of K feature maps (N, C_i, H, W) -> (N, C, H, W).

    Args:
        num_branches: K >= 2 (at most 16).
        mode: "concat" (channel concat, C = sum C_i) or "add" (equal C_i, C = C_i).
        beta: EMA factor of the gradient energies (Eq. 8).  eta: controller gain (Eq. 10).
        tau: target log-energy offsets, K floats (default 0: uniform balance).
        eps: LayerNorm epsilon.  affine: learnable per-channel LN weight/bias (needs
            ``num_channels``; off in the paper).  lam_clip: lam is kept in [-lam_clip, lam_clip].
        ctrl_eps: epsilon inside log(G + eps) of the controller.
        sync_ddp: all-reduce the energies over ranks when torch.distributed is initialised.

    Buffers (fp32 [K], also after ``.half()``/``.double()``): ``lam``, ``g_ema`` (G-bar),
    ``tau``; after calibration (``q2ext.fold_gbfusion``) scalar ``const_mean``/``const_std``.
    Inputs: K tensors of one float dtype (fp32/fp16/bf16/fp64), NCHW or channels_last,
    passed as ``m(x1, x2, ...)`` or ``m([x1, x2, ...])``.  Output: their dtype, laid out
    like the first branch.  Without ``affine``, fp32/fp64 training saves the output for the
    backward (it is the normalised y, so the backward reads one tensor instead of K): as
    with ``torch.sigmoid``, changing the output in place before the backward (e.g. an
    in-place ReLU right after the node) makes autograd's backward raise its "modified by
    an inplace operation" error; use the out-of-place form there.
    """

    def __init__(self, num_branches: int, mode: str = "concat", beta: float = 0.1, eta: float = 0.05,
                 tau=None, eps: float = 1e-6, affine: bool = False, lam_clip: float = 4.0,
                 num_channels: int | None = None, ctrl_eps: float = 1e-6, sync_ddp: bool = True):
        super().__init__()
        if num_branches < 2:
            raise ValueError(f"num_branches must be >= 2, got {num_branches}")
        if mode not in ("concat", "add"):
            raise ValueError(f"mode must be 'concat' or 'add', got {mode!r}")
        if affine and num_channels is None:
            raise ValueError("affine=True needs num_channels (the fused channel count)")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {beta}")
        if lam_clip <= 0:
            raise ValueError(f"lam_clip must be > 0, got {lam_clip}")
        self.num_branches, self.mode = num_branches, mode
        self.beta, self.eta, self.eps, self.lam_clip, self.ctrl_eps = beta, eta, eps, lam_clip, ctrl_eps
        self.sync_ddp = sync_ddp
        self.frozen = False
        self.use_constants = False
        self._calib = None
        self.branch_channels = None  # (C_1, ..., C_K), recorded by calibration forwards
        self.calib_dtype = torch.float32  # compute dtype seen in calibration (FixedFusion's)
        self.register_buffer("lam", torch.zeros(num_branches))
        self.register_buffer("g_ema", torch.zeros(num_branches))
        if tau is not None:
            tau = torch.as_tensor(tau, dtype=torch.float32).reshape(-1)
            if tau.numel() != num_branches:
                raise ValueError(f"tau must have {num_branches} values, got {tau.numel()}")
        self.register_buffer("tau", tau)
        self.register_buffer("const_mean", None)
        self.register_buffer("const_std", None)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ state
    @property
    def alpha(self) -> torch.Tensor:
        """softmax(lam), fp32 [K] (detached)."""
        return softmax_alpha(self.lam)

    @property
    def balance_ratio(self) -> torch.Tensor:
        """max(G-bar) / min(G-bar) as a 0-dim fp32 tensor (inf before any update)."""
        g = self.g_ema.detach()
        return g.max() / g.min()

    def freeze(self) -> "GBFusion":
        """Stop the controller: lam and G-bar stay as they are."""
        self.frozen = True
        return self

    def unfreeze(self) -> "GBFusion":
        self.frozen = False
        return self

    def _apply(self, fn, recurse=True):
        # The controller state stays fp32 under .half()/.bfloat16()/.double(), like
        # BatchNorm's num_batches_tracked keeps its dtype: the law runs in fp32 and
        # lam must not lose resolution.  Device moves still apply.
        super()._apply(fn, recurse)
        for name in _CONTROLLER_BUFFERS:
            t = getattr(self, name)
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        return self

    def extra_repr(self) -> str:
        s = f"{self.num_branches}, mode={self.mode!r}, beta={self.beta}, eta={self.eta}, lam_clip={self.lam_clip}"
        return s + (", affine" if self.weight is not None else "") + (", frozen" if self.frozen else "")

    # ------------------------------------------------------------------ calibration (Eq. 11)
    def start_calibration(self) -> None:
        """Accumulate the per-pixel LN statistics of following forwards (see fold_gbfusion)."""
        dev = self.lam.device
        self._calib = [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3)]

    def finish_calibration(self) -> None:
        """Set const_mean = E[mu_h], const_std = E[sqrt(var_h + eps)] over the calibration pixels."""
        if self._calib is None or self._calib[2].item() == 0:
            raise RuntimeError("GBFusion.finish_calibration: no calibration forward ran since start_calibration()")
        s_mean, s_std, count = self._calib
        self.const_mean = (s_mean / count).float()
        self.const_std = (s_std / count).float()
        self._calib = None

    def _fuse_scaled(self, branches, alpha):
        return fuse_branches(branches, alpha, MODES[self.mode], compute_dtype(branches[0].dtype))

    def constant_forward(self, branches) -> torch.Tensor:
        """LN replaced by the calibrated constants: (fuse(alpha_i x_i) - mu) / sigma (* w + b)."""
        h = self._fuse_scaled(branches, self.alpha)
        h = (h - self.const_mean.to(h.dtype)) / self.const_std.to(h.dtype)
        if self.weight is not None:
            h = h * self.weight.to(h.dtype).reshape(1, -1, 1, 1) + self.bias.to(h.dtype).reshape(1, -1, 1, 1)
        return h.to(branches[0].dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, *xs) -> torch.Tensor:
        branches = list(xs[0]) if len(xs) == 1 and isinstance(xs[0], (list, tuple)) else list(xs)
        if len(branches) != self.num_branches:
            raise ValueError(f"GBFusion expects {self.num_branches} branches, got {len(branches)}")
        dtype = branches[0].dtype
        for b in branches[1:]:
            dtype = torch.promote_types(dtype, b.dtype)
        branches = [b.to(dtype) for b in branches]  # autocast may hand over mixed dtypes
        if self.use_constants:
            return self.constant_forward(branches)
        ct = compute_dtype(dtype)
        weight = self.weight.to(ct) if self.weight is not None else None
        bias = self.bias.to(ct) if self.bias is not None else None
        sync = False
        if self.sync_ddp and torch.distributed.is_available() and torch.distributed.is_initialized():
            sync = torch.distributed.get_world_size() > 1
        out, mean, rstd, _ = gb_fusion(
            branches, self.lam, self.g_ema, self.tau, weight, bias, self.mode, self.eps, self.beta, self.eta,
            self.ctrl_eps, self.lam_clip, update=self.training and not self.frozen, sync=sync, return_stats=True)
        if self._calib is not None:
            self.branch_channels = tuple(b.shape[1] for b in branches)
            self.calib_dtype = ct
            with torch.no_grad():
                self._calib[0] += mean.to(torch.float64).sum()
                self._calib[1] += rstd.to(torch.float64).reciprocal().sum()
                self._calib[2] += mean.numel()
        return out


class FixedFusion(nn.Module):
    """A frozen fusion node: ``fuse(w_i * x_i) * scale_c + shift_c`` with constant buffers.

    branch_weights: [K]; scale, shift: [C] or None (identity); stored in ``dtype`` (the
    compute dtype the node was calibrated in).  What is left of a GBFusion after
    fold_gbfusion: a plain cat/add when everything went into the next conv, else one
    constant per-channel affine.
    """

    def __init__(self, mode, branch_weights, scale=None, shift=None, dtype=torch.float32):
        super().__init__()
        self.mode = mode
        self.register_buffer("branch_weights", branch_weights.detach().to(dtype).clone())
        self.register_buffer("scale", None if scale is None else scale.detach().to(dtype).clone())
        self.register_buffer("shift", None if shift is None else shift.detach().to(dtype).clone())

    def forward(self, *xs):
        xs = list(xs[0]) if len(xs) == 1 and isinstance(xs[0], (list, tuple)) else list(xs)
        w = self.branch_weights.to(xs[0].dtype)
        scaled = [x * w[i] for i, x in enumerate(xs)]  # exact for the weights 1 of a folded concat
        h = torch.cat(scaled, 1) if self.mode == "concat" else sum(scaled[1:], scaled[0])
        if self.scale is not None:
            h = h * self.scale.to(h.dtype).reshape(1, -1, 1, 1)
        if self.shift is not None:
            h = h + self.shift.to(h.dtype).reshape(1, -1, 1, 1)
        return h

    def extra_repr(self):
        return f"mode={self.mode!r}, K={self.branch_weights.numel()}, affine={self.scale is not None}"


# ---------------------------------------------------------------------------- diagnostics
@dataclass
class EnergyReport:
    """Per fusion node: each branch's G-bar, alpha, lam and the balance ratio (Fig. 1(b)/3(b))."""
    rows: list

    def data(self) -> dict:
        """{node name: {"g_ema": [...], "alpha": [...], "lam": [...], "balance_ratio": float}} for plotting."""
        return {r["name"]: {k: r[k] for k in ("g_ema", "alpha", "lam", "balance_ratio")} for r in self.rows}

    def table(self) -> str:
        head = "| node | mode | branch | G-bar | alpha | lam | balance ratio |\n|---|---|---|---|---|---|---|"
        lines = [head]
        for r in self.rows:
            for i, (g, a, lam) in enumerate(zip(r["g_ema"], r["alpha"], r["lam"])):
                ratio = f"{r['balance_ratio']:.3f}" if i == 0 else ""
                lines.append(f"| {r['name'] if i == 0 else ''} | {r['mode'] if i == 0 else ''} | {i} | {g:.4g} | "
                             f"{a:.4f} | {lam:+.4f} | {ratio} |")
        return "\n".join(lines)

    __str__ = table


def gradient_energy_report(model: nn.Module) -> EnergyReport:
    """Snapshot of every GBFusion's controller (one host sync for the whole model)."""
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        return EnergyReport([])
    flat = torch.cat([torch.cat([m.g_ema, m.alpha.to(m.g_ema.device), m.lam]) for _, m in nodes]).cpu().tolist()
    rows, at = [], 0
    for name, m in nodes:
        k = m.num_branches
        g, alpha, lam = flat[at:at + k], flat[at + k:at + 2 * k], flat[at + 2 * k:at + 3 * k]
        at += 3 * k
        rows.append({"name": name or "<root>", "mode": m.mode, "g_ema": g, "alpha": alpha, "lam": lam,
                     "balance_ratio": max(g) / min(g) if min(g) > 0 else math.inf, "frozen": m.frozen})
    return EnergyReport(rows)
