"""From the per-seed runs of ``q2ext demo`` to the numbers it reports.

- ``summary[arm]``: test score mean/std/per seed (the checkpoint picked on validation),
  validation best, steps run, convergence (q2ext.demo.stats), final alpha per node.
- ``paired["X-Y"]``: per-seed paired deltas of the test score.
- ``premise[arm]``: the gradient-energy premise of Q-GBFusion.  Per node, the balance ratio
  max_i G_i / min_i G_i and G_deep / G_shallow, over the last validation interval of the
  arm's training (mean of the per-step G_i), and over the whole run; ``premise["start"]``:
  the same from probes of the FP32 checkpoints and of the quantized models before any QAT
  step, on the same fixed batches (same weights: only the quantizers differ).
"""
from __future__ import annotations

import math

from .stats import convergence, mean_std, paired

PAIRS = (("B", "A"), ("C", "B"), ("B", "G"), ("C", "G"), ("E", "A"), ("C", "A"),
         ("D", "B"), ("H", "B"), ("F", "E"), ("D", "A"), ("H", "A"))
CHECKPOINTS = ("FP32-LN", "FP32")


def _node_stats(task, names, energies) -> list:
    """[{name, G, balance_ratio, deep_over_shallow}] per node for one energy snapshot."""
    out = []
    for name, g in zip(names, energies):
        deep = task.deep_branch(name)
        shallow = [i for i in range(len(g)) if i != deep]
        g_shallow = sum(g[i] for i in shallow) / len(shallow)
        out.append({"name": name, "G": g, "balance_ratio": max(g) / min(g) if min(g) > 0 else math.inf,
                    "deep_over_shallow": g[deep] / g_shallow if g_shallow > 0 else math.inf})
    return out


def _mean_energies(energy_points) -> list:
    n = len(energy_points)
    return [[sum(p[node][b] for p in energy_points) / n for b in range(len(energy_points[0][node]))]
            for node in range(len(energy_points[0]))]


def _premise_row(task, names, snapshots: list) -> dict:
    """Mean over seeds of the per-node statistics of one energy snapshot per seed."""
    per_seed = [_node_stats(task, names, e) for e in snapshots]
    nodes = []
    for i, name in enumerate(names):
        ratio, _ = mean_std([s[i]["balance_ratio"] for s in per_seed])
        dos, _ = mean_std([s[i]["deep_over_shallow"] for s in per_seed])
        nodes.append({"name": name, "balance_ratio": ratio, "deep_over_shallow": dos,
                      "balance_ratio_per_seed": [s[i]["balance_ratio"] for s in per_seed],
                      "deep_over_shallow_per_seed": [s[i]["deep_over_shallow"] for s in per_seed]})
    ratio, _ = mean_std([n["balance_ratio"] for n in nodes])
    dos, _ = mean_std([n["deep_over_shallow"] for n in nodes])
    return {"balance_ratio": ratio, "deep_over_shallow": dos, "per_node": nodes}


def summarize(task, per_seed: dict, arms) -> dict:
    """{"summary", "paired", "premise"} from ``{seed: run_seed(...) result}``."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    node_names = first["node_names"]
    summary, premise = {}, {}
    conv = {s: convergence({a: per_seed[s][a] for a in arms}) if "A" in arms else None for s in seeds}
    for arm in (*[c for c in CHECKPOINTS if c in first], *arms):
        runs = {s: per_seed[s][arm] for s in seeds}
        scores = [runs[s]["test"]["score"] for s in seeds]
        mean, std = mean_std(scores)
        row = {"score_mean": mean, "score_std": std, "score_per_seed": scores,
               "val_best_per_seed": [runs[s]["best"] for s in seeds],
               "steps_run": [runs[s]["steps_run"] for s in seeds],
               "seconds_per_seed": [runs[s]["seconds"] for s in seeds]}
        if arm not in CHECKPOINTS and conv[seeds[0]] is not None:
            row["steps_to_target"] = [conv[s][arm]["steps_to_target"] for s in seeds]
            ref = [conv[s]["A"]["steps_to_target"] for s in seeds]
            row["steps_to_target_vs_A"] = [a / r if a is not None and r else None
                                           for a, r in zip(row["steps_to_target"], ref)]
            row["area"] = [conv[s][arm]["area"] for s in seeds]
            row["area_mean"], _ = mean_std(row["area"])
        alphas = [runs[s]["alpha"][-1] for s in seeds if runs[s]["alpha"] and runs[s]["alpha"][-1]]
        if alphas:
            row["final_alpha_per_seed"] = alphas
        summary[arm] = row
        energies = [runs[s]["energy"] for s in seeds if runs[s]["energy"]]
        if energies and arm not in CHECKPOINTS:
            premise[arm] = _premise_row(task, node_names, [e[-1] for e in energies])
            premise[arm]["run_mean"] = _premise_row(task, node_names, [_mean_energies(e) for e in energies])
    premise["start"] = {k: _premise_row(task, node_names, [per_seed[s]["start"][k] for s in seeds])
                        for k in first["start"]}
    pairs = {}
    for a, b in PAIRS:
        if a in arms and b in arms:
            pairs[f"{a}-{b}"] = paired({s: per_seed[s][a]["test"]["score"] for s in seeds},
                                       {s: per_seed[s][b]["test"]["score"] for s in seeds})
    target = {s: conv[s]["target"] for s in seeds if conv[s] is not None}
    return {"summary": summary, "paired": pairs, "premise": premise, "convergence_target": target}
