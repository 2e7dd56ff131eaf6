"""Fake-quant microbenchmark: q2ext LSQ vs ATen's ops, the naive LSQ composition (eager
and torch.compile) and x.clone() as the memory-bandwidth limit, all in one run.

Bytes counted per element: forward reads x and writes y (2 x itemsize); forward+backward
adds reading x and dy and writing dx (5 x itemsize in all).  clone moves 2 x itemsize.
"""
from __future__ import annotations

import time

import torch

from .. import ops
from .common import machine_info, median_seconds, print_table

BITS = 4
QN, QP = 2 ** (BITS - 1), 2 ** (BITS - 1) - 1

FULL_CASES = [
    # (name, shape, axis or None, dtypes)
    ("act 16M", (16, 64, 128, 128), None, (torch.float32, torch.bfloat16)),
    ("act 16M", (16, 64, 128, 128), 1, (torch.float32,)),
    ("w 64x64x3x3", (64, 64, 3, 3), 0, (torch.float32,)),
    ("w 64x64x3x3", (64, 64, 3, 3), None, (torch.float32,)),
    ("w 256x256x3x3", (256, 256, 3, 3), 0, (torch.float32,)),
    ("w 512x512x3x3", (512, 512, 3, 3), 0, (torch.float32, torch.bfloat16)),
    ("w 512x512x3x3", (512, 512, 3, 3), None, (torch.float32,)),
    ("w 2048x512x1x1", (2048, 512, 1, 1), 0, (torch.float32,)),
]
QUICK_CASES = [
    ("act 4M", (4, 64, 128, 128), None, (torch.float32, torch.bfloat16)),
    ("w 256x256x3x3", (256, 256, 3, 3), 0, (torch.float32,)),
]
COMPILED_NAIVE = {("act 16M", None, torch.float32), ("w 512x512x3x3", 0, torch.float32)}


def naive_lsq(x, s, g, axis):
    """The LSQ code most projects carry (grad-scale trick, clamp, round with STE)."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, -QN, QP)
    v = (v.round() - v).detach() + v
    return v * s


def _inputs(shape, axis, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device).to(dtype)
    n = 1 if axis is None else shape[axis]
    s = torch.full((n,), 2 * 0.8 / QP ** 0.5, device=device)
    return x, s


def _fwd_bwd(fn, x, s, dy):
    def run():
        xr = x.detach().requires_grad_()
        sr = s.detach().requires_grad_()
        y = fn(xr, sr)
        torch.autograd.grad(y, (xr, sr), dy)
    return run


def _aten_fns(axis, g):
    zp_int = None

    def fwd(x, s):
        nonlocal zp_int
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, s, torch.zeros(1, dtype=torch.int32, device=x.device),
                                                         -QN, QP)
        if zp_int is None or zp_int.numel() != s.numel():
            zp_int = torch.zeros(s.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, s, zp_int, axis, -QN, QP)

    def learnable(x, s):
        zp = torch.zeros_like(s)
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, s, zp, -QN, QP, g)
        return torch._fake_quantize_learnable_per_channel_affine(x, s, zp, axis, -QN, QP, g)

    return fwd, learnable


def _time(fn, min_run_time, cuda):
    try:
        return median_seconds(fn, min_run_time, sync_cuda=cuda)
    except (RuntimeError, NotImplementedError) as exc:  # e.g. ATen without a bf16 kernel
        return exc


def run(quick: bool = False, device: str = "cpu", min_run_time: float | None = None):
    """Run the benchmark; returns (markdown table, list of result dicts)."""
    cases = QUICK_CASES if quick else FULL_CASES
    mrt = min_run_time if min_run_time is not None else (0.2 if quick else 0.6)
    cuda = device == "cuda"
    print(machine_info(), flush=True)
    rows, records = [], []
    for name, shape, axis, dtypes in cases:
        for dtype in dtypes:
            x, s = _inputs(shape, axis, dtype, device)
            numel, item = x.numel(), x.element_size()
            g = 1.0 / (numel / s.numel() * QP) ** 0.5
            dy = torch.randn_like(x)
            gran = "per-tensor" if axis is None else f"per-channel(axis={axis})"
            label = f"{name} {gran} {str(dtype).replace('torch.', '')}"
            t_clone = _time(lambda: x.clone(), mrt, cuda)
            clone_gbs = 2 * numel * item / t_clone / 1e9
            aten_fwd, aten_learn = _aten_fns(axis, g)

            def q2(xx, ss):
                return ops.lsq(xx, ss, BITS, axis=axis, grad_scale=g)

            with torch.no_grad():
                t_q2_fwd = _time(lambda: q2(x, s), mrt, cuda)
                t_aten_fwd = _time(lambda: aten_fwd(x, s), mrt, cuda)
            t_q2_fb = _time(_fwd_bwd(q2, x, s, dy), mrt, cuda)
            baselines_fwd = [("ATen fake_quantize", t_aten_fwd)]
            baselines_fb = [
                ("ATen learnable", _time(_fwd_bwd(aten_learn, x, s, dy), mrt, cuda)),
                ("naive LSQ eager", _time(_fwd_bwd(lambda a, b: naive_lsq(a, b, g, axis), x, s, dy), mrt, cuda)),
            ]
            if (name, axis, dtype) in COMPILED_NAIVE and not quick:
                compiled = torch.compile(lambda a, b: naive_lsq(a, b, g, axis), fullgraph=True)
                t0 = time.perf_counter()
                _fwd_bwd(compiled, x, s, dy)()
                compile_s = time.perf_counter() - t0
                baselines_fb.append((f"naive LSQ compiled (compile {compile_s:.1f}s)",
                                     _time(_fwd_bwd(compiled, x, s, dy), mrt, cuda)))
            for pass_name, t_q2, nbytes, baselines in (
                ("fwd", t_q2_fwd, 2 * numel * item, baselines_fwd),
                ("fwd+bwd", t_q2_fb, 5 * numel * item, baselines_fb),
            ):
                q2_gbs = nbytes / t_q2 / 1e9
                for bname, tb in baselines:
                    ok = not isinstance(tb, Exception)
                    rows.append([label, pass_name, bname, f"{tb * 1e3:.3f}" if ok else "n/a",
                                 f"{t_q2 * 1e3:.3f}", f"{tb / t_q2:.2f}x" if ok else "n/a",
                                 f"{q2_gbs:.1f} ({100 * q2_gbs / clone_gbs:.0f}% of clone {clone_gbs:.1f})"])
                    records.append(dict(case=label, pass_=pass_name, baseline=bname,
                                        baseline_ms=tb * 1e3 if ok else None, q2ext_ms=t_q2 * 1e3,
                                        speedup=tb / t_q2 if ok else None, q2ext_gbs=q2_gbs,
                                        clone_gbs=clone_gbs))
    table = print_table(rows, ["case", "pass", "baseline", "baseline ms", "q2ext ms", "speedup",
                               "q2ext GB/s (vs clone)"])
    return table, records
