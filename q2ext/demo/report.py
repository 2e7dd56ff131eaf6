"""Outputs of ``q2ext demo``: the tables, results.json and the PNG plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .arms import ARMS
from .deploy import table as deploy_table
from .summary import CHECKPOINTS

COLORS = {"E": "black", "A": "tab:blue", "B": "tab:orange", "C": "tab:green", "G": "tab:purple", "D": "tab:brown",
          "F": "tab:gray", "H": "tab:red"}
_QNAMES = {"auto": "LSQ", "lsq": "LSQ", "lsq+": "LSQ+", "pact": "PACT"}


def quant_label(cfg: dict) -> str:
    return f"{_QNAMES[cfg['quantizer']]} W{cfg['bits']}A{cfg['bits']}"


def arm_label(arm: str, cfg: dict) -> str:
    if arm in CHECKPOINTS:
        return f"{arm} checkpoint (no QAT)"
    return f"{arm}: " + ARMS[arm].format(q=quant_label(cfg))


def _f(v, spec=".2f", none="-"):
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _steps(row) -> str:
    if "steps_to_target" not in row:
        return ""
    parts = []
    for s, r in zip(row["steps_to_target"], row["steps_to_target_vs_A"]):
        parts.append("never" if s is None else f"{s}" + (f" ({r:.2f}×)" if r is not None else ""))
    return ", ".join(parts)


def main_table(results: dict) -> str:
    cfg, summ = results["config"], results["summary"]
    n, score = len(cfg["seeds"]), cfg["score_name"]
    lines = [f"| arm | test {score} (mean ± std, {n} seed{'s' * (n > 1)}) | per seed | val best (mean) | "
             "steps run | steps to A's best − 0.5 (× A) | area under val curve |",
             "|---|---|---|---|---|---|---|"]
    for arm, row in summ.items():
        val = sum(row["val_best_per_seed"]) / len(row["val_best_per_seed"])
        lines.append(f"| {arm_label(arm, cfg)} | {_f(row['score_mean'])} ± {_f(row['score_std'])} | "
                     f"{', '.join(_f(s) for s in row['score_per_seed'])} | {_f(val)} | "
                     f"{', '.join(str(s) for s in row['steps_run'])} | {_steps(row)} | {_f(row.get('area_mean'))} |")
    return "\n".join(lines)


def paired_table(results: dict) -> str:
    lines = ["| paired delta (test) | mean ± std | per seed | sign |", "|---|---|---|---|"]
    for name, p in results["paired"].items():
        lines.append(f"| {name} | {_f(p['mean'], '+.2f')} ± {_f(p['std'])} | "
                     f"{', '.join(_f(d, '+.2f') for d in p['per_seed'])} | {p['positive']}/{p['n']} positive |")
    return "\n".join(lines)


def _cell(row, i):
    node = row["per_node"][i]
    return f"{_f(node['balance_ratio'])} ({_f(node['deep_over_shallow'])})"


def premise_table(results: dict) -> str:
    prem = results["premise"]
    cols = [(f"{k} before QAT", prem["start"][k]) for k in ("FP32-LN", "A", "FP32", "G") if k in prem["start"]]
    cols += [(f"{a} training", prem[a]) for a in ("E", "A", "B", "G", "H") if a in prem]
    names = [n["name"] for n in cols[0][1]["per_node"]]
    lines = ["| node | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(_cell(r, i) for _, r in cols) + " |")
    lines.append("| mean | " + " | ".join(f"{_f(r['balance_ratio'])} ({_f(r['deep_over_shallow'])})"
                                           for _, r in cols) + " |")
    return "\n".join(lines)


def alpha_table(results: dict) -> str:
    summ = results["summary"]
    arms = [a for a in ("B", "C", "D", "F", "H") if "final_alpha_per_seed" in summ.get(a, {})]
    if not arms:
        return ""
    names = results["seeds"][next(iter(results["seeds"]))]["node_names"]
    lines = ["| node | " + " | ".join(f"{a}: α (deep, shallow)" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for i, name in enumerate(names):
        cells = []
        for a in arms:
            per = [al[i] for al in summ[a]["final_alpha_per_seed"]]
            k = len(per[0])
            mean = [sum(p[j] for p in per) / len(per) for j in range(k)]
            cells.append("(" + ", ".join(f"{v:.3f}" for v in mean) + ")")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(results: dict) -> str:
    seed, runs = next(iter(results["seeds"].items()))
    grids = runs.get("grids") or {}
    if not grids:
        return ""
    arms = list(grids)
    names = list(grids[arms[0]])
    lines = [f"| input grid of the conv after each fusion node (seed {seed}) | " + " | ".join(arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(grids[a][name] for a in arms) + " |")
    return "\n".join(lines)


def tables(results: dict) -> str:
    """Every table of the report (markdown) with the notes that define its columns."""
    cfg = results["config"]
    parts = [f"q2ext demo --task {cfg['task']}: {quant_label(cfg)} (quantizer policy {cfg['quantizer']!r}), "
             f"data seed {cfg['data_seed']}, splits {cfg['split_sizes']}; checkpoints picked on val, scored on test.",
             main_table(results), "", paired_table(results), "",
             "Premise check, balance ratio max_i G_i / min_i G_i (G_deep / G_shallow) per fusion node; G_i = "
             "||dL/dF_i||_2 of branch i (before alpha). 'before QAT': probes of the checkpoint on the same fixed "
             "training batches; 'training': mean over the last validation interval, mean over seeds.",
             premise_table(results)]
    for extra in (alpha_table(results), grid_table(results)):
        if extra:
            parts += ["", extra]
    parts.append(f"\nConvergence: validation curves smoothed by an EMA; target = A's smoothed best − 0.5 per seed. "
                 f"Area: mean validation score over the QAT budget, best held after early stopping. "
                 f"Wall time {results['wall_seconds']:.0f} s on {results['threads']} threads.")
    if results.get("deploy"):

        parts.append(deploy_table(results["deploy"]))
    return "\n".join(parts)


def _finite(obj):
    """JSON has no inf/NaN: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(results: dict, path: Path) -> None:
    with open(path, "w") as f:
        json.dump(_finite(results), f, indent=1, allow_nan=False, default=str)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def _arms(results):
    return [a for a in results["config"]["arms"] if a in results["summary"]]


def plot_curves(results: dict, path: Path) -> None:
    """Validation score against QAT step, one panel per seed, one colour per arm."""
    plt = _plt()
    cfg, seeds = results["config"], results["seeds"]
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.2 * len(seeds), 4.2), squeeze=False, sharey=True)
    for ax, (seed, runs) in zip(axes[0], seeds.items()):
        for arm in _arms(results):
            h = runs[arm]
            ax.plot(h["steps"], h["val"], color=COLORS[arm], lw=1.4, marker="o", ms=2, label=arm_label(arm, cfg))
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("QAT step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"validation {cfg['score_name']} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.suptitle(f"q2ext demo --task {cfg['task']}: {quant_label(cfg)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_node(results, path, arms, series, ylabel, title, log=False):
    plt = _plt()
    cfg = results["config"]
    seed, runs = next(iter(results["seeds"].items()))
    names = runs["node_names"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 3.6), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        for arm in arms:
            if arm not in runs:
                continue
            for values, style, suffix in series(runs[arm], i):
                ax.plot(values[0], values[1], color=COLORS[arm], ls=style, lw=1.4,
                        label=f"{arm_label(arm, cfg)}{suffix}" if i == 0 else None)
        if log:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("QAT step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7)
    fig.suptitle(f"{title} (seed {seed})", fontsize=10)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_energy(results: dict, path: Path) -> None:
    """Per fusion node: G_deep (solid) and G_shallow (dashed) over QAT for E, A, B."""
    deep_of = next(iter(results["seeds"].values()))["deep_branch"]

    def series(h, node):
        steps = h["steps"][1:len(h["energy"]) + 1]
        g = [e[node] for e in h["energy"]]
        d = deep_of[node]
        shallow = [[x[j] for j in range(len(x)) if j != d] for x in g]
        return [((steps, [x[d] for x in g]), "-", ": deep"),
                ((steps, [sum(s) / len(s) for s in shallow]), "--", ": shallow")]
    _per_node(results, path, ("E", "A", "B"), series, "gradient energy ||dL/dF_i||_2 (interval mean)",
              "per-branch gradient energy at the fusion nodes", log=True)


def plot_alpha(results: dict, path: Path) -> None:
    """Per fusion node: alpha of the deep branch over QAT in the arms with a controller."""
    deep_of = next(iter(results["seeds"].values()))["deep_branch"]

    def series(h, node):
        if not h["alpha"] or not h["alpha"][0]:
            return []
        d = deep_of[node]
        return [((h["steps"][:len(h["alpha"])], [a[node][d] for a in h["alpha"]]), "-", "")]
    _per_node(results, path, ("B", "C", "D", "F", "H"), series, "alpha of the deep branch",
              "Q-GBFusion alpha over training (0.5 = uniform)")


def write_all(results: dict, out_dir: Path) -> dict:
    """results.json, val_curves.png, gradient_energy.png, alpha.png in out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "curves": out_dir / "val_curves.png",
             "energy": out_dir / "gradient_energy.png", "alpha": out_dir / "alpha.png"}
    write_json(results, paths["json"])
    plot_curves(results, paths["curves"])
    plot_energy(results, paths["energy"])
    plot_alpha(results, paths["alpha"])
    return paths
