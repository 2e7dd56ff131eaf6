"""The demo's deployment check (issue #6): does a QAT model of the demo task survive
``q2ext.convert`` into real int8 inference?

From the first seed's FP32 model: W8A8 LSQ QAT with Q-GBFusion at the decoder fusion
nodes (the same build as the ``qat+gbf`` variant, at 8 bits), fine-tuned for
``cfg.deploy_epochs``; then, on the validation set:

* ``mdice_qat``: the trained fake-quant model as it trains (live per-pixel LayerNorm in
  the GBFusion nodes);
* ``mdice_fake_quant``: the same model with its fusion nodes frozen to the calibrated
  deployment constants (``q2ext.calibrate_gbfusion``) - what the int8 model implements;
* ``mdice_int8``: ``q2ext.convert(model, calib)`` (int8 convs, BN folded, FixedFusion);
* ``agreement``: share of validation pixels whose argmax class is the same in the int8
  and the frozen fake-quant model (and ``agreement_vs_qat`` against the live one).
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
    int8 = q2ext.convert(model, calib)
    convert_s = time.perf_counter() - start
    out = {
        "seed": seed, "bits": 8, "variant": VARIANT, "epochs_run": hist["epochs_run"],
        "mdice_qat": mdice(model, xv, yv),
        "mdice_fake_quant": mdice(frozen, xv, yv),
        "mdice_int8": mdice(int8, xv, yv),
        "agreement": _argmax_agreement(int8, frozen, xv),
        "agreement_vs_qat": _argmax_agreement(int8, model, xv),
        "convert_seconds": convert_s,
        "int8_layers": sum(isinstance(m, (q2ext.nn.Int8Conv2d, q2ext.nn.Int8Linear)) for m in int8.modules()),
    }
    log(f"deployment (W8A8, seed {seed}): mDICE QAT {out['mdice_qat']:.2f}, frozen fusion constants "
        f"{out['mdice_fake_quant']:.2f}, int8 {out['mdice_int8']:.2f}; argmax agreement int8 vs fake quant "
        f"{out['agreement']:.2f} % of pixels")
    return out


def table(dep: dict) -> str:
    """The deployment section of the demo report (markdown)."""
    return "\n".join([
        f"\nDeployment check (W8A8 LSQ + Q-GBFusion, seed {dep['seed']}, {dep['epochs_run']} epochs; "
        f"q2ext.convert -> {dep['int8_layers']} int8 layers):",
        "| model | validation mDICE | argmax agreement with the int8 model (pixels) |",
        "|---|---|---|",
        f"| fake quant, live LayerNorm (as trained) | {dep['mdice_qat']:.2f} | {dep['agreement_vs_qat']:.2f} % |",
        f"| fake quant, frozen fusion constants | {dep['mdice_fake_quant']:.2f} | {dep['agreement']:.2f} % |",
        f"| int8 (q2ext.convert) | {dep['mdice_int8']:.2f} | |",
    ])
