"""One exploration run of the ``q2ext demo`` protocol with settings changed; appends a record
to python/efficacy/results.jsonl (or --log).  Used to find, within the paper's method, the
settings under which Q² works (bench/RESULTS.md, demo section, lists what was tried).

    PYTHONPATH=. python python/efficacy/run.py --tag eta --arms E,A,B --seeds 0 \\
        --cfg gbf_eta=0.2 --spec widths="(8,12,16,24,32)" --recipe qat_lr=5e-4

--task seg|det; --cfg sets DemoConfig fields, --spec SegSpec fields (DetConfig with --task det),
--data UltrasoundConfig fields (SceneConfig with --task det), --recipe
Recipe fields; values are Python literals.  Selection is on validation only: the record keeps
the test scores too, but the sweep scripts choose settings by validation scores.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _pairs(items):
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _mean(xs):
    return sum(xs) / len(xs)


def record(results: dict) -> dict:
    """The compact numbers of a run: per arm test and val-best per seed, paired deltas, premise."""
    summ = results["summary"]
    rec = {"arms": {a: {"test": r["score_per_seed"], "val": r["val_best_per_seed"], "steps": r["steps_run"],
                        "to_target": r.get("steps_to_target"), "area": r.get("area"),
                        "alpha": r.get("final_alpha_per_seed"),
                        "aux": [_mean(results["seeds"][s][a].get("aux") or [0.0]) for s in results["seeds"]]}
                    for a, r in summ.items()},
           "paired": {k: {"mean": v["mean"], "per_seed": v["per_seed"]} for k, v in results["paired"].items()},
           "premise": {a: {"ratio": p["balance_ratio"], "deep_over_shallow": p["deep_over_shallow"],
                           "per_node": [(n["balance_ratio"], n["deep_over_shallow"]) for n in p["per_node"]]}
                       for a, p in results["premise"].items() if a != "start"},
           "premise_start": {a: {"ratio": p["balance_ratio"], "deep_over_shallow": p["deep_over_shallow"],
                                 "per_node": [(n["balance_ratio"], n["deep_over_shallow"]) for n in p["per_node"]]}
                             for a, p in results["premise"]["start"].items()},
           "grids": {s: r.get("grids") for s, r in list(results["seeds"].items())[:1]},
           "wall_seconds": results["wall_seconds"]}
    return rec


def main(argv=None) -> int:
    from q2ext.demo.config import DemoConfig
    from q2ext.demo.protocol import run
    from q2ext.demo.det.task import DetTask
    from q2ext.demo.seg.task import SegSpec, SegTask

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True)
    p.add_argument("--task", choices=("seg", "det"), default="seg")
    p.add_argument("--arms", default="E,A,B,C,G")
    p.add_argument("--seeds", default="0")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cfg", action="append")
    p.add_argument("--spec", action="append")
    p.add_argument("--data", action="append")
    p.add_argument("--recipe", action="append")
    p.add_argument("--log", default=str(HERE / "results.jsonl"))
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec_changes, data_changes = _pairs(args.spec), _pairs(args.data)
    if args.task == "seg":
        spec = SegSpec()
        if data_changes:
            spec_changes["data"] = dataclasses.replace(spec.data, **data_changes)
        task = SegTask(dataclasses.replace(spec, **spec_changes))
    else:
        task = DetTask()
        if data_changes:
            spec_changes["scene"] = dataclasses.replace(task.cfg.scene, **data_changes)
        task = DetTask(**spec_changes)
    cfg = DemoConfig(seeds=tuple(int(s) for s in args.seeds.split(",")), bits=args.bits,
                     arms=tuple(args.arms.split(",")), deploy=False, save_models=False,
                     recipe=_pairs(args.recipe), **_pairs(args.cfg))
    start = time.time()
    results = run(cfg, HERE / "out", progress=args.progress, log=lambda *a: print(*a, file=sys.stderr),
                  task=task)
    rec = {"tag": args.tag, "task": args.task, "when": time.strftime("%Y-%m-%d %H:%M"), "bits": args.bits, "seeds": list(cfg.seeds),
           "cfg": _pairs(args.cfg), "spec": _pairs(args.spec), "data": data_changes, "recipe": _pairs(args.recipe),
           "threads": args.threads, **record(results), "elapsed": time.time() - start}
    with open(args.log, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
    a = rec["arms"]
    line = " ".join(f"{k}={sum(v['test']) / len(v['test']):.2f}(val {sum(v['val']) / len(v['val']):.2f})"
                    for k, v in a.items())
    print(f"[{args.tag}] {line} | " + " ".join(f"{k}:{v['mean']:+.2f}" for k, v in rec["paired"].items())
          + f" | {rec['elapsed']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
