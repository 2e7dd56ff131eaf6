"""End-to-end latency of converted int8 models: ``q2ext.convert`` output vs the
FP32 eager model and the fake-quant (QAT, eval) model, plus the converted model's argmax
agreement with the fake-quant model (target >= 99 %).

Models (random weights; BatchNorm statistics and quantizer steps calibrated on random
data, so the activations have realistic ranges): torchvision ResNet-18 at batch 1 and 16,
and a segmentation_models_pytorch U-Net (ResNet-18 encoder, Q-GBFusion nodes in the
decoder, calibrated) at 1x3x128x128.  All paths run under torch.inference_mode in the
same process; W8A8 is LSQ with signed/unsigned per-tensor activations (decided from data)
and per-channel weights.  ``onnx=True`` adds onnxruntime on the exported QDQ graph
(models without GBFusion only) as an external int8 reference.
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
import warnings

import torch

from ..nn.fake_quant import calibrate
from ..nn.fake_quant_layers import QuantConv2d, QuantLinear
from ..passes.convert import _conv_bn_pairs, convert
from ..passes.gb_fusion_fold import calibrate_gbfusion
from ..passes.gb_fusion_insert import insert_gbfusion
from ..passes.prepare import prepare
from ..qconfig import QConfig
from ..passes.export import export_onnx
from .common import interleaved_medians, machine_info, print_table

W8A8 = dict(w_bits=8, a_bits=8, a_quantizer="lsq")


def _resnet18():
    import torchvision

    return torchvision.models.resnet18(weights=None)


def _unet():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=4)


@torch.no_grad()
def _calibrate_bn(model, batches):
    """BatchNorm running statistics = the average over `batches` (a calibrated float model)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    for b in batches:
        model(b)
    return model.eval()


def build(make, calib, gbfusion=False):
    """(float model, fake-quant W8A8 model, converted int model), all in eval mode."""
    torch.manual_seed(0)
    fp32 = _calibrate_bn(make(), calib)
    src = copy.deepcopy(fp32)
    if gbfusion:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = insert_gbfusion(src, example_inputs=(calib[0],)).model
    qat = prepare(src, QConfig(**W8A8))
    calibrate(qat, calib)
    qat.eval()
    if gbfusion:
        calibrate_gbfusion(qat, calib)  # the fake-quant reference runs with the constants too
    return fp32, qat, convert(qat)


def _agreement(fq, intm, inputs):
    """(argmax agreement, max relative L2 error) of intm vs fq over `inputs`."""
    same = total = 0
    worst = 0.0
    for x in inputs:
        a, b = fq(x), intm(x)
        same += int((a.argmax(1) == b.argmax(1)).sum())
        total += a.argmax(1).numel()
        worst = max(worst, float((b - a).norm() / a.norm()))
    return same / total, worst


def _layerwise_error(qat, intm, x):
    """Max relative L2 error of each int layer fed the fake-quant layer's own input (teacher
    forcing), against the fake-quant layer's output (+ its BatchNorm where convert folded
    it).  End to end, fp32 rounding that differs between the two models flips a few
    activations at exact rounding ties, and a random-weight network amplifies each flip
    layer by layer; this isolates what convert itself changes."""
    pairs, fq_mods, int_mods = _conv_bn_pairs(qat), dict(qat.named_modules()), dict(intm.named_modules())
    seen, hooks = {}, []

    def record(name):
        def hook(mod, args, out):
            seen.setdefault(name, (args[0], out))  # the first call (shared layers run again)
        return hook

    for name, m in fq_mods.items():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            hooks.append(m.register_forward_hook(record(name)))
    qat(x)
    for h in hooks:
        h.remove()
    worst = 0.0
    for name, (inp, out) in seen.items():
        ref = fq_mods[pairs[name]](out) if name in pairs else out
        worst = max(worst, float((int_mods[name](inp) - ref).norm() / ref.norm()))
    return worst


def _ort_session(qat, x, threads):
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(prefix="q2ext_bench_"), "model.onnx")
    export_onnx(qat, x[:1], path, dynamic_batch=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: sess.run(None, {name: t.numpy()})


def run(quick: bool = False, min_run_time: float = 0.5, size: int = 96, onnx: bool = False):
    """Run the benchmark; returns (text with the tables, summary records)."""
    out = [machine_info()]
    print(out[0], flush=True)
    g = torch.Generator().manual_seed(0)
    cases = [("ResNet-18", _resnet18, False, [1] if quick else [1, 16], size, 8 if quick else 32)]
    if not quick:
        cases.append(("U-Net r18 (Q-GBFusion)", _unet, True, [1], 128, 4))
    rows, agree_rows, records = [], [], []
    threads = torch.get_num_threads()
    built = {}
    for name, make, gbf, _, hw, n_eval in cases:
        calib = [torch.randn(4, 3, hw, hw, generator=g) for _ in range(4)]
        built[name] = build(make, calib, gbf)
        fp32, qat, intm = built[name]
        evals = [torch.randn(min(n_eval, 8), 3, hw, hw, generator=g) for _ in range(max(1, n_eval // 8))]
        with torch.inference_mode():
            acc, err = _agreement(qat, intm, evals)
            acc_fp, _ = _agreement(fp32, qat, evals)
            layer_err = _layerwise_error(qat, intm, evals[0])
        unit = "images" if name.startswith("ResNet") else "pixels"
        agree_rows.append([name, f"{sum(e.shape[0] for e in evals)} x 3x{hw}x{hw}", f"{100 * acc:.2f} % of {unit}",
                           f"{err:.1e}", f"{layer_err:.1e}", f"{100 * acc_fp:.2f} %"])
        records.append(dict(case=f"{name} argmax agreement int8 vs fake quant", value=acc))
    for name, make, gbf, batches, hw, _ in cases:
        fp32, qat, intm = built[name]
        for bs in batches:
            x = torch.randn(bs, 3, hw, hw, generator=g)
            paths = [("FP32 eager", fp32), ("fake quant W8A8 (QAT eval)", qat), ("q2ext convert W8A8 (int8)", intm)]
            if onnx and not gbf:
                paths.append(("onnxruntime QDQ W8A8 (export_onnx)", _ort_session(qat, x, threads)))
            with torch.inference_mode():  # the paths in interleaved rounds (common.interleaved_medians)
                ts = interleaved_medians([functools.partial(fn, x) for _, fn in paths], min_run_time)
            base = ts[0]
            for (label, _), t in zip(paths, ts):
                rows.append([name, f"{bs}x3x{hw}x{hw}", label, f"{t * 1e3:.2f}", f"{base / t:.2f}x"])
                records.append(dict(case=f"{name} b{bs} {hw}px {label}", ms=t * 1e3, speedup_vs_fp32=base / t))
    out.append(print_table(rows, ["model", "input", "path", "ms", "speedup vs FP32 eager"]))
    out.append(print_table(agree_rows, ["model", "eval inputs", "argmax agreement int8 vs fake quant",
                                        "max rel. L2 error", "per-layer max rel. error (teacher-forced)",
                                        "fake quant vs FP32 agreement"]))
    return "\n\n".join(out), records
