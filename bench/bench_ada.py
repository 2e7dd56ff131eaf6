"""Q-ADA microbenchmark (issue #4): python bench/bench_ada.py [--quick] [--device cuda]

Fused q2ext::ada_loss forward+backward vs the pure-PyTorch composite (q2ext/ada_reference.py):
time and peak extra memory.  The implementation lives in q2ext/benchmarks/ada.py.
"""
import argparse

from q2ext.benchmarks import ada

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    ada.run(quick=a.quick, device=a.device)
