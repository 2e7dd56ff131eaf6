"""The demo's deployment check: does a QAT model of the demo task survive ``q2ext.convert``
into real int8 inference?

Interface: :func:`run_deploy` (task, config, recipe, the FP32-LN checkpoint of one seed, the
splits) returns a dict of numbers; :func:`table` renders it.  From that seed's FP32-LN
checkpoint: arm B's build (LSQ + Q-GBFusion, controller on) at W8A8 with plain LSQ
activation quantizers (see DEPLOY_QUANTIZER), fine-tuned for
``cfg.deploy_epochs`` epochs on the task's QAT schedule; then, on the test split:

* ``score_qat``: the trained fake-quant model (live per-pixel LayerNorm in the nodes);
* ``score_int8_keep``: ``q2ext.convert(model, gbfusion="keep")`` - int8 convs, BN folded,
  the fusion nodes still normalising every pixel; ``agreement_keep``: share of output
  positions whose argmax it shares with the trained fake-quant model;
* ``score_fake_quant``: the fake-quant model with its fusion nodes frozen to calibrated
  constants (``q2ext.calibrate_gbfusion``, the paper's Eq. 11 fold);
* ``score_int8``: ``q2ext.convert`` of that model (the default, folded); ``agreement``: its
  argmax agreement with the folded fake-quant model, ``agreement_vs_qat`` with the trained one.

Agreement is over the argmax of dim 1 of the raw model outputs (classes per pixel for
segmentation); None when the outputs are not one tensor.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

import q2ext

from . import arms as arms_mod
from .train import fit

ARM = "B"
# LSQ with the sign read from the data: q2ext.convert has an int8 path for (signed or
# unsigned) LSQ grids but none yet for LSQ+'s learned zero point.
DEPLOY_QUANTIZER = "lsq"


@torch.no_grad()
def _argmax_agreement(a, b, images, batch_size=128):
    same = total = 0
    a.eval()
    b.eval()
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        oa, ob = a(x), b(x)
        if not (isinstance(oa, torch.Tensor) and isinstance(ob, torch.Tensor) and oa.dim() >= 2):
            return None
        pa, pb = oa.argmax(1), ob.argmax(1)
        same += int((pa == pb).sum())
        total += pa.numel()
    return 100.0 * same / max(total, 1)


def run_deploy(task, cfg, recipe, fp_ln, splits, seed: int, progress=True, log=print) -> dict:
    """Train the W8A8 model of `seed`, convert it, and return the numbers above."""
    xt, _ = splits["train"]
    xs, ys = splits["test"]
    bs = recipe.batch_size
    calib = [xt[i * bs:(i + 1) * bs] for i in range(cfg.calib_batches)]
    ctx = {"task": task, "cfg": cfg, "fp_ln": fp_ln, "fp_plain": None, "calib": calib,
           "qconfig_ln": arms_mod.qconfig(task, fp_ln, 8, DEPLOY_QUANTIZER, calib[0])}
    model, _ = arms_mod.build_arm(ARM, ctx)
    short = dataclasses.replace(recipe, evals_per_epoch=1)
    hist = fit(model, task, splits, short, lr=recipe.qat_lr, epochs=cfg.deploy_epochs, seed=seed,
               desc=f"seed {seed} W8A8 for deployment", progress=progress)
    model.eval()
    frozen = copy.deepcopy(model)
    q2ext.calibrate_gbfusion(frozen, calib)  # the constants convert() calibrates, on the same batches
    start = time.perf_counter()
    int8 = q2ext.convert(frozen)  # reuses the constants just calibrated: the same fold as convert(model, calib)
    convert_s = time.perf_counter() - start
    keep = q2ext.convert(model, gbfusion="keep")

    def score(m):
        return task.evaluate(m, xs, ys)["score"]

    out = {
        "seed": seed, "bits": 8, "arm": ARM, "epochs": cfg.deploy_epochs, "steps_run": hist["steps_run"],
        "split": "test", "score_name": task.score_name,
        "score_qat": score(model),
        "score_int8_keep": score(keep),
        "agreement_keep": _argmax_agreement(keep, model, xs),
        "score_fake_quant": score(frozen),
        "score_int8": score(int8),
        "agreement": _argmax_agreement(int8, frozen, xs),
        "agreement_vs_qat": _argmax_agreement(int8, model, xs),
        "convert_seconds": convert_s,
        "int8_layers": sum(isinstance(m, (q2ext.nn.Int8Conv2d, q2ext.nn.Int8Linear)) for m in int8.modules()),
    }
    log(f"deployment (W8A8, seed {seed}): {task.score_name} QAT {out['score_qat']:.2f} -> int8 "
        f"{out['score_int8_keep']:.2f} (fusion LayerNorm kept), {out['score_int8']:.2f} (folded to constants, Eq. 11)")
    return out


def _pct(v):
    return "-" if v is None else f"{v:.2f} %"


def table(dep: dict) -> str:
    """The deployment section of the demo report (markdown)."""
    s = dep["score_name"]
    return "\n".join([
        f"\nDeployment check (W8A8 LSQ + Q-GBFusion, seed {dep['seed']}, {dep['epochs']} epoch(s) from FP32-LN; "
        f"q2ext.convert -> {dep['int8_layers']} int8 layers; {dep['split']} split):",
        f"| model | {s} | argmax agreement |",
        "|---|---|---|",
        f"| fake quant, as trained | {dep['score_qat']:.2f} | |",
        f"| int8, `convert(gbfusion=\"keep\")` (per-pixel LayerNorm kept) | {dep['score_int8_keep']:.2f} | "
        f"{_pct(dep['agreement_keep'])} with the fake-quant model as trained |",
        f"| fake quant, fusion folded to calibrated constants (Eq. 11) | {dep['score_fake_quant']:.2f} | |",
        f"| int8, `convert(calib)` (folded, the default) | {dep['score_int8']:.2f} | {_pct(dep['agreement'])} with "
        f"the folded fake-quant model, {_pct(dep['agreement_vs_qat'])} with the one as trained |",
    ])
