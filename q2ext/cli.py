"""The `q2ext` command line (also `python -m q2ext`).

  q2ext bench [--quick] [--device cpu|cuda] [--only SUITE] [--out FILE.md] [--plot FILE.png]
      the kernel microbenchmarks and the W4A4 QAT-step benchmark, one summary table of
      speedups against baselines measured in the same run.
  q2ext demo [--task seg|det] [--quick] [--full] [--seeds N] [--bits B] [--quantizer auto|lsq|lsq+|pact]
             [--data-seed N] [--out DIR] [--device cpu|cuda]
      a fair test of Q² (q2ext.demo): FP32 checkpoints with and without the fusion
      LayerNorm -> W<B>A<B> QAT arms (LN only, + Q-GBFusion, + Q-ADA, plain LSQ) from the same
      checkpoint and batches; paired per-seed deltas, premise check; tables, results.json, PNGs.
  q2ext report CHECKPOINT
      q2ext.summary and the gradient-energy report of a model saved by `q2ext demo`.

Bad options exit with status 2 and a message naming the option.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from . import demo
from .benchmarks import suite
from .benchmarks.common import import_cpp_extension_quietly, machine_info
from .nn.gb_fusion import gradient_energy_report
from .passes.prepare import summary


def _writable_file(path):
    """None when `path` can be written (checked by creating it), else the reason."""
    try:
        existed = os.path.exists(path)
        with open(path, "a"):
            pass
        if not existed:
            os.remove(path)  # leave no empty file behind if the run fails later
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _bench(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("q2ext bench: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    # Output paths are checked before the benchmarks run (minutes), not after.
    for opt, path in (("--out", args.out), ("--plot", args.plot)):
        reason = path and _writable_file(path)
        if reason:
            print(f"q2ext bench: cannot write {opt} {path}: {reason}", file=sys.stderr)
            return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("q2ext bench: --plot needs matplotlib: pip install 'q2ext[demo]'", file=sys.stderr)
            return 2
    import_cpp_extension_quietly()  # the suites' torch.compile baselines would import it, with a CUDA_HOME warning
    table, records = suite.run(quick=args.quick, device=args.device, only=args.only)
    if args.out:
        with open(args.out, "w") as f:
            f.write(machine_info() + "\n\n" + table + "\n")
    if args.plot:
        suite.plot(records, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _writable_dir(path):
    """None when `path` is (or can be made) a writable directory, else the reason."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return str(exc)
    if not os.path.isdir(path):
        return "not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def _demo(args) -> int:
    # Every option is checked before any data is drawn or any model trained.
    if args.bits is not None and not 2 <= args.bits <= 8:
        print(f"q2ext demo: --bits must be in 2..8, got {args.bits}", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"q2ext demo: --seeds must be >= 1, got {args.seeds}", file=sys.stderr)
        return 2
    if not 0 <= args.data_seed < 2 ** 31:
        print(f"q2ext demo: --data-seed must be in 0..2**31-1, got {args.data_seed}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("q2ext demo: --device cuda requested but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        demo.get_task(args.task)
    except ValueError as exc:
        print(f"q2ext demo: {exc}", file=sys.stderr)
        return 2
    missing = demo.missing_dependencies()
    if missing:
        print(f"q2ext demo: needs {', '.join(missing)}: pip install q2ext[demo]", file=sys.stderr)
        return 2
    reason = _writable_dir(args.out)
    if reason:
        print(f"q2ext demo: cannot write --out {args.out}: {reason}", file=sys.stderr)
        return 2
    base = demo.quick_config() if args.quick else demo.DemoConfig()
    seeds = args.seeds if args.seeds is not None else len(base.seeds)
    cfg = dataclasses.replace(base, task=args.task, seeds=tuple(range(seeds)), bits=args.bits or base.bits,
                              quantizer=args.quantizer, device=args.device, data_seed=args.data_seed, full=args.full)
    demo.main(cfg, args.out, progress=not args.no_progress)
    return 0


def _report(args) -> int:
    if not os.path.isfile(args.checkpoint):
        print(f"q2ext report: CHECKPOINT {args.checkpoint!r} is not a file", file=sys.stderr)
        return 2
    try:
        # A whole pickled module (what `q2ext demo` saves): weights_only=False runs the
        # pickle's code, so only load checkpoints from a source you trust.
        model = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:
        print(f"q2ext report: cannot load CHECKPOINT {args.checkpoint!r}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    if not isinstance(model, torch.nn.Module):
        print(f"q2ext report: CHECKPOINT {args.checkpoint!r} holds a {type(model).__name__}, not a model "
              "(save the whole module, e.g. the files `q2ext demo` writes under --out/models)", file=sys.stderr)
        return 2
    print(summary(model))
    energy = gradient_energy_report(model)
    print()
    print(energy.table() if energy.rows else "gradient energy: no GBFusion node in this model")
    return 0


def suite_names():
    return suite.SUITES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q2ext", description="Fast low-bit QAT kernels and the Q² method.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks vs PyTorch baselines (one summary table)")
    bench.add_argument("--quick", action="store_true", help="small shapes, one round each, no torch.compile baselines (a few minutes)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--out", help="also write the summary table (markdown) to this file")
    bench.add_argument("--plot", metavar="FILE.png", help="draw the speedups of the summary table")
    bench.add_argument("--only", action="append", choices=suite_names(), metavar="SUITE",
                       help=f"run only this suite (repeatable): {', '.join(suite_names())}")
    bench.set_defaults(func=_bench)

    demo_cmd = sub.add_parser("demo", help="a fair test of Q² (Q-GBFusion + Q-ADA) against LSQ on a procedural task")
    demo_cmd.add_argument("--task", choices=demo.TASK_CHOICES, default="seg",
                      help="seg: ultrasound-like lesion segmentation (default); det: procedural detection")
    demo_cmd.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 minute on 2 CPU cores)")
    demo_cmd.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    demo_cmd.add_argument("--bits", type=int, default=None,
                      help="weight and activation bits, 2..8 (default 3: at 4 bits neither task has the quantization "
                      "gap the test needs, see the README)")
    demo_cmd.add_argument("--quantizer", choices=("auto", "lsq", "lsq+", "pact"), default="auto",
                      help="activation quantizer of every QAT arm (weights: LSQ). auto (default): unsigned LSQ on "
                      "non-negative inputs, LSQ+ on signed ones; lsq: LSQ with the sign read from the data (a "
                      "LayerNorm output then gets a signed grid); pact: PACT, LSQ+ where the input is signed")
    demo_cmd.add_argument("--data-seed", type=int, default=1234, help="seed of the data generator (default 1234)")
    demo_cmd.add_argument("--full", action="store_true",
                      help="also the arms D (alpha replayed from B), F (FP32-LN + controller), H (tau from FP32-LN)")
    demo_cmd.add_argument("--out", default="q2ext-demo", help="output directory (default ./q2ext-demo)")
    demo_cmd.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo_cmd.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    demo_cmd.set_defaults(func=_demo)

    report = sub.add_parser("report", help="summary and gradient-energy report of a saved prepared model")
    report.add_argument("checkpoint", metavar="CHECKPOINT", help="a model saved whole by torch.save "
                        "(e.g. q2ext-demo/models/armB_seed0.pt)")
    report.set_defaults(func=_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
