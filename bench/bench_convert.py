"""Converted-model latency:
python bench/bench_convert.py [--quick] [--threads N] [--size 96] [--onnx]

ResNet-18 (batch 1 and 16) and a U-Net with Q-GBFusion: q2ext.convert's int8 model vs FP32
eager and the fake-quant model, plus argmax agreement int8 vs fake quant.  The
implementation lives in q2ext/benchmarks/convert.py; results go to bench/RESULTS.md.
"""
import argparse

import torch

from q2ext.benchmarks import convert

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--size", type=int, default=96, help="ResNet-18 input height/width (96 or 224)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--onnx", action="store_true", help="also time onnxruntime on the exported QDQ graph")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    convert.run(quick=a.quick, min_run_time=a.min_run_time, size=a.size, onnx=a.onnx)
