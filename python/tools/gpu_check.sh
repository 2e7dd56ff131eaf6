#!/usr/bin/env bash
# One-shot GPU verification for a session that is lent a device (the H200 of the device
# tool): build the CUDA kernels for sm_90 there, run the CUDA tests, check the native
# Triton kernels against the reference, and run the GPU benchmarks.  Everything it prints
# also lands under $OUT.  Not used by CI (CI has no GPU).
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# The device image has its own python3 with torch/triton/numpy/pytest (see the device
# tool's KINDS.md); its torch version differs from the pinned one, which is fine for a
# build in place.  Budget: build ~3 min on 16 cores, tests ~2 min, Triton GEMM check ~1 min, benchmarks ~3 min
# (the GEMM tests and benchmark come right after the fake-quant tests: the newest kernels,
# csrc/cuda/gemm_*.cu, have never run before this script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/q2ext_gpu_out}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 Q2EXT_USE_CUDA=1 MAX_JOBS=16
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PY:-python3}
step() { echo "== $1 $(date +%T)" | tee -a "$OUT/steps.txt"; }

step env
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"

step build
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"

step cuda-tests
$PY -m pytest -q -x tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.txt" | tail -15

step cuda-q2-tests
# The Q-GBFusion / Q-ADA op tests parametrise over cpu and cuda: their cuda cases.
$PY -m pytest -q tests/test_gbfusion_ops.py tests/test_ada_ops.py -k cuda -p no:cacheprovider 2>&1 \
  | tee "$OUT/test_cuda_q2.txt" | tail -15

step cuda-gemm-tests
# No -x: one run should show every failing GEMM path (dp4a / MMA / w4a16 GEMV / dequant).
$PY -m pytest -q tests/test_cuda_gemm.py -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda_gemm.txt" | tail -25

step gemm-benchmark
# q2ext W8A8 vs cuBLAS int8 (torch._int_mm), W4A16 vs torch's tinygemm int4 kernel.
$PY bench/bench_gemm.py --device cuda --min-run-time 0.2 > "$OUT/bench_gemm_cuda.txt" 2>&1
echo "bench_gemm rc=$?"; grep "^|" "$OUT/bench_gemm_cuda.txt" | head -40

step triton-native
$PY - <<'PYEOF' 2>&1 | tee "$OUT/triton_native.txt"
# Native Triton and the CUDA kernel on the GPU vs q2ext/reference.py (fp32: bit-exact) and
# vs the CPU kernel (every dtype: bit-exact - the same per-element math, fake_quant_math.h).
import torch, q2ext
from q2ext import reference as R
from q2ext.triton import fake_quant as T

def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

torch.manual_seed(0)
bad = 0
for shape, axis in [((4, 64, 56, 56), None), ((64, 32, 3, 3), 0), ((8, 128, 28, 28), 1), ((1025,), None)]:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(shape) * 3).to(dtype)
        s = torch.rand(1 if axis is None else shape[axis]) * 0.1 + 0.01
        args = (None, None, -8, 7, axis, 0, 1.0)
        cpu = torch.ops.q2ext.fake_quant(x, s, *args)
        for name, fn in (("triton", T.fake_quant_triton), ("cuda", torch.ops.q2ext.fake_quant)):
            got = fn(x.cuda(), s.cuda(), *args).cpu()
            ok = torch.equal(bits(got), bits(cpu))
            if dtype == torch.float32:
                ok = ok and torch.equal(bits(got), bits(R.fake_quant(x, s, *args)))
            bad += not ok
            print(f"{name:6s} {str(shape):18s} axis={axis} {dtype}: {'ok' if ok else 'MISMATCH'}")
print("mismatching cases:", bad)
PYEOF

step triton-gemm-native
$PY - <<'PYEOF' 2>&1 | tee "$OUT/triton_gemm_native.txt"
# Compiled Triton int GEMMs on the GPU vs q2ext/gemm_reference.py on the CPU: W8A8 bit-exact
# (int32, and the fp32/bf16 epilogue through mul.rn), W4A16 within 1e-3; then rough timings.
import torch, q2ext
from q2ext import gemm, gemm_reference as R
from q2ext.triton import gemm as T

def same(a, b):
    return a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a.float()), torch.nan_to_num(b.float()))

def ms(fn):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / 20

g = torch.Generator().manual_seed(0)
bad = 0
for m, n, k in [(1, 4096, 4096), (13, 70, 4097), (1024, 1024, 1024), (2048, 1000, 1024)]:
    for adt in (torch.int8, torch.uint8):
        lo, hi = (-128, 128) if adt == torch.int8 else (0, 256)
        a = torch.randint(lo, hi, (m, k), dtype=adt, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        sa, sb, bias = torch.rand(m, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g)
        acc = R.int_mm(a, b)  # the int64 CPU GEMM is slow: once per shape
        for od, bi, relu in ((torch.int32, None, False), (torch.float32, bias, True), (torch.bfloat16, bias, False)):
            got = T.w8a8_mm_triton(a.cuda(), b.cuda(), sa.cuda(), sb.cuda(), None if bi is None else bi.cuda(), od, relu)
            ok = same(got.cpu(), R.w8a8_epilogue(acc, sa, sb, bi, relu, od))
            bad += not ok
            print(f"w8a8 {m}x{n}x{k} {adt} -> {od}: {'ok' if ok else 'MISMATCH'}")
        ac, bc, sac, sbc = a.cuda(), b.cuda(), sa.cuda(), sb.cuda()
        t = ms(lambda: T.w8a8_mm_triton(ac, bc, sac, sbc))
        print(f"  triton w8a8 {t:.3f} ms = {2 * m * n * k / t / 1e9:.0f} TOP/s")
for m, n, k in [(1, 4096, 4096), (16, 4096, 4096), (1024, 4096, 4096), (7, 33, 256)]:
    for gs in (32, 128):
        q = torch.randint(0, 16, (n, k), generator=g)
        wp = R.pack_int4(q)
        sc, z = torch.rand(k // gs, n, generator=g) * 0.02 + 1e-3, torch.randn(k // gs, n, generator=g) * 0.01
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=g).to(dt)
            want = R.w4a16_mm(x, wp, sc, z, gs).float()
            got = T.w4a16_mm_triton(x.cuda(), wp.cuda(), sc.cuda(), z.cuda(), gs).cpu()
            rel = ((got.float() - want).norm() / want.norm()).item()
            bad += not (got.dtype == dt and rel <= 1e-3)
            xc, wc, scc, zc = x.cuda(), wp.cuda(), sc.cuda(), z.cuda()
            t = ms(lambda: T.w4a16_mm_triton(xc, wc, scc, zc, gs))
            print(f"w4a16 {m}x{n}x{k} g{gs} {dt}: rel {rel:.2e} {'ok' if rel <= 1e-3 else 'MISMATCH'}; "
                  f"{t:.3f} ms = {2 * m * n * k / t / 1e9:.0f} GFLOP/s")
print("mismatching cases:", bad)
PYEOF

step benchmarks
for b in fake_quant gbfusion ada; do
  $PY bench/bench_$b.py --device cuda > "$OUT/bench_$b.txt" 2>&1; echo "bench_$b rc=$?"; grep "^|" "$OUT/bench_$b.txt" | head -40
done
step done
