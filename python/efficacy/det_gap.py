"""Does the detection task have a real quantization gap?  E - A on the test split.

Trains the FP32 detector with the (frozen) GBFusion nodes in place (FP32-LN), then, from
that one checkpoint and with the same QAT schedule and data order per seed, continues it
in FP32 (arm E) and as W<bits>A<bits> LSQ (``q2ext.prepare(model, task.qconfig(bits,
"auto"))``, arm A), picks each run's checkpoint on validation mAP and prints the test
mAP@0.5:0.95 of both and their difference per seed.  A stand-in for the demo protocol
(q2ext.demo.protocol) while it is being written: SGD (Nesterov) with the task's recipe,
cosine decay over the planned steps, no warm-up, early stopping on validation; the QAT
model's quantizers are calibrated on the first 4 training batches.

Measured (2026-12-06, data seed 0, 1 thread on the shared 2-core CPU): at the defaults,
W4A4 E - A = 2.27 / 1.31 / 0.97 (seeds 0/1/2), W3A3 3.91 / 4.67 / 4.83 mAP@0.5:0.95.

    PYTHONPATH=. OMP_NUM_THREADS=1 python python/efficacy/det_gap.py --seeds 0 1 2 --bits 4 3
    (--set neck=24 --set train=2048 ... overrides DetConfig fields; --recipe qat_lr=0.005 the recipe)
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import time

import torch

import q2ext
from q2ext.demo.det import DetConfig, DetTask


def fit(task, model, splits, recipe, epochs, lr, seed, log):
    """SGD + cosine, validation each epoch, early stopping; restores the best checkpoint.
    Returns {"val": best validation score, "test", "test50": test scores there, "seconds",
    "curve": validation score per epoch}."""
    xt, yt = splits["train"]
    xv, yv = splits["val"]
    gen = torch.Generator().manual_seed(seed + 7919)
    steps = max(1, len(xt) // recipe.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                              nesterov=True)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    start = time.perf_counter()
    best, best_state, bad, curve = -1.0, None, 0, []
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for s in range(steps):
            idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            loss = task.loss(model, xt[idx], task.select(yt, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss)
        val = task.evaluate(model, xv, yv)
        curve.append(round(val["score"], 2))
        log(f"    ep {ep + 1}: loss {tot / steps:.3f} val {val['score']:.2f} (map50 {val['map50']:.2f}) "
            f"{time.perf_counter() - start:.0f}s")
        if val["score"] > best:
            best, best_state, bad = val["score"], copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= recipe.patience:
                break
    secs = time.perf_counter() - start
    model.load_state_dict(best_state)
    test = task.evaluate(model, *splits["test"])
    return {"val": best, "test": test["score"], "test50": test["map50"], "seconds": secs, "curve": curve}


def _parse_sets(items):
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[4], help="one A arm per bit width (E is shared)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="DetConfig field=value")
    ap.add_argument("--scene", action="append", default=[], help="SceneConfig field=value")
    ap.add_argument("--recipe", action="append", default=[], help="Recipe field=value")
    ap.add_argument("--no-g", action="store_true", help="skip the FP32 pretrain without LN (arm G's start)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = DetConfig()
    cfg = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, **_parse_sets(args.scene)))
    cfg = dataclasses.replace(cfg, **_parse_sets(args.set))
    rec_field = "quick_recipe" if args.quick else "recipe"
    cfg = dataclasses.replace(cfg, **{rec_field: dataclasses.replace(getattr(cfg, rec_field),
                                                                     **_parse_sets(args.recipe))})
    task = DetTask(cfg)
    recipe = task.recipe(args.quick)
    print(cfg, flush=True)
    t0 = time.perf_counter()
    splits = task.make_splits(args.data_seed, args.quick)
    print(f"data: {time.perf_counter() - t0:.1f}s", flush=True)

    def log(msg):
        print(msg, flush=True)

    fp = task.build_model(0, gbfusion=True, quick=args.quick)
    log("FP32-LN pretrain")
    pre = fit(task, fp, splits, recipe, recipe.fp_epochs, recipe.fp_lr, 0, log)
    log(f"FP32-LN: val {pre['val']:.2f} test {pre['test']:.2f} ({pre['seconds']:.0f}s)")
    if not args.no_g:
        g = task.build_model(0, gbfusion=False, quick=args.quick)
        log("FP32 (no LN) pretrain")
        preg = fit(task, g, splits, recipe, recipe.fp_epochs, recipe.fp_lr, 0, log)
        log(f"FP32: val {preg['val']:.2f} test {preg['test']:.2f} ({preg['seconds']:.0f}s)")
    rows = []
    for seed in args.seeds:
        e_model = copy.deepcopy(fp)
        log(f"seed {seed} E (FP32-LN continued)")
        torch.manual_seed(seed)
        e = fit(task, e_model, splits, recipe, recipe.qat_epochs, recipe.qat_lr, seed, log)
        row = {"seed": seed, "E": e["test"], "E50": e["test50"], "E_s": e["seconds"], "E_curve": e["curve"]}
        for bits in args.bits:
            log(f"seed {seed} A (W{bits}A{bits} LSQ + LN)")
            torch.manual_seed(seed)
            a_model = q2ext.prepare(copy.deepcopy(fp), task.qconfig(bits, "auto"))
            xt = splits["train"][0]
            q2ext.calibrate(a_model, [xt[i:i + recipe.batch_size]
                                      for i in range(0, 4 * recipe.batch_size, recipe.batch_size)])
            a0 = task.evaluate(a_model, *splits["val"])["score"]
            a = fit(task, a_model, splits, recipe, recipe.qat_epochs, recipe.qat_lr, seed, log)
            row.update({f"A{bits}": a["test"], f"E-A{bits}": e["test"] - a["test"], f"A{bits}_50": a["test50"],
                        f"A{bits}_val_epoch0": a0, f"A{bits}_s": a["seconds"], f"A{bits}_curve": a["curve"]})
        rows.append(row)
        log(json.dumps(rows[-1]))
    if not rows:
        return
    for bits in args.bits:
        gaps = torch.tensor([r[f"E-A{bits}"] for r in rows])
        log(f"W{bits}A{bits}: E-A per seed {[round(float(x), 2) for x in gaps]}  mean {gaps.mean():.2f}  "
            f"min {gaps.min():.2f}")
    log(f"FP32-LN test {pre['test']:.2f}; total {time.perf_counter() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": repr(cfg), "pretrain": pre, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
