"""The demo's deployment check (issue #6): does a QAT model of the demo task survive
``q2ext.convert`` into real int8 inference?

From the first seed's FP32 model: W8A8 LSQ QAT with Q-GBFusion at the decoder fusion
nodes (the same build as the ``qat+gbf`` variant, at 8 bits), fine-tuned for
``cfg.deploy_epochs``; then, on the validation set:

* ``mdice_qat``: the trained fake-quant model (live per-pixel LayerNorm in the nodes);
* ``mdice_int8_keep``: ``q2ext.convert(model, gbfusion="keep")`` - int8 convs, BN folded,
  the fusion nodes still normalising every pixel; ``agreement_keep``: share of validation
  pixels whose argmax class it shares with the trained fake-quant model;
* ``mdice_fake_quant``: the fake-quant model with its fusion nodes frozen to calibrated
  constants (``q2ext.calibrate_gbfusion``, the paper's Eq. 11 fold);
* ``mdice_int8``: ``q2ext.convert(model, calib)`` (the default, folded);
  ``agreement``: its argmax agreement with that frozen fake-quant model, and
  ``agreement_vs_qat`` with the trained one.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

import q2ext

from .train import build_variant, fit, mdice

VARIANT = "qat+gbf"


@torch.no_grad()
def _argmax_agreement(a, b, images, batch_size=128) -> float:
    same = total = 0
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        pa, pb = a(x).argmax(1), b(x).argmax(1)
        same += int((pa == pb).sum())
        total += pa.numel()
    return 100.0 * same / max(total, 1)


def run_deploy(cfg, fp32, data, seed: int, progress=True, log=print) -> dict:
    """Train the W8A8 model of `seed`, convert it, and return the numbers above."""
    cfg8 = dataclasses.replace(cfg, bits=8)
    xt, _, xv, yv = data
    example = xt[:2]
    calib = [xt[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.calib_batches)]
    torch.manual_seed(seed)
    model = build_variant(VARIANT, fp32, cfg8, example, calib)
    hist = fit(model, data, cfg8, epochs=cfg.deploy_epochs, lr=cfg.qat_lr, patience=cfg.patience, seed=seed,
               desc=f"seed {seed} W8A8 for deployment", progress=progress)
    model.eval()
    frozen = copy.deepcopy(model)
    q2ext.calibrate_gbfusion(frozen, calib)  # the constants convert() calibrates, on the same batches
    start = time.perf_counter()
    int8 = q2ext.convert(frozen, gbfusion="fold")  # reuses the constants just calibrated: the same fold as convert(model, calib)
    convert_s = time.perf_counter() - start
    keep = q2ext.convert(model, gbfusion="keep")
    out = {
        "seed": seed, "bits": 8, "variant": VARIANT, "epochs_run": hist["epochs_run"],
        "mdice_qat": mdice(model, xv, yv),
        "mdice_int8_keep": mdice(keep, xv, yv),
        "agreement_keep": _argmax_agreement(keep, model, xv),
        "mdice_fake_quant": mdice(frozen, xv, yv),
        "mdice_int8": mdice(int8, xv, yv),
        "agreement": _argmax_agreement(int8, frozen, xv),
        "agreement_vs_qat": _argmax_agreement(int8, model, xv),
        "convert_seconds": convert_s,
        "int8_layers": sum(isinstance(m, (q2ext.nn.Int8Conv2d, q2ext.nn.Int8Linear)) for m in int8.modules()),
    }
    log(f"deployment (W8A8, seed {seed}): mDICE QAT {out['mdice_qat']:.2f} -> int8 {out['mdice_int8_keep']:.2f} "
        f"(fusion LayerNorm kept; argmax agreement {out['agreement_keep']:.2f} % of pixels), "
        f"{out['mdice_int8']:.2f} (folded to constants, Eq. 11)")
    return out


def table(dep: dict) -> str:
    """The deployment section of the demo report (markdown)."""
    return "\n".join([
        f"\nDeployment check (W8A8 LSQ + Q-GBFusion, seed {dep['seed']}, {dep['epochs_run']} epochs; "
        f"q2ext.convert -> {dep['int8_layers']} int8 layers):",
        "| model | validation mDICE | argmax agreement (pixels) |",
        "|---|---|---|",
        f"| fake quant, as trained | {dep['mdice_qat']:.2f} | |",
        f"| int8, `convert(gbfusion=\"keep\")` (per-pixel LayerNorm kept) | {dep['mdice_int8_keep']:.2f} | "
        f"{dep['agreement_keep']:.2f} % with the fake-quant model as trained |",
        f"| fake quant, fusion folded to calibrated constants (Eq. 11) | {dep['mdice_fake_quant']:.2f} | |",
        f"| int8, `convert(calib)` (folded, the default) | {dep['mdice_int8']:.2f} | {dep['agreement']:.2f} % with "
        f"the folded fake-quant model, {dep['agreement_vs_qat']:.2f} % with the one as trained |",
    ])
