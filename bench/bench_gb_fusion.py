"""Q-GBFusion benchmark:
python bench/bench_gb_fusion.py [--quick] [--device cuda] [--no-compile] [--threads N]

Fused GBFusion fwd+bwd vs the composite PyTorch version (eager and torch.compile).  The
implementation lives in q2ext/benchmarks/gb_fusion.py.
"""
import argparse

import torch

from q2ext.benchmarks import gb_fusion

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    gb_fusion.run(quick=a.quick, device=a.device, compiled=not a.no_compile)
