"""`q2ext bench`: every benchmark in one run, summarised as one table of speedups.

Each suite (fake quant, Q-GBFusion, Q-ADA, int GEMMs, the W4A4 QAT training step) prints its
own detailed table as it goes; the summary has one row per (case, baseline) with the
baseline and q2ext timed in the same process.  Speedup = baseline time / q2ext time.
"""
from __future__ import annotations

import math
import textwrap

from . import ada_loss, fake_quant, gb_fusion, gemm, qat_step
from .common import machine_info, print_table

SUITES = ("fake_quant", "gb_fusion", "ada_loss", "gemm", "qat_step")
CPU_ONLY = ("gemm", "qat_step")  # the int GEMMs and the QAT-step models run on the CPU only


def _fake_quant(quick, device):
    _, recs = fake_quant.run(quick=quick, device=device)
    return [("fake quant", f"{r['case']} {r['pass_']}", r["baseline"], r["baseline_ms"], r["q2ext_ms"])
            for r in recs if r["baseline_ms"] is not None], []


def _gb_fusion(quick, device):
    _, recs = gb_fusion.run(quick=quick, device=device, compiled=not quick)
    return [("Q-GBFusion", f"{r['case']} {r['dtype']} {r['layout']}", r["baseline"], r["baseline_ms"], r["q2ext_ms"])
            for r in recs], []


def _ada_loss(quick, device):
    _, recs = ada_loss.run(quick=quick, device=device)
    return [("Q-ADA", r["case"], "composite (PyTorch ops)", r["composite_ms"], r["q2ext_ms"]) for r in recs], []


def _gemm(quick, device):
    _, recs = gemm.run(quick=quick)
    return [("int GEMM", r["case"], r["baseline"], r["baseline_ms"], r["q2ext_ms"]) for r in recs], []


# Summary rows of the QAT step: (baseline variant, the q2ext variant it is compared with).
# Together they show the six numbers per model: FP32, naive LSQ and q2ext, eager and compiled.
_QAT_PAIRS = (("FP32", "q2ext"), ("FP32, torch.compile", "q2ext, torch.compile"), ("naive LSQ", "q2ext"),
              ("naive LSQ, torch.compile", "q2ext, torch.compile"), ("PyTorch learnable fake-quant", "q2ext"))


def _qat_step(quick, device):
    _, mem_table, _, recs = qat_step.run(quick=quick, compile_variants=not quick, profile=False)
    rows = []
    for model in dict.fromkeys(r["model"] for r in recs if r["ms"] is not None):
        by = {r["variant"]: r["ms"] for r in recs if r["model"] == model and r["ms"] is not None}
        # vs FP32 the "speedup" is below 1: it is the QAT overhead (target >= 1/1.15 eager,
        # >= 1/1.1 compiled).
        rows += [("W4A4 QAT step", model, base, by[base], by[q2]) for base, q2 in _QAT_PAIRS
                 if base in by and q2 in by]
    extra = [f"## W4A4 QAT step: peak memory of one training step\n{mem_table}"] if mem_table else []
    return rows, extra


_RUNNERS = {"fake_quant": _fake_quant, "gb_fusion": _gb_fusion, "ada_loss": _ada_loss, "gemm": _gemm,
            "qat_step": _qat_step}


def run(quick: bool = False, device: str = "cpu", only=None):
    """Run the suites; returns (summary markdown, records).  The summary is the table of
    speedups followed by the tables that are not speedups (the QAT step's peak memory)."""
    chosen = list(only or SUITES)
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; choose from {list(SUITES)}")
    rows, extra = [], []
    for name in chosen:
        if device != "cpu" and name in CPU_ONLY:
            print(f"[{name}: CPU only, skipped on {device}]", flush=True)
            continue
        print(f"\n## {name}", flush=True)
        suite_rows, suite_extra = _RUNNERS[name](quick, device)
        rows += suite_rows
        extra += suite_extra
    records = [dict(suite=s, case=c, baseline=b, baseline_ms=tb, q2ext_ms=tq, speedup=tb / tq)
               for s, c, b, tb, tq in rows]
    print(f"\n## summary (speedup = baseline ms / q2ext ms, same run)\n{machine_info()}", flush=True)
    table = print_table([[r["suite"], r["case"], r["baseline"], f"{r['baseline_ms']:.3f}", f"{r['q2ext_ms']:.3f}",
                          f"{r['speedup']:.2f}x"] for r in records],
                        ["suite", "case", "baseline", "baseline ms", "q2ext ms", "speedup"])
    for text in extra:
        print(f"\n{text}", flush=True)
    return "\n\n".join([table] + extra), records


def plot(records, path: str) -> None:
    """Horizontal bar chart of the speedups (log scale), one bar per summary row."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is in the demo extra
        raise RuntimeError("--plot needs matplotlib: pip install 'q2ext[demo]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(f"{r['suite']}: {r['case']} vs {r['baseline']}", 70) for r in records]
    values = [r["speedup"] for r in records]
    fig, ax = plt.subplots(figsize=(12, 0.36 * len(records) + 1.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of q2ext over the baseline (log scale; >1 = q2ext faster; "
                  "vs FP32 the QAT step's overhead)")
    ax.set_title(machine_info(), fontsize=8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x" if math.isfinite(v) else " n/a", va="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long labels: grow the canvas, do not clip
    plt.close(fig)
