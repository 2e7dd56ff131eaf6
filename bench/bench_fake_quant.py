"""Fake-quant microbenchmark: python bench/bench_fake_quant.py [--quick] [--device cuda] [--threads N]

The implementation lives in q2ext/benchmarks/fake_quant.py so that `q2ext bench` runs
the same code.
"""
import argparse

import torch

from q2ext.benchmarks import fake_quant

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fake_quant.run(quick=a.quick, device=a.device)
