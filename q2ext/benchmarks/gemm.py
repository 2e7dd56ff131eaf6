"""Int8/int4 GEMM benchmark: q2ext's W8A8 and W4A16 kernels and oneDNN's int8 linear
(torch.ops.onednn.qlinear_pointwise) against fp32/bf16 F.linear, the composite
torch._int_mm path (separate quantize / int GEMM / dequantize ops),
torch._weight_int8pack_mm and torch._weight_int4pack_mm_for_cpu, all in one run; plus
the converted layers (Int8Linear / Int4Linear) with each engine forced and with the
engine ``auto`` picks on this machine (q2ext.nn.gemm_engines), which is what a converted
model runs.

Throughput is 2*M*N*K / time (GFLOP/s for float paths, GOP/s for integer ones).  The
W8A8 "end to end" rows include quantising the fp32 activation with a per-tensor static
scale (the learned LSQ step) and the fp32 epilogue; weights are prepared once, outside
the timed region, for every path.  The CPU paths of one shape are timed in interleaved
rounds (common.interleaved_medians).

``run(device="cuda")`` times the CUDA kernels instead (run_cuda): W8A8 against cuBLAS int8
(torch._int_mm) and bf16 F.linear, W4A16 against torch's tinygemm int4 kernel
(torch._weight_int4pack_mm) and bf16 F.linear.  A baseline that this torch/GPU cannot run
(e.g. _int_mm needs M > 16) is reported as n/a with the reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..nn.gemm_layers import Int4Linear, Int8Linear
from .common import interleaved_medians, machine_info, median_seconds, print_table

W8_SHAPES = [(1024, 1024, 1024), (4096, 256, 1024)]
W8_QUICK = [(1024, 1024, 1024)]
W4_SHAPES = [(1, 4096, 4096), (16, 4096, 4096)]
W4_QUICK = [(1, 4096, 4096)]
GROUP = 128
AUTO = "Int8Linear engine=auto (fp32 in/out)"
AUTO4 = "Int4Linear engine=auto"


def _int_mm_composite(x, x_scale, w_t, w_scale, bias):
    q = torch.clamp(torch.round(x * (1.0 / x_scale)), -128, 127).to(torch.int8)
    acc = torch._int_mm(q, w_t)
    return acc.float() * (x_scale * w_scale) + bias


def bench_w8a8(shapes, min_run_time):
    rows, speed = [], {}
    for m, n, k in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) * 0.05
        bias = torch.randn(n, generator=g)
        w_scale = w.abs().amax(dim=1) / 127
        w_q = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        x_scale = torch.tensor([x.abs().max().item() / 127])
        w_packed = ops.pack_int8_weight(w_q)
        w_t = w_q.t()  # _int_mm wants [K, N]; this column-major view is its fast layout
        a_q, _ = ops.quantize_activation(x, x_scale)
        ops_count = 2.0 * m * n * k
        xb, wb = x.bfloat16(), w.bfloat16()
        w_dnn, zp = torch.ops.onednn.qlinear_prepack(w_q, None), torch.zeros(n, dtype=torch.int64)
        layers = {}
        for engine in ("q2ext", "onednn", "auto"):  # the converted layer, engine forced / chosen
            layers[engine] = Int8Linear(w_q, w_scale, x_scale, bias)
            layers[engine].engine = engine
            layers[engine](x)  # auto measures its choice here, outside the timed region
        cases = [
            ("fp32 F.linear", lambda: F.linear(x, w, bias)),
            ("bf16 F.linear", lambda: F.linear(xb, wb, bias.bfloat16())),
            ("torch._int_mm composite (quant+mm+dequant)", lambda: _int_mm_composite(x, x_scale, w_t, w_scale, bias)),
            ("torch._int_mm only (int8 in, int32 out)", lambda: torch._int_mm(a_q, w_t)),
            ("torch._weight_int8pack_mm (fp32 x)", lambda: torch._weight_int8pack_mm(x, w_q, w_scale)),
            ("q2ext w8a8_mm only (int8 in, fp32 out)", lambda: ops.w8a8_mm(a_q, w_q, x_scale, w_scale, bias)),
            ("q2ext w8a8_linear end to end (fp32 in/out)",
             lambda: ops.w8a8_linear(x, w_packed, w_scale, x_scale, bias)),
            ("q2ext w8a8_linear end to end (bf16 in/out)",
             lambda: ops.w8a8_linear(xb, w_packed, w_scale, x_scale, bias)),
            ("oneDNN qlinear_pointwise only (int8 in, fp32 out)",
             lambda: torch.ops.onednn.qlinear_pointwise(a_q, float(x_scale), 0, w_dnn, w_scale, zp, bias, 1.0, 0,
                                                        torch.float32, "none", [], "")),
            ("Int8Linear engine=q2ext (fp32 in/out)", lambda: layers["q2ext"](x)),
            ("Int8Linear engine=onednn (fp32 in/out)", lambda: layers["onednn"](x)),
            (AUTO, lambda: layers["auto"](x)),
        ]
        ts = interleaved_medians([fn for _, fn in cases], min_run_time)
        for (name, _), t in zip(cases, ts):
            speed[(m, n, k, name)] = ops_count / t / 1e9
            label = f"{name} -> {layers['auto'].engines.popitem()[1]}" if name == AUTO else name
            rows.append([f"{m}x{n}x{k}", label, f"{t * 1e3:.3f}", f"{ops_count / t / 1e9:.0f}", f"{ts[0] / t:.2f}x"])
    return rows, speed


def bench_w4a16(shapes, min_run_time):
    rows, speed = [], {}
    for m, n, k in shapes:
        g = torch.Generator().manual_seed(1)
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        scales = torch.rand(k // GROUP, n, generator=g) * 0.01 + 1e-3
        zeros = torch.randn(k // GROUP, n, generator=g) * 1e-3
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        w = ops.dequantize_int4(ops.pack_int4(q), scales, zeros, GROUP)
        wb = w.bfloat16()
        packed = ops.pack_int4(q)
        t_packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scales, zeros], dim=-1)  # [K/g, N, 2], same (q - 8) * s + z convention
        sz_b = sz.bfloat16()
        ops_count = 2.0 * m * n * k
        layer = Int4Linear(q.to(torch.int16), scales, zeros, None, GROUP)
        layer(x), layer(xb)  # auto measures its choice here, outside the timed region
        chosen = dict(layer.engines)
        cases = [
            ("fp32 F.linear (dequantized weight)", lambda: F.linear(x, w)),
            ("bf16 F.linear (dequantized weight)", lambda: F.linear(xb, wb)),
            ("torch int4pack_mm_for_cpu (bf16 x)", lambda: torch._weight_int4pack_mm_for_cpu(xb, t_packed, GROUP, sz_b)),
            ("torch int4pack_mm_for_cpu (fp32 x)", lambda: torch._weight_int4pack_mm_for_cpu(x, t_packed, GROUP, sz)),
            ("q2ext w4a16_mm (bf16 x)", lambda: ops.w4a16_mm(xb, packed, scales, zeros, GROUP)),
            ("q2ext w4a16_mm (fp32 x)", lambda: ops.w4a16_mm(x, packed, scales, zeros, GROUP)),
            (f"{AUTO4} (bf16 x)", lambda: layer(xb)),
            (f"{AUTO4} (fp32 x)", lambda: layer(x)),
        ]
        ts = interleaved_medians([fn for _, fn in cases], min_run_time)
        for (name, _), t in zip(cases, ts):
            speed[(m, n, k, name)] = ops_count / t / 1e9
            if name.startswith(AUTO4):
                name += " -> " + next(v for key, v in chosen.items() if ("bfloat16" in key) == ("bf16" in name))
            rows.append([f"{m}x{n}x{k} g{GROUP}", name, f"{t * 1e3:.3f}", f"{ops_count / t / 1e9:.1f}",
                         f"{ts[0] / t:.2f}x"])
    return rows, speed


def _records(speed, pairs):
    """Summary records (q2ext path vs baseline path, same shape) from the GOP/s tables."""
    out = []
    for (m, n, k, name), gops in speed.items():
        for ours, theirs in pairs:
            if name == ours and (m, n, k, theirs) in speed:
                ms = lambda g: 2.0 * m * n * k / g / 1e6  # noqa: E731  GOP/s -> ms
                out.append(dict(case=f"{m}x{n}x{k} {ours}", baseline=theirs, baseline_ms=ms(speed[(m, n, k, theirs)]),
                                q2ext_ms=ms(gops), speedup=gops / speed[(m, n, k, theirs)]))
    return out


CUDA_W8_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1024, 1024, 1024), (4096, 4096, 4096)]
CUDA_W4_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096)]


def _cuda_rows(shape_label, cases, ops_count, min_run_time):
    rows, base = [], None
    for name, fn in cases:
        try:
            t = median_seconds(fn, min_run_time, sync_cuda=True)
        except (RuntimeError, NotImplementedError) as exc:  # baseline unsupported here
            rows.append([shape_label, name, "n/a", str(exc).splitlines()[0][:60], ""])
            continue
        base = base or t
        rows.append([shape_label, name, f"{t * 1e3:.4f}", f"{ops_count / t / 1e9:.0f}", f"{base / t:.2f}x"])
    return rows


def _int4_tinygemm(q, scales, zeros):
    """torch's CUDA int4 weight ([N, K/2] uint8 -> tinygemm tiles) and bf16 scale/zero."""
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    w = torch._convert_weight_to_int4pack(packed, 8)
    return w, torch.stack([scales, zeros], dim=-1).bfloat16().contiguous()


def run_cuda(quick: bool = False, min_run_time: float = 0.5):
    """CUDA kernels vs cuBLAS int8 / bf16 and torch's tinygemm int4 path."""
    dev = "cuda"
    head = ["shape MxNxK", "path", "ms", "GFLOP/s or GOP/s", "vs first row"]
    out = [machine_info()]
    print(out[0], flush=True)
    rows = []
    for m, n, k in CUDA_W8_SHAPES[:2] if quick else CUDA_W8_SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(dev)
        w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(dev)
        w_scale, bias = torch.rand(n, device=dev) * 0.01, torch.randn(n, device=dev)
        x_scale = torch.tensor([0.02], device=dev)
        a_q, _ = ops.quantize_activation(x, x_scale)
        w_packed, w_t = ops.pack_int8_weight(w_q), w_q.t()
        xb, wb = x.bfloat16(), (w_q.float() * w_scale[:, None]).bfloat16()
        cases = [
            ("bf16 F.linear (cuBLAS)", lambda: F.linear(xb, wb)),
            ("torch._int_mm (cuBLAS int8 -> int32)", lambda: torch._int_mm(a_q, w_t)),
            ("q2ext w8a8_mm (int8 -> int32)", lambda: ops.w8a8_mm(a_q, w_q, x_scale, w_scale, out_dtype=torch.int32)),
            ("q2ext w8a8_mm (int8 -> fp32, fused epilogue)", lambda: ops.w8a8_mm(a_q, w_q, x_scale, w_scale, bias)),
            ("q2ext w8a8_linear end to end (bf16 in/out)", lambda: ops.w8a8_linear(xb, w_packed, w_scale, None, bias)),
        ]
        rows += _cuda_rows(f"{m}x{n}x{k}", cases, 2.0 * m * n * k, min_run_time)
    out.append(print_table(rows, head))
    rows = []
    for m, n, k in CUDA_W4_SHAPES[:2] if quick else CUDA_W4_SHAPES:
        g = torch.Generator().manual_seed(1)
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        scales = (torch.rand(k // GROUP, n, generator=g) * 0.01 + 1e-3).to(dev)
        zeros = (torch.randn(k // GROUP, n, generator=g) * 1e-3).to(dev)
        packed = ops.pack_int4(q).to(dev)
        x = torch.randn(m, k, generator=g).to(dev)
        xb = x.bfloat16()
        wb = ops.dequantize_int4(packed, scales, zeros, GROUP).bfloat16()
        try:
            t_w, t_sz = _int4_tinygemm(q.to(dev), scales, zeros)
            tiny = lambda: torch._weight_int4pack_mm(xb, t_w, GROUP, t_sz)  # noqa: E731
        except (RuntimeError, NotImplementedError) as exc:
            def tiny(exc=exc):
                raise RuntimeError(f"tinygemm unavailable: {exc}")
        cases = [
            ("bf16 F.linear (dequantized weight)", lambda: F.linear(xb, wb)),
            ("torch._weight_int4pack_mm (tinygemm, bf16 x)", tiny),
            ("q2ext w4a16_mm (bf16 x)", lambda: ops.w4a16_mm(xb, packed, scales, zeros, GROUP)),
            ("q2ext w4a16_mm (fp32 x)", lambda: ops.w4a16_mm(x, packed, scales, zeros, GROUP)),
        ]
        rows += _cuda_rows(f"{m}x{n}x{k} g{GROUP}", cases, 2.0 * m * n * k, min_run_time)
    out.append(print_table(rows, head))
    return "\n\n".join(out), []


def run(quick: bool = False, min_run_time: float = 0.5, device: str = "cpu", only: str | None = None):
    """Run the benchmark; returns (text with the tables, summary records).

    only: "w8a8" or "w4a16" runs just that CPU table (and its summary lines)."""
    if device == "cuda":
        return run_cuda(quick, min_run_time)
    if only not in (None, "w8a8", "w4a16"):
        raise ValueError(f"only must be None, 'w8a8' or 'w4a16', got {only!r}")
    head = ["shape MxNxK", "path", "ms", "GFLOP/s or GOP/s", "vs first row"]
    out = [machine_info()]
    print(out[0], flush=True)
    s8, s4, lines, records = {}, {}, [], []
    if only in (None, "w8a8"):
        r8, s8 = bench_w8a8(W8_QUICK if quick else W8_SHAPES, min_run_time)
        out.append(print_table(r8, head))
    if only in (None, "w4a16"):
        r4, s4 = bench_w4a16(W4_QUICK if quick else W4_SHAPES, min_run_time)
        out.append(print_table(r4, head))
    if s8:
        m, n, k = 1024, 1024, 1024
        e2e_name = AUTO
        e2e = s8[(m, n, k, e2e_name)]
        lines.append(
            f"W8A8 1024^3 end to end: {e2e / s8[(m, n, k, 'fp32 F.linear')]:.2f}x fp32 F.linear (target >= 6x on AMX, >= 4x VNNI-only), "
            f"{e2e / s8[(m, n, k, 'torch._int_mm composite (quant+mm+dequant)')]:.2f}x the _int_mm composite "
            "(target >= 1.2x)")
        records += _records(s8, [(e2e_name, "fp32 F.linear"), (e2e_name, "torch._int_mm composite (quant+mm+dequant)")])
    for mm in sorted({s[0] for s in s4}):
        for dt in ("bf16", "fp32"):
            ours = s4[(mm, 4096, 4096, f"q2ext w4a16_mm ({dt} x)")]
            layer = s4[(mm, 4096, 4096, f"{AUTO4} ({dt} x)")]
            theirs = s4[(mm, 4096, 4096, f"torch int4pack_mm_for_cpu ({dt} x)")]
            lines.append(f"W4A16 M={mm} {dt}: q2ext w4a16_mm {ours / theirs:.2f}x torch int4pack (target >= 1.2x); "
                         f"Int4Linear auto {layer / theirs:.2f}x")
    records += _records(s4, [(f"q2ext w4a16_mm ({dt} x)", f"torch int4pack_mm_for_cpu ({dt} x)")
                             for dt in ("bf16", "fp32")])
    print("\n".join(lines), flush=True)
    return "\n\n".join(out + ["\n".join(lines)]), records
