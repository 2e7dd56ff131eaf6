"""Int8/int4 GEMM benchmark: python bench/bench_gemm.py [--quick] [--only w4a16] [--device cuda]

The implementation lives in q2ext/benchmarks/gemm.py; results go to bench/RESULTS.md.
"""
import argparse

from q2ext.benchmarks import gemm

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=("w8a8", "w4a16"), help="run just the W8A8 or the W4A16 table (CPU)")
    a = p.parse_args()
    gemm.run(quick=a.quick, min_run_time=a.min_run_time, device=a.device, only=a.only)
