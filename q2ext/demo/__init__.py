"""``q2ext demo``: a fair, hard test of the Q² method on a procedural task.

Per seed, two FP32 checkpoints are trained (cached): FP32-LN with the Q-GBFusion nodes in
place and frozen, and FP32 with plain fusion nodes.  From them, on the same QAT schedule and
the same mini-batches (q2ext.demo.arms): E FP32-LN continued (the true gap), A LSQ + LN with
alpha frozen, B + the closed-loop controller (Q-GBFusion), C + Q-ADA (Q²), G plain LSQ from
FP32; with ``full`` also D (alpha replayed from B), F (FP32-LN + controller) and H (tau from
FP32-LN's own energy offsets).  Checkpoints are picked on validation and scored on test;
the report gives paired per-seed deltas, the gradient-energy premise check, alpha
trajectories and convergence (q2ext.demo.summary, q2ext.demo.report).

Tasks (q2ext.demo.config.TASKS): "seg", ultrasound-like lesion segmentation
(q2ext.demo.seg); "det", FPN + PAN FCOS-style detection of procedural scenes
(q2ext.demo.det).  The deployment check (q2ext.demo.deploy) converts a W8A8 model every
way.  Needs matplotlib, torchmetrics and tqdm (``pip install q2ext[demo]``; det also
torchvision and pycocotools); they are imported only when the demo runs, so ``import q2ext``
never needs them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .config import TASK_CHOICES, TASKS, DemoConfig, get_task, quick_config
from .protocol import run as _run
from .report import tables, write_all

__all__ = ["DemoConfig", "quick_config", "run", "missing_dependencies", "main", "TASKS", "TASK_CHOICES",
           "get_task"]

_DEPS = ("matplotlib", "torchmetrics", "tqdm")


def missing_dependencies() -> list:
    """The demo's optional dependencies that are not installed."""
    return [m for m in _DEPS if importlib.util.find_spec(m) is None]


def run(cfg: DemoConfig, out_dir, progress: bool = True, log=print, task=None) -> dict:
    """The protocol (q2ext.demo.protocol.run)."""
    return _run(cfg, out_dir, progress=progress, log=log, task=task)


def main(cfg: DemoConfig, out_dir, progress: bool = True, log=print) -> dict:
    """Run the protocol, write results.json and the PNGs into out_dir, print the tables."""
    missing = missing_dependencies()
    if missing:
        raise ImportError(f"q2ext demo needs {', '.join(missing)}: pip install q2ext[demo]")
    out_dir = Path(out_dir)
    results = run(cfg, out_dir, progress=progress, log=log)
    paths = write_all(results, out_dir)
    log(tables(results))
    log("wrote " + ", ".join(str(p) for p in paths.values())
        + (f", and the models in {out_dir / 'models'}" if cfg.save_models else ""))
    log(f"wall time {results['wall_seconds']:.0f} s")
    return results
