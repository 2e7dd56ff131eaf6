"""The demo's deployment check: does a QAT model of the demo task survive ``q2ext.convert``
into int8 inference, and what does the paper's fold of the fusion LayerNorm cost?

Interface: :func:`run_deploy` (task, config, recipe, the FP32-LN checkpoint of one seed, the
splits) returns a dict of numbers; :func:`table` renders it.  From that seed's FP32-LN
checkpoint: arm B's build (LSQ + Q-GBFusion, controller on) at W8A8 with the arms'
activation-quantizer policy (``cfg.quantizer``), fine-tuned for ``cfg.deploy_epochs`` epochs
on the task's QAT schedule.  Then, on the test split, one row per model:

* the trained fake-quant model (live per-pixel LayerNorm in the nodes), and
  ``q2ext.convert(model)`` (the default, ``gbfusion="keep"``: the nodes still normalise);
* for each fold mode (App. 7.1: "scalar", Eq. 11, and "per_channel"), with and without
  the short fine-tune after removing LN (``q2ext.FinetuneSpec``: task loss, Adam at the
  paper's lr 2e-5, ``cfg.deploy_finetune_steps`` steps cycling over
  ``cfg.deploy_finetune_batches`` training batches): the folded fake-quant model and its
  int8 conversion.

Every row gives the task score, its change against the trained fake-quant model, and the
argmax agreement of its class logits (``task.class_logits``; per pixel for segmentation,
per cell and level for detection) with the trained model and, for int8 rows, with the
fake-quant model it implements.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

from ..nn.gemm_layers import Int8Conv2d, Int8Linear
from ..passes.convert import convert
from ..passes.gb_fusion_fold import FOLD_MODES, FinetuneSpec, fold_gbfusion
from . import arms as arms_mod
from .train import fit

ARM = "B"
FINETUNE_LR = 2e-5  # App. 7.1


@torch.no_grad()
def _class_argmax(task, model, images, batch_size=128) -> torch.Tensor:
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        preds += [t.argmax(1).flatten() for t in task.class_logits(model(images[i:i + batch_size]))]
    return torch.cat(preds)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100.0 * float((a == b).float().mean())


def _finetune_spec(task, cfg, recipe, splits) -> FinetuneSpec:
    xt, yt = splits["train"]
    bs, n = recipe.batch_size, min(cfg.deploy_finetune_batches, max(1, len(xt) // recipe.batch_size))
    batches = []
    for i in range(n):
        index = torch.arange(i * bs, min((i + 1) * bs, len(xt)))
        batches.append((xt[index.to(xt.device)], task.select(yt, index)))
    return FinetuneSpec(lambda m, b: task.loss(m, b[0], b[1]), batches, steps=cfg.deploy_finetune_steps,
                        lr=FINETUNE_LR)


def run_deploy(task, cfg, recipe, fp_ln, splits, seed: int, progress=True, log=print) -> dict:
    """Train the W8A8 model of `seed`, fold and convert it every way, return the rows above."""
    xt, _ = splits["train"]
    xs, ys = splits["test"]
    bs = recipe.batch_size
    calib = [xt[i * bs:(i + 1) * bs] for i in range(cfg.calib_batches)]
    ctx = {"task": task, "cfg": cfg, "fp_ln": fp_ln, "fp_plain": None, "calib": calib,
           "qconfig_ln": arms_mod.qconfig(task, fp_ln, 8, cfg.quantizer, calib[0])}
    model, _ = arms_mod.build_arm(ARM, ctx)
    short = dataclasses.replace(recipe, evals_per_epoch=1)
    hist = fit(model, task, splits, short, lr=recipe.qat_lr, epochs=cfg.deploy_epochs, seed=seed,
               desc=f"seed {seed} W8A8 for deployment", progress=progress)
    model.eval()
    trained = _class_argmax(task, model, xs)
    base = task.evaluate(model, xs, ys)["score"]
    rows = []

    def add(name, m, twin_pred=None, seconds=None):
        pred = _class_argmax(task, m, xs)
        score = task.evaluate(m, xs, ys)["score"]
        rows.append({"name": name, "score": score, "delta": score - base, "agreement_vs_trained":
                     _agreement(pred, trained), "agreement_vs_fake_quant": None if twin_pred is None
                     else _agreement(pred, twin_pred), "seconds": seconds})
        return pred

    add("fake quant, as trained", model)
    start = time.perf_counter()
    keep = convert(model, gbfusion="keep")
    add('int8, convert() (gbfusion="keep", the default)', keep, trained, time.perf_counter() - start)
    spec = _finetune_spec(task, cfg, recipe, splits)
    for mode in FOLD_MODES:
        for ft in (None, spec):
            label = f"fold {mode}" + (f" + fine-tune ({spec.steps} steps)" if ft else "")
            folded = copy.deepcopy(model)
            start = time.perf_counter()
            fold_gbfusion(folded, calib, fold_shift="keep", mode=mode, finetune=ft)
            secs = time.perf_counter() - start
            folded.eval()
            twin = add(f"{label}, fake quant", folded, seconds=secs)
            add(f"{label}, int8", convert(folded, gbfusion="fold"), twin)
    out = {"seed": seed, "bits": 8, "arm": ARM, "quantizer": cfg.quantizer, "epochs": cfg.deploy_epochs,
           "steps_run": hist["steps_run"], "split": "test", "score_name": task.score_name,
           "finetune": {"steps": spec.steps, "batches": len(spec.batches), "lr": spec.lr}, "rows": rows,
           "int8_layers": sum(isinstance(m, (Int8Conv2d, Int8Linear)) for m in keep.modules())}
    log(f"deployment (W8A8, seed {seed}): {task.score_name} fake quant {base:.2f} -> int8 "
        f"{rows[1]['score']:.2f} (convert default), folds " + ", ".join(f"{r['score']:.2f}" for r in rows[2:]))
    return out


def _pct(v):
    return "" if v is None else f"{v:.2f} %"


def table(dep: dict) -> str:
    """The deployment section of the demo report (markdown)."""
    s, ft = dep["score_name"], dep["finetune"]
    lines = [f"\nDeployment check (W8A8 {dep['quantizer']} + Q-GBFusion, seed {dep['seed']}, {dep['epochs']} "
             f"epoch(s) from FP32-LN; q2ext.convert -> {dep['int8_layers']} int8 layers; {dep['split']} split; "
             f"fine-tune: Adam lr {ft['lr']:g}, {ft['steps']} steps over {ft['batches']} training batches):",
             f"| model | {s} | change | argmax agreement with the trained model | with its fake-quant model | "
             "fold (+ fine-tune) s |", "|---|---|---|---|---|---|"]
    for r in dep["rows"]:
        secs = "" if r["seconds"] is None or r["name"].startswith("int8") else f"{r['seconds']:.1f}"
        lines.append(f"| {r['name']} | {r['score']:.2f} | {r['delta']:+.2f} | {_pct(r['agreement_vs_trained'])} | "
                     f"{_pct(r['agreement_vs_fake_quant'])} | {secs} |")
    return "\n".join(lines)
