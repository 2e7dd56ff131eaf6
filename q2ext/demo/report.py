"""Outputs of ``q2ext demo``: the summary table, results.json and the PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .deploy import table as deploy_table
from .train import VARIANTS

LABELS = {"fp32": "FP32", "qat": "{q}", "qat+gbf": "{q} + Q-GBFusion", "qat+gbf+ada": "{q} + Q-GBFusion + Q-ADA",
          "fp32+gbf": "FP32 + Q-GBFusion (control)"}
COLORS = {"qat": "tab:blue", "qat+gbf": "tab:orange", "qat+gbf+ada": "tab:green", "fp32+gbf": "tab:gray"}


def label(variant: str, cfg: dict) -> str:
    q = {"lsq": "LSQ", "lsq+": "LSQ+", "pact": "PACT"}[cfg["quantizer"]] + f" W{cfg['bits']}A{cfg['bits']}"
    return LABELS[variant].format(q=q)


def _fmt(v, spec=".2f", none="-"):
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def table(results: dict) -> str:
    """Markdown table: mDICE mean +- std, delta, steps to the baseline's best, balance ratios."""
    cfg, summ = results["config"], results["summary"]
    n = len(cfg["seeds"])
    lines = [f"| variant | mDICE (mean ± std, {n} seed{'s' * (n > 1)}) | Δ | steps to {label('qat', cfg)} best "
             "(per seed; × baseline) | balance ratio max/min | G_up / G_skip |",
             "|---|---|---|---|---|---|"]
    for v in ["fp32", *VARIANTS]:
        row = summ[v]
        ref = "FP32" if v == "fp32+gbf" else label("qat", cfg)
        delta = "" if v in ("fp32", "qat") else f"{row['delta']:+.2f} vs {ref}"
        steps = ""
        if v.startswith("qat"):
            steps = ", ".join("never" if s is None else str(s) for s in row["steps_to_baseline_best"])
            steps += f" ({_fmt(row['steps_fraction'])}×)" if v != "qat" else ""
        lines.append(f"| {label(v, cfg)} | {_fmt(row['mdice_mean'])} ± {_fmt(row['mdice_std'])} | {delta} | "
                     f"{steps} | {_fmt(row['balance_ratio'], '.3f')} | {_fmt(row['deep_over_skip'], '.3f')} |")
    lines.append(f"\nbalance ratio: per fusion node, max_i G_i / min_i G_i of the mean over the last training epoch "
                 f"of G_i = ||dL/dF_i||_2 (branch input, before alpha); averaged over the {cfg['depth']} nodes and "
                 f"the seeds.  Wall time {results['wall_seconds']:.0f} s on {results['threads']} threads.")
    if results.get("deploy"):
        lines.append(deploy_table(results["deploy"]))
    return "\n".join(lines)


def _finite(obj):
    """JSON has no inf/NaN: write them as null (and say so in the schema note)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(results: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(_finite(results), f, indent=1, allow_nan=False)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: Path) -> None:
    """Validation mDICE against QAT step, one line per seed, one colour per variant."""
    plt = _plt()
    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in VARIANTS:
        for i, (seed, runs) in enumerate(results["seeds"].items()):
            h = runs[v]
            ax.plot(h["steps"], h["mdice"], color=COLORS[v], alpha=0.85, lw=1.4,
                    label=label(v, cfg) if i == 0 else None, marker="o", ms=2.5)
    fp = results["summary"]["fp32"]["mdice_mean"]
    ax.axhline(fp, color="black", ls="--", lw=1, label=f"FP32 ({fp:.1f})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation mDICE (%)")
    ax.set_title(f"q2ext demo: W{cfg['bits']}A{cfg['bits']} QAT from FP32 ({len(cfg['seeds'])} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_energy(results: dict, path: Path) -> None:
    """Per fusion node: G_up and G_skip (epoch means) over training, first seed, per variant."""
    plt = _plt()
    cfg = results["config"]
    seed, runs = next(iter(results["seeds"].items()))
    depth = cfg["depth"]
    fig, axes = plt.subplots(1, depth, figsize=(4.2 * depth, 3.8), squeeze=False)
    for node in range(depth):
        ax = axes[0][node]
        for v in VARIANTS:
            h = runs[v]
            if not h["energy"]:
                continue
            steps = h["steps"][1:len(h["energy"]) + 1]
            ax.plot(steps, [e[node][0] for e in h["energy"]], color=COLORS[v], lw=1.6, label=f"{label(v, cfg)}: up")
            ax.plot(steps, [e[node][1] for e in h["energy"]], color=COLORS[v], lw=1.6, ls="--", label="skip")
        ax.set_yscale("log")
        ax.set_title(f"decoders.{node} (solid: deep/up, dashed: skip)", fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gradient energy ||dL/dF_i||_2 (epoch mean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    keep = [(h, lbl) for h, lbl in zip(handles, labels) if lbl != "skip"]
    fig.legend([h for h, _ in keep], [lbl for _, lbl in keep], loc="lower center", ncol=len(keep), fontsize=8)
    fig.suptitle(f"per-branch gradient energy at the fusion nodes (seed {seed})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out_dir: Path) -> dict:
    """results.json, val_curves.png, gradient_energy.png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "results.json", "curves": out_dir / "val_curves.png",
             "energy": out_dir / "gradient_energy.png"}
    write_json(results, paths["json"])
    plot_curves(results, paths["curves"])
    plot_energy(results, paths["energy"])
    return paths
