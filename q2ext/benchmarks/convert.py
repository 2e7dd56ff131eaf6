"""End-to-end latency of converted int8 models against what a user would deploy instead.

Same run, same inputs, batch 1 and 16, paths timed in interleaved rounds
(common.interleaved_medians):

- FP32 eager, and FP32 ``torch.compile`` (Inductor, ``freezing=True``);
- PyTorch's own x86 int8 path: PT2E ``prepare_pt2e`` with ``X86InductorQuantizer``
  (torchao's default static config), calibrated on the same batches, ``convert_pt2e``,
  ``torch.compile`` with freezing (oneDNN int8 kernels);
- onnxruntime (CPU EP) on the QDQ graph ``q2ext.export_onnx`` writes for the QAT model;
- ``q2ext.convert`` with each int8 engine forced (``q2ext``, ``onednn``) and ``auto``
  (per layer the engine measured fastest on this machine at the first forward, which
  runs before the timed region).

Models (random weights; BatchNorm statistics and quantizer steps calibrated on random
data, so activations have realistic ranges): torchvision ResNet-18, the
segmentation_models_pytorch U-Net (ResNet-18 encoder), and that U-Net with Q-GBFusion
nodes in the decoder after ``convert`` (``gbfusion="keep"``, the default: the fused
per-pixel LayerNorm kernel runs; PT2E and the compiled FP32 model have no fusion node, so
their rows there are the plain U-Net's).  W8A8 is LSQ with signed/unsigned per-tensor
activations (from data) and per-channel weights.  The argmax agreement of every
converted model with its fake-quant model is reported too (target >= 99.9 %).
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
import types
import warnings

import torch
from torch import nn

from ..nn.fake_quant import calibrate
from ..nn.fake_quant_layers import QuantConv2d, QuantLinear
from ..nn.gemm_layers import INT_LAYERS
from ..passes.convert import _conv_bn_pairs, convert
from ..passes.export import export_onnx
from ..passes.gb_fusion_fold import calibrate_gbfusion
from ..passes.gb_fusion_insert import insert_gbfusion
from ..passes.prepare import prepare
from ..qconfig import QConfig
from .common import interleaved_medians, machine_info, print_table

W8A8 = dict(w_bits=8, a_bits=8, a_quantizer="lsq")
ENGINES = ("q2ext", "onednn", "auto")


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


def build(make, calib, gbfusion=False, fold=False):
    """(float model, fake-quant W8A8 model, {engine: converted int model}), all in eval mode.
    fold: convert with gbfusion='fold' (the scalar fold) instead of the default 'keep'."""
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
    if fold:
        calibrate_gbfusion(qat, calib)  # the fake-quant reference runs with the constants too
    ints = {e: convert(qat, engine=e, gbfusion="fold" if fold else "keep") for e in ENGINES}
    return fp32, qat, ints


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


def _basic_block_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu_out(out + identity)


def _unshare_relu(model):
    """torchvision's BasicBlock calls one ReLU module twice; the X86InductorQuantizer's
    pattern matcher rejects that ("Input partition has more than one output node"), so
    the PT2E baseline gets a second ReLU module per block (same function)."""
    import torchvision

    for m in model.modules():
        if isinstance(m, torchvision.models.resnet.BasicBlock):
            m.relu_out = nn.ReLU()
            m.forward = types.MethodType(_basic_block_forward, m)
    return model


def pt2e_x86(fp32, calib):
    """PyTorch's x86 int8 path, compiled: (callable, what it is) or (None, why not)."""
    try:
        import torch._inductor.config as inductor_config
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        return None, f"needs torchao ({exc})"
    model = _unshare_relu(copy.deepcopy(fp32))
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (calib[0],), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in calib:
            prepared(b)
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    return torch.compile(converted), "PT2E X86InductorQuantizer + torch.compile"


def _compiled_fp32(fp32):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(copy.deepcopy(fp32))


def _ort_session(qat, x, threads):
    import onnxruntime as ort

    path = os.path.join(tempfile.mkdtemp(prefix="q2ext_bench_"), "model.onnx")
    export_onnx(qat, x[:1], path, dynamic_batch=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: sess.run(None, {name: t.numpy()})


def _engines_used(intm, batch=None):
    """'engine count, ...' over the int layers' choices (for inputs of `batch` rows if given)."""
    used = {}
    for m in intm.modules():
        if isinstance(m, INT_LAYERS):
            for key, e in m.engines.items():
                if batch is None or key.split()[1].startswith(f"{batch}x"):
                    used[e] = used.get(e, 0) + 1
    return ", ".join(f"{e} {n}" for e, n in sorted(used.items()))


def _cases(quick, size):
    cases = [("ResNet-18", _resnet18, False, size)]
    if not quick:
        cases += [("smp U-Net r18", _unet, False, 128), ("U-Net r18 + Q-GBFusion (keep)", _unet, True, 128)]
    return cases


def run(quick: bool = False, min_run_time: float = 0.5, size: int = 96, onnx: bool = True,
        baselines: bool = True, batches=(1, 16)):
    """Run the benchmark; returns (text with the tables, summary records).

    baselines: also time torch.compile FP32 and PT2E x86 int8 (minutes of compilation)."""
    out = [machine_info()]
    print(out[0], flush=True)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    rows, agree_rows, records = [], [], []
    compiled = {}  # float architecture -> (fp32 compiled, pt2e) shared by the U-Net rows
    for name, make, gbf, hw in _cases(quick, size):
        calib = [torch.randn(4, 3, hw, hw, generator=g) for _ in range(4)]
        fp32, qat, ints = build(make, calib, gbf)
        evals = [torch.randn(8, 3, hw, hw, generator=g) for _ in range(1 if quick else 2)]
        with torch.inference_mode():
            for engine, intm in ints.items():
                acc, err = _agreement(qat, intm, evals)
                agree_rows.append([name, engine, _engines_used(intm), f"{sum(e.shape[0] for e in evals)} x 3x{hw}x{hw}",
                                   f"{100 * acc:.3f} %", f"{err:.1e}"])
                records.append(dict(case=f"{name} argmax agreement int8 ({engine}) vs fake quant", value=acc))
                layer_err = _layerwise_error(qat, intm, evals[0])
                agree_rows[-1].append(f"{layer_err:.1e}")
                records.append(dict(case=f"{name} {engine} per-layer max rel. error (teacher-forced)", value=layer_err))
        arch = make.__name__
        if baselines and arch not in compiled:
            compiled[arch] = (_compiled_fp32(fp32), pt2e_x86(fp32, calib))
        for bs in batches:
            x = torch.randn(bs, 3, hw, hw, generator=g)
            paths = [("FP32 eager", fp32)]
            if baselines:
                fp32_c, (pt2e, why) = compiled[arch]
                paths.append(("FP32 torch.compile", fp32_c))
                if pt2e is not None:
                    paths.append(("PT2E x86 int8 + torch.compile", pt2e))
                else:
                    rows.append([name, f"{bs}x3x{hw}x{hw}", "PT2E x86 int8", "n/a", why])
            if onnx:
                paths.append(("onnxruntime QDQ (export_onnx)", _ort_session(qat, x, threads)))
            paths += [(f"q2ext convert, engine={e}", ints[e]) for e in ENGINES]
            with torch.inference_mode():
                for _, fn in paths:  # compile, and let engine=auto measure, outside the timed region
                    fn(x)
                ts = interleaved_medians([functools.partial(fn, x) for _, fn in paths], min_run_time)
            base = ts[0]
            for (label, _), t in zip(paths, ts):
                extra = f" ({_engines_used(ints['auto'], bs)})" if label.endswith("auto") else ""
                rows.append([name, f"{bs}x3x{hw}x{hw}", label + extra, f"{t * 1e3:.2f}", f"{base / t:.2f}x"])
                records.append(dict(case=f"{name} b{bs} {hw}px {label}", ms=t * 1e3, speedup_vs_fp32=base / t))
    out.append(print_table(rows, ["model", "input", "path", "ms", "speedup vs FP32 eager"]))
    out.append(print_table(agree_rows, ["model", "engine", "layers per engine", "eval inputs",
                                        "argmax agreement int8 vs fake quant", "max rel. L2 error",
                                        "per-layer max rel. error (teacher-forced)"]))
    return "\n\n".join(out), records
