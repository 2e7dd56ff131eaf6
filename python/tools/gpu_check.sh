#!/usr/bin/env bash
# GPU check of q2ext for a session that is lent a device machine (the device tool's H100/H200:
# 16 cores, torch 2.11.0+cu130, triton 3.6, Python 3.12, no network).  Two phases, each one
# device-tool call well inside its 540 s:
#   run(command="bash python/tools/gpu_check.sh build-test", timeout_s=540)
#   run(command="bash python/tools/gpu_check.sh bench", timeout_s=540)   # only after build-test is green
# build-test: builds q2ext._C for sm_90 against the machine's own torch (nothing is downloaded),
#   runs every CUDA test (pytest marker `cuda`, with the Triton interpreter off) and checks the
#   native Triton kernels against the compiled CPU kernels (bit-identical to the reference).
# bench: the `--device cuda` benchmarks (fake quant vs ATen and % of copy bandwidth, Q-GBFusion
#   and Q-ADA vs the composite, W8A8 vs cuBLAS int8, W4A16 vs tinygemm); rebuilds first when the
#   machine is a fresh one.
# Files under $OUT (the tool brings back at most 8): <phase>.log (everything), <phase>-summary.md,
# and for bench bench-tables.md.  The compact summary is printed last (output_tail returns it).
# Every step has its own time limit and the phase a deadline, so a hang costs one step, not the
# phase.  With GPU_CHECK_DRY_RUN=1, or where no GPU is visible, the CUDA steps are skipped and
# only their selection is exercised (pytest --collect-only, CLI --help), so the script can be
# tried end to end on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."

PHASE=${1:-}
case "$PHASE" in
  build-test | bench) ;;
  *) echo "usage: $0 build-test|bench   (GPU_CHECK_DRY_RUN=1 skips the CUDA steps)" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/q2ext_gpu_check}
mkdir -p "$OUT"
LOG="$OUT/$PHASE.log"
SUMMARY="$OUT/$PHASE-summary.md"
: > "$LOG"
PY=${PY:-python3}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))  # the phase's own budget, under the tool's 540 s
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1  # nothing may try to download

DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DRY=1
  echo "no CUDA device visible to $PY: dry run (CUDA steps skipped)" | tee -a "$LOG"
fi

ROWS=()     # summary rows: "| step | status | s | detail |"
FAILED=0
log() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: runs CMD (output to the log) under min(LIMIT_S, time left - 20 s);
# records PASS / FAIL rc=N / TIMEOUT and the step's last line matching DETAIL_RE (if set).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 20))
  if [ "$left" -lt 10 ]; then
    ROWS+=("| $name | NOT RUN (phase deadline) | 0 | |")
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log ""
  log "== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS tmp
  tmp=$(mktemp)
  timeout -k 10 "$limit" "$@" > "$tmp" 2>&1
  local rc=$?
  cat "$tmp" >> "$LOG"
  local detail=""
  [ -n "${DETAIL_RE:-}" ] && detail=$(grep -E "$DETAIL_RE" "$tmp" | tail -1 | tr '|' '/' | cut -c1-160)
  tail -5 "$tmp"
  rm -f "$tmp"
  local status=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT (${limit}s)"; FAILED=1
  elif [ $rc -ne 0 ]; then status="FAIL rc=$rc"; FAILED=1; fi
  ROWS+=("| $name | $status | $((SECONDS - t0)) | $detail |")
  [ "$status" = PASS ]
}

skip() { ROWS+=("| $1 | SKIPPED | 0 | $2 |"); log "== $1: skipped ($2)"; }

summary() {
  {
    echo "## gpu_check $PHASE  $(date -u +%FT%TZ)  dry_run=$DRY"
    echo "$ENV_LINE"
    echo
    echo "| step | status | s | detail |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    if [ "$FAILED" = 0 ]; then echo "RESULT: PASS ($PHASE, ${SECONDS}s)"; else echo "RESULT: FAIL ($PHASE, ${SECONDS}s)"; fi
  } > "$SUMMARY"
  echo
  echo "==================== summary (also $SUMMARY; full log $LOG)"
  cat "$SUMMARY"
}

# ---------------------------------------------------------------- environment and build
find_cuda_home() {  # nvcc on PATH, else the usual install folders; never hard-coded
  local nvcc
  nvcc=$(command -v nvcc 2>/dev/null || ls -d /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc 2>/dev/null | tail -1)
  [ -n "$nvcc" ] && dirname "$(dirname "$(readlink -f "$nvcc")")"
}

ENV_LINE=$("$PY" - 2>&1 <<'PYEOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001 - report, do not fail
    tv = f"none ({type(e).__name__})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}, {gpu}")
PYEOF
)
log "$ENV_LINE"

build() {
  local cuda_home
  cuda_home=${CUDA_HOME:-$(find_cuda_home)}
  if [ -z "$cuda_home" ]; then echo "no nvcc found (PATH, /usr/local/cuda*)"; return 1; fi
  echo "CUDA_HOME=$cuda_home ($("$cuda_home/bin/nvcc" --version | tail -1))"
  rm -f q2ext/_C*.so  # a copied CPU-only build must not stand in for the CUDA one
  CUDA_HOME=$cuda_home Q2EXT_USE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import q2ext, sys; ok = q2ext._ext.compiled_with_cuda(); print('q2ext._C with CUDA kernels:', ok); sys.exit(0 if ok else 1)"
}

have_cuda_build() {
  "$PY" -c "import q2ext, sys; sys.exit(0 if q2ext._ext.compiled_with_cuda() else 1)" 2>/dev/null
}

# ---------------------------------------------------------------- phase 1
triton_native() {
  # Compiled Triton on the GPU against the compiled CPU kernels, which the CPU tests hold
  # bit-identical to the reference (fake quant, W8A8) or within 1e-3 (W4A16).  Only op names
  # (torch.ops.q2ext.*) are used, so the check does not depend on Python module paths.
  TRITON_INTERPRET=0 "$PY" - <<'PYEOF'
import torch
import q2ext  # noqa: F401  (registers the ops)

ops = torch.ops.q2ext
bad = 0


def bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def report(name, ok):
    global bad
    bad += not ok
    print(f"{name}: {'ok' if ok else 'MISMATCH'}")


g = torch.Generator().manual_seed(0)
for shape, axis in [((4, 64, 56, 56), None), ((64, 32, 3, 3), 0), ((8, 128, 28, 28), 1), ((1025,), None)]:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(shape, generator=g) * 3).to(dtype)
        s = torch.rand(1 if axis is None else shape[axis], generator=g) * 0.1 + 0.01
        args = (None, None, -8, 7, axis, 0, 1.0)
        want = ops.fake_quant(x, s, *args)
        for name in ("fake_quant_triton", "fake_quant"):
            got = getattr(ops, name)(x.cuda(), s.cuda(), *args).cpu()
            report(f"{name} {tuple(shape)} axis={axis} {dtype}", torch.equal(bits(got), bits(want)))


def same(a, b):
    return a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a.float()), torch.nan_to_num(b.float()))


for m, n, k in [(1, 4096, 4096), (13, 70, 4097), (1024, 1024, 1024)]:
    for adt in (torch.int8, torch.uint8):
        lo, hi = (-128, 128) if adt == torch.int8 else (0, 256)
        a = torch.randint(lo, hi, (m, k), dtype=adt, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        sa, sb, bias = torch.rand(m, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g)
        for od, bi, relu in ((torch.int32, None, False), (torch.float32, bias, True), (torch.bfloat16, bias, False)):
            want = ops.w8a8_mm(a, b, sa, sb, bi, od, relu)
            cu = [t.cuda() if t is not None else None for t in (a, b, sa, sb, bi)]
            for name in ("w8a8_mm_triton", "w8a8_mm"):
                got = getattr(ops, name)(*cu, od, relu).cpu()
                report(f"{name} {m}x{n}x{k} {adt} -> {od}", same(got, want))


for m, n, k in [(1, 4096, 4096), (16, 4096, 4096), (1024, 4096, 4096), (7, 33, 256)]:
    for gs in (32, 128):
        # Any bytes are valid packed codes (csrc/include/q2ext/gemm_math.h, kNB4 blocks).
        wp = torch.randint(0, 256, ((n + 15) // 16, k, 8), dtype=torch.uint8, generator=g)
        sc = torch.rand(k // gs, n, generator=g) * 0.02 + 1e-3
        z = torch.randn(k // gs, n, generator=g) * 0.01
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k, generator=g).to(dt)
            want = ops.w4a16_mm(x, wp, sc, z, gs).float()
            for name in ("w4a16_mm_triton", "w4a16_mm"):
                got = getattr(ops, name)(x.cuda(), wp.cuda(), sc.cuda(), z.cuda(), gs).cpu()
                rel = ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()
                report(f"{name} {m}x{n}x{k} g{gs} {dt} rel={rel:.1e}", got.dtype == dt and rel <= 1e-3)
print(f"native checks: {bad} mismatching")
raise SystemExit(1 if bad else 0)
PYEOF
}

phase_build_test() {
  if [ "$DRY" = 1 ]; then
    skip build "dry run"
    DETAIL_RE='tests? collected|no tests ran|error' step "cuda tests (collect only)" 120 \
      "$PY" -m pytest -q -m cuda tests --collect-only -p no:cacheprovider
    skip "triton native" "dry run"
    return
  fi
  DETAIL_RE='q2ext._C with CUDA|error' step build 330 build || return
  DETAIL_RE='passed|failed|error' step "cuda tests" 200 \
    env TRITON_INTERPRET=0 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider -o console_output_style=classic -rfE
  DETAIL_RE='native checks' step "triton native" 90 triton_native
}

# ---------------------------------------------------------------- phase 2
phase_bench() {
  if [ "$DRY" = 1 ]; then
    skip build "dry run"
    DETAIL_RE='usage' step "bench CLI (help only)" 60 "$PY" -m q2ext bench --help
    skip "bench suite (cuda)" "dry run"
    skip "bench gemm (cuda)" "dry run"
    return
  fi
  if have_cuda_build; then
    ROWS+=("| build | reused | 0 | q2ext._C with CUDA kernels from build-test |")
  else
    DETAIL_RE='q2ext._C with CUDA|error' step build 330 build || return
  fi
  # The suite skips its CPU-only parts (int GEMMs, QAT step) on cuda by itself.
  DETAIL_RE='speedup|error' step "bench suite (cuda)" 300 \
    "$PY" -m q2ext bench --device cuda --out "$OUT/bench-tables.md"
  DETAIL_RE='GOP/s|GFLOP/s|error' step "bench gemm (cuda)" 150 \
    "$PY" -c "from q2ext.benchmarks import gemm; gemm.run(device='cuda', min_run_time=0.2)"
  ROWS+=("| W4A4 QAT step (cuda) | NOT AVAILABLE | 0 | the qat_step benchmark runs on the CPU only |")
}

if [ "$PHASE" = build-test ]; then phase_build_test; else phase_bench; fi
summary
[ "$FAILED" = 0 ]
