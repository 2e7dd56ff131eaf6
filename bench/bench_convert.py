"""Converted-model latency against what a user would deploy instead:
python bench/bench_convert.py [--quick] [--threads N] [--size 96] [--no-onnx] [--no-baselines]

ResNet-18, the smp U-Net and a U-Net with Q-GBFusion, batch 1 and 16: FP32 eager, FP32
torch.compile, PT2E x86 int8 (torchao's X86InductorQuantizer + torch.compile),
onnxruntime on q2ext's exported QDQ graph, and q2ext.convert with each int8 engine forced
and auto; plus every converted model's argmax agreement with its fake-quant model.  The
implementation lives in q2ext/benchmarks/convert.py; results go to bench/RESULTS.md.
"""
import argparse

import torch

from q2ext.benchmarks import convert

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="ResNet-18 only")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--size", type=int, default=96, help="ResNet-18 input height/width (96 or 224)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    p.add_argument("--no-baselines", action="store_true", help="skip torch.compile and PT2E (slow to compile)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    convert.run(quick=a.quick, min_run_time=a.min_run_time, size=a.size, onnx=not a.no_onnx,
                baselines=not a.no_baselines, batches=tuple(a.batches))
