"""``q2ext demo``: a miniature reproduction of the Q² result on procedural segmentation data.

A small U-Net is trained in FP32 on in-memory textured shapes (q2ext.demo.data), then
fine-tuned at low bit width with (a) a QAT quantizer alone, (b) + Q-GBFusion at the
decoder fusion nodes, (c) + Q-GBFusion + Q-ADA from the FP32 teacher, and the negative
control FP32 + Q-GBFusion, over several seeds (q2ext.demo.protocol).  The outputs
(q2ext.demo.report): a table, results.json, and PNG plots of the validation curves and of
the per-branch gradient energy at each fusion node.

Needs matplotlib, torchmetrics and tqdm (``pip install q2ext[demo]``); they are imported
only when the demo runs, so ``import q2ext`` never needs them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .protocol import DemoConfig, quick_config, run
from .report import table, write_all

__all__ = ["DemoConfig", "quick_config", "run", "missing_dependencies", "main"]

_DEPS = ("matplotlib", "torchmetrics", "tqdm")


def missing_dependencies() -> list:
    """The demo's optional dependencies that are not installed."""
    return [m for m in _DEPS if importlib.util.find_spec(m) is None]


def main(cfg: DemoConfig, out_dir, progress: bool = True, log=print) -> dict:
    """Run the protocol, write results.json and the PNGs into out_dir, print the table."""
    missing = missing_dependencies()
    if missing:
        raise ImportError(f"q2ext demo needs {', '.join(missing)}: pip install q2ext[demo]")
    out_dir = Path(out_dir)
    results = run(cfg, out_dir, progress=progress, log=log)
    paths = write_all(results, out_dir)
    log(table(results))
    log("wrote " + ", ".join(str(p) for p in paths.values()) + f", and the models in {out_dir / 'models'}")
    return results
