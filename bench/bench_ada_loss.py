"""Q-ADA microbenchmark: python bench/bench_ada_loss.py [--quick] [--device cuda]

Fused q2ext::ada_loss forward+backward vs the pure-PyTorch composite (q2ext/reference/ada_loss.py):
time and peak extra memory.  The implementation lives in q2ext/benchmarks/ada_loss.py.
"""
import argparse

from q2ext.benchmarks import ada_loss

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    ada_loss.run(quick=a.quick, device=a.device)
