"""QAT training-step benchmark:
python bench/bench_qat_step.py [--quick] [--no-compile] [--no-profile] [--no-memory] [--model M]

W4A4 forward+backward+SGD step of ResNet-18 and a U-Net (and the peak memory of those and
of an FCOS detector): FP32, q2ext and naive LSQ, eager and under torch.compile, PyTorch's
learnable fake-quant ops.  The implementation lives in q2ext/benchmarks/qat_step.py.
"""
import argparse

from q2ext.benchmarks import qat_step

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="ResNet-18 only, one round, short runs, no compiled variants")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op-family profile")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    p.add_argument("--model", action="append", choices=list(qat_step.MODELS), help="run only this model")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    a = p.parse_args()
    qat_step.run(quick=a.quick, compile_variants=not a.no_compile, profile=not a.no_profile,
                 memory=not a.no_memory, models=a.model, threads=a.threads)
