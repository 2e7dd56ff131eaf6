"""Statistics of the ``q2ext demo`` protocol: paired per-seed deltas and convergence.

Paired deltas.  Every arm of a seed starts from the same checkpoint(s) and sees the same
mini-batches, so the per-seed difference of two arms removes the seed-to-seed spread of
the starting point; its mean, sample std and sign count over the seeds say whether an
effect is consistent.

Convergence, as the paper means it (comparison at convergence, Q-ADA's faster
convergence): on validation curves smoothed by an exponential moving average, the step
at which an arm first reaches the target ``max(EMA of A's curve) - 0.5``; the steps run
until early stopping; and the area under the validation curve over the full step budget,
as a mean score, with the best score held after an early stop (the model one keeps).
"""
from __future__ import annotations

import math

EMA_FACTOR = 0.5      # weight of the newest validation point in the smoothed curve
TARGET_MARGIN = 0.5   # the convergence target is A's smoothed best minus this


def mean_std(values) -> tuple:
    """(mean, sample std) of the finite values; (None, None) when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def paired(a: dict, b: dict) -> dict:
    """a - b per seed, for two ``{seed: score}`` dicts over the same seeds.

    Returns ``{"mean", "std", "per_seed": [...], "positive": n > 0, "negative": n < 0, "n"}``.
    """
    if set(a) != set(b):
        raise ValueError(f"paired: the two arms have different seeds: {sorted(a)} vs {sorted(b)}")
    seeds = sorted(a, key=str)
    deltas = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(deltas)
    return {"mean": mean, "std": std, "per_seed": deltas, "seeds": seeds,
            "positive": sum(d > 0 for d in deltas), "negative": sum(d < 0 for d in deltas), "n": len(deltas)}


def ema(values, factor: float = EMA_FACTOR) -> list:
    """Exponential moving average, starting at the first value."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else factor * v + (1 - factor) * acc
        out.append(acc)
    return out


def steps_to_reach(steps, values, target) -> int | None:
    """First step whose EMA-smoothed value is >= target, or None."""
    for s, v in zip(steps, ema(values)):
        if v >= target:
            return s
    return None


def area_under_curve(steps, values, best, horizon: int) -> float:
    """Mean validation score over steps [0, horizon] (trapezoids), the curve held at `best`
    from its last point on (an early-stopped run keeps its best checkpoint)."""
    xs, ys = list(steps), list(values)
    if xs[-1] < horizon:
        xs += [xs[-1], horizon]
        ys += [best, best]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))
    return area / horizon if horizon > 0 else ys[0]


def convergence(runs: dict, reference: str = "A") -> dict:
    """Per arm of one seed: steps_run, steps_to_target, area, and the target.

    runs: ``{arm: history}`` with "steps", "val", "best", "steps_run", "total_steps".
    """
    ref = runs[reference]
    target = max(ema(ref["val"])) - TARGET_MARGIN
    out = {"target": target}
    for arm, h in runs.items():
        out[arm] = {"steps_run": h["steps_run"], "steps_to_target": steps_to_reach(h["steps"], h["val"], target),
                    "area": area_under_curve(h["steps"], h["val"], h["best"], h["total_steps"])}
    return out
