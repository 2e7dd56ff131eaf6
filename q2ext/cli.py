"""The `q2ext` command line (also `python -m q2ext`).

  q2ext bench [--quick] [--device cpu|cuda] [--out FILE.md]
      kernel microbenchmarks against PyTorch's own ops, measured in the same run.
"""
from __future__ import annotations

import argparse
import sys


def _bench(args) -> int:
    import torch

    from .benchmarks import fake_quant

    if args.device == "cuda" and not torch.cuda.is_available():
        print("q2ext bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    table, _ = fake_quant.run(quick=args.quick, device=args.device)
    if args.out:
        try:
            with open(args.out, "w") as f:
                f.write(table + "\n")
        except OSError as exc:
            print(f"q2ext bench: cannot write --out {args.out}: {exc}", file=sys.stderr)
            return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q2ext", description="Fast low-bit QAT kernels and the Q² method.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="kernel microbenchmarks vs PyTorch baselines")
    bench.add_argument("--quick", action="store_true", help="small shapes, short runs (< 1 minute)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--out", help="also write the table (markdown) to this file")
    bench.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
