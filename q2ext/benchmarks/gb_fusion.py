"""Q-GBFusion benchmark: fused GBFusion forward+backward (+ the in-kernel norms and
the controller update) vs the composite PyTorch version a user would write, eager and
torch.compile, at FPN / U-Net / PAN fusion shapes, all measured in one run.

Composite = softmax(lam) -> alpha_i * x_i -> cat/add -> LayerNorm over channels
(permute, F.layer_norm, permute back) with a tensor hook per branch computing
||grad||^2, then the EMA/lam update as tensor ops (no host sync either).  "compiled"
runs the scale/fuse/LN part under torch.compile (the hooks and the update stay eager:
they are what the user's training loop does around the compiled region).

Timing: q2ext and the baselines are measured in interleaved rounds (q2ext, eager,
compiled, q2ext, ...), each round a median over its share of min_run_time; the table
gives the median over rounds, so a slow spell of the shared machine hits every path.

Bytes counted per step: forward reads the branches and writes the output; backward
reads the branches and the output gradient and writes the branch gradients.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .._ops.gb_fusion import softmax_alpha
from ..nn.gb_fusion import GBFusion
from .common import interleaved_medians, machine_info, print_table

FULL_CASES = [
    # (name, mode, branch shapes, dtype, channels_last)
    ("FPN P3 add", "add", [(2, 256, 64, 64)] * 2, torch.float32, False),
    ("FPN P4 add", "add", [(2, 256, 32, 32)] * 2, torch.float32, False),
    ("U-Net skip concat", "concat", [(2, 128, 64, 64), (2, 64, 64, 64)], torch.float32, False),
    ("U-Net skip concat", "concat", [(2, 128, 64, 64), (2, 64, 64, 64)], torch.bfloat16, False),
    ("PAN concat NHWC", "concat", [(2, 128, 40, 40), (2, 128, 40, 40)], torch.float32, True),
]
QUICK_CASES = [FULL_CASES[1], FULL_CASES[2]]


class Composite:
    """The unfused Q-GBFusion: PyTorch ops, hooks for the norms, tensor-op controller."""

    def __init__(self, k, mode, device, compiled=False, beta=0.1, eta=0.05, eps=1e-6):
        self.lam = torch.zeros(k, device=device)
        self.g_ema = torch.zeros(k, device=device)
        self.g_sq = torch.zeros(k, device=device)
        self.mode, self.beta, self.eta, self.eps = mode, beta, eta, eps
        self.fuse = torch.compile(self._fuse) if compiled else self._fuse

    def _fuse(self, xs, alpha):
        scaled = [x * alpha[i].to(x.dtype) for i, x in enumerate(xs)]
        h = torch.cat(scaled, 1) if self.mode == "concat" else sum(scaled[1:], scaled[0])
        y = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), eps=self.eps)
        return y.permute(0, 3, 1, 2)

    def _hook(self, i):
        def hook(g):  # returns None: the gradient itself is left alone
            self.g_sq[i].copy_(g.float().square().sum())
        return hook

    def __call__(self, xs):
        for i, x in enumerate(xs):
            x.register_hook(self._hook(i))
        return self.fuse(xs, softmax_alpha(self.lam))

    def update(self):
        g = self.g_sq.sqrt()
        self.g_ema.copy_(torch.where(self.g_ema > 0, (1 - self.beta) * self.g_ema + self.beta * g, g))
        logs = torch.log(self.g_ema + 1e-6)
        self.lam.sub_(self.eta * (logs - logs.mean())).clamp_(-4.0, 4.0)


def _inputs(shapes, dtype, device, channels_last):
    torch.manual_seed(0)
    xs = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return [x.contiguous(memory_format=torch.channels_last) for x in xs] if channels_last else xs


def _step(fn, xs, dy, after=None):
    def run():
        leaves = [x.detach().requires_grad_() for x in xs]
        out = fn(leaves)
        torch.autograd.grad(out, leaves, dy)
        if after is not None:
            after()
    return run


def run(quick: bool = False, device: str = "cpu", min_run_time: float | None = None, compiled: bool = True):
    """Run the benchmark; returns (markdown table, list of result dicts)."""
    cases = QUICK_CASES if quick else FULL_CASES
    mrt = min_run_time if min_run_time is not None else (0.5 if quick else 2.0)
    cuda = device == "cuda"
    print(machine_info(), flush=True)
    rows, records = [], []
    for name, mode, shapes, dtype, cl in cases:
        xs = _inputs(shapes, dtype, device, cl)
        k = len(shapes)
        fused = GBFusion(k, mode=mode).to(device).train()
        out = fused(xs)
        dy = torch.randn_like(out)
        steps = {"q2ext": _step(fused, xs, dy)}
        nbytes = 2 * sum(x.numel() * x.element_size() for x in xs) + 2 * out.numel() * out.element_size()
        nbytes += sum(x.numel() * x.element_size() for x in xs)  # branch gradients written
        comp = Composite(k, mode, device)
        steps["composite eager"] = _step(comp, xs, dy, comp.update)
        if compiled:
            compc = Composite(k, mode, device, compiled=True)
            t0 = time.perf_counter()
            _step(compc, xs, dy, compc.update)()
            cs = time.perf_counter() - t0
            steps[f"composite compiled (compile {cs:.0f}s)"] = _step(compc, xs, dy, compc.update)
        med = dict(zip(steps, interleaved_medians(steps.values(), mrt, sync_cuda=cuda)))
        t_q2 = med.pop("q2ext")
        baselines = list(med.items())
        layout = "NHWC" if cl else "NCHW"
        shape_s = " + ".join("x".join(map(str, s)) for s in shapes) if mode == "concat" else \
            f"{k} x " + "x".join(map(str, shapes[0]))
        for bname, tb in baselines:
            rows.append([f"{name} {shape_s}", str(dtype).replace("torch.", ""), layout, bname, f"{tb * 1e3:.2f}",
                         f"{t_q2 * 1e3:.2f}", f"{tb / t_q2:.2f}x", f"{nbytes / t_q2 / 1e9:.1f}"])
            records.append(dict(case=name, shapes=shapes, dtype=str(dtype), layout=layout, baseline=bname,
                                baseline_ms=tb * 1e3, q2ext_ms=t_q2 * 1e3, speedup=tb / t_q2,
                                q2ext_gbs=nbytes / t_q2 / 1e9))
    table = print_table(rows, ["case", "dtype", "layout", "baseline", "baseline ms", "q2ext ms", "speedup",
                               "q2ext GB/s"])
    return table, records
