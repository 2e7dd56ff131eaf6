"""Q-ADA microbenchmark: the fused ``q2ext::ada_loss`` vs the composite.

The composite is q2ext/reference/ada_loss.py (plain PyTorch ops, autograd backward): what a
project writes without q2ext.  Both run forward + backward to the student feature
(``torch.autograd.grad``), with the student's quantized value, the teacher, the teacher's
quantized value and a per-channel step given, in the same process, median of repeated
runs after warm-up.

Peak extra memory: every CPU allocation and free made by the c10 allocator during one
forward + backward, read from the PyTorch profiler's raw memory events
(``profile_memory=True``, ``kineto_results.events()`` named ``[memory]``), ordered by
time; the peak of the running sum is the extra memory over what existed before the call
(the inputs).  It counts everything a tensor holds: saved activations, temporaries, the
op's outputs (teacher distribution, row statistics), the returned gradient and the
kernel's per-task scratch (allocated as tensors for this reason); it does not count
Python objects or the few bytes of non-tensor C++ state.  The same code measures both
sides.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity

from .._ops.ada_loss import DIV_JS, DIV_KL, NORM_SIGMOID, NORM_SOFTMAX
from ..reference import ada_loss as ada_reference
from .common import machine_info, median_seconds, print_table, quiet_profile

# (name, shape [N, C, H, W], dtype, divergence, normalize): YOLOv5s-like neck features.
FULL_CASES = [
    ("P3 4x128x80x80", (4, 128, 80, 80), torch.float32, "js", "sigmoid"),
    ("P4 4x256x40x40", (4, 256, 40, 40), torch.float32, "js", "sigmoid"),
    ("P5 4x512x20x20", (4, 512, 20, 20), torch.float32, "js", "sigmoid"),
    ("P4 4x256x40x40", (4, 256, 40, 40), torch.float32, "kl", "sigmoid"),
    ("P4 4x256x40x40", (4, 256, 40, 40), torch.float32, "js", "softmax"),
    ("P4 4x256x40x40", (4, 256, 40, 40), torch.bfloat16, "js", "sigmoid"),
]
QUICK_CASES = [
    ("2x64x40x40", (2, 64, 40, 40), torch.float32, "js", "sigmoid"),
    ("2x64x40x40", (2, 64, 40, 40), torch.float32, "kl", "softmax"),
]
_CODES = {"js": DIV_JS, "kl": DIV_KL, "sigmoid": NORM_SIGMOID, "softmax": NORM_SOFTMAX}


def _inputs(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    t = 0.8 * x + 0.5 * torch.randn(shape, generator=g)
    step = 0.1 + 0.2 * torch.rand(shape[1], generator=g)
    s4 = step.reshape(1, -1, 1, 1)
    xq, tq = torch.round(x / s4) * s4, torch.round(t / s4) * s4
    return [v.to(device) for v in (x.to(dtype), t.to(dtype), xq.to(dtype), tq.to(dtype), step)]


def _fwd_bwd(loss_fn, x, t, xq, tq, step, args):
    def run():
        xr = x.detach().requires_grad_()
        loss = loss_fn(xr, t, xq, tq, step, *args)[0]
        (dx,) = torch.autograd.grad(loss, xr)
        return dx
    return run


def peak_extra_bytes(fn) -> int:
    """Peak of (bytes allocated - bytes freed) on the CPU during fn(), see the module doc."""
    # quiet_profile: without libkineto's start/stop lines on stderr
    with quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def run(quick: bool = False, device: str = "cpu", min_run_time: float | None = None):
    """Run the benchmark; returns (markdown table, list of result dicts)."""
    cases = QUICK_CASES if quick else FULL_CASES
    mrt = min_run_time if min_run_time is not None else (0.2 if quick else 1.0)
    cuda = device == "cuda"
    print(machine_info(), flush=True)
    rows, records = [], []
    for name, shape, dtype, div, norm in cases:
        x, t, xq, tq, step = _inputs(shape, dtype, device)
        args = (1.0, 1e-6, _CODES[div], _CODES[norm], 1.0)
        comp = _fwd_bwd(ada_reference.ada_loss, x, t, xq, tq, step, args)
        fused = _fwd_bwd(torch.ops.q2ext.ada_loss, x, t, xq, tq, step, args)
        t_comp = median_seconds(comp, mrt, sync_cuda=cuda)
        t_fused = median_seconds(fused, mrt, sync_cuda=cuda)
        in_bytes = x.numel() * x.element_size()
        if cuda:
            mems = []
            for fn in (comp, fused):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                mems.append(torch.cuda.max_memory_allocated() - base)
            m_comp, m_fused = mems
        else:
            m_comp, m_fused = peak_extra_bytes(comp), peak_extra_bytes(fused)
        # Bytes the fused pair must move at least: read x, xq, t, tq; write P; backward
        # reads x, xq, P and writes dx.
        ct = 8 if dtype == torch.float64 else 4
        moved = x.numel() * (6 * x.element_size() + 2 * ct + x.element_size())
        label = f"{name} {str(dtype).replace('torch.', '')} {div}/{norm}"
        rows.append([label, f"{t_comp * 1e3:.1f}", f"{t_fused * 1e3:.1f}", f"{t_comp / t_fused:.2f}x",
                     f"{moved / t_fused / 1e9:.1f}", f"{m_comp / 2**20:.1f} ({m_comp / in_bytes:.1f}x)",
                     f"{m_fused / 2**20:.1f} ({m_fused / in_bytes:.1f}x)", f"{m_fused / m_comp:.3f}"])
        records.append(dict(case=label, composite_ms=t_comp * 1e3, q2ext_ms=t_fused * 1e3,
                            speedup=t_comp / t_fused, composite_peak_bytes=m_comp, q2ext_peak_bytes=m_fused,
                            memory_ratio=m_fused / m_comp))
    table = print_table(rows, ["case (fwd+bwd)", "composite ms", "q2ext ms", "speedup", "q2ext GB/s",
                               "composite peak extra MiB (x input)", "q2ext peak extra MiB (x input)",
                               "memory ratio"])
    return table, records
