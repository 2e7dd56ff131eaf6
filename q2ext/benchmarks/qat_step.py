"""W4A4 QAT training-step benchmark: time and peak memory of one forward + backward + SGD step.

Models: torchvision ResNet-18 (batch 16, 3x96x96, 1000 classes), a
segmentation-models-pytorch U-Net with a ResNet-18 encoder (batch 8, 3x128x128, 2
classes), and for the memory table a torchvision FCOS detector (ResNet-50 FPN, 2 images
of 3x128x128, 3 classes, its own losses).  Variants, all built and measured in this
process, all W4A4 on every Conv2d/Linear (per-output-channel weight scales, per-tensor
input scales, LSQ initialisation):

- FP32: the float model, eager and under ``torch.compile``;
- q2ext: ``q2ext.prepare`` (first/last layer also 4 bits here, for a like-for-like count),
  eager and under ``torch.compile``;
- naive LSQ: the LSQ code most projects carry (grad-scale trick, clamp, round with STE),
  eager and under ``torch.compile``;
- PyTorch learnable: the same layers with ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``.

Every quantized variant keeps the first layer's input step (the network input) fixed after
its data initialisation, q2ext's default (``QConfig.freeze_network_input``); the row
"q2ext, network-input step learned" shows what learning it costs (the first conv's
backward-data pass).

Time: the median over interleaved rounds of ``median_seconds`` (the machine's other load
shifts all variants of a round alike); ratios are taken within a round, compiled variants
against the compiled FP32 step.  Memory: ``common.peak_memory_bytes`` (torch.profiler's
record of every allocation) of one step, gradients freed before it starts: activations,
gradients and temporaries, not the parameters and optimizer state the step starts with.
``profile`` breaks one step of FP32 and q2ext down by operator family (self CPU time).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import QConfig, prepare
from .common import (import_cpp_extension_quietly, machine_info, median_seconds, peak_memory_bytes, print_table,
                     quiet_profile)

BITS = 4
W_QN, W_QP = 2 ** (BITS - 1), 2 ** (BITS - 1) - 1


# ---------------------------------------------------------------------------- baselines

class BaselineQuantLayer(nn.Module):
    """A float Conv2d/Linear with fake-quantized input and weight, the way users write it.

    impl: ``"torch"`` (ATen learnable fake-quant ops) or ``"naive"`` (pure-PyTorch LSQ).
    The input scale and grid sign are initialised eagerly from the first batch (LSQ rule).
    """

    def __init__(self, layer: nn.Module, impl: str, learn_input_step: bool = True):
        super().__init__()
        self.layer, self.impl = layer, impl
        w = layer.weight.detach()
        c = w.shape[0]
        per_ch = w.abs().reshape(c, -1).mean(dim=1)
        self.w_scale = nn.Parameter(2 * per_ch / math.sqrt(W_QP))
        self.a_scale = nn.Parameter(torch.ones(1), requires_grad=learn_input_step)
        self.register_buffer("w_zp", torch.zeros(c))
        self.register_buffer("a_zp", torch.zeros(1))
        self.a_levels = (W_QN, W_QP)
        self.initialised = False
        self.g_w = 1.0 / math.sqrt(w[0].numel() * W_QP)

    def _init(self, x):
        with torch.no_grad():
            signed = bool(x.min() < 0)
            self.a_levels = (W_QN, W_QP) if signed else (0, 2 ** BITS - 1)
            self.a_scale.fill_(2 * x.abs().mean().item() / math.sqrt(self.a_levels[1]))
        self.initialised = True

    def forward(self, x):
        if not self.initialised:
            self._init(x)
        qn, qp = self.a_levels
        g_a = 1.0 / math.sqrt(x[0].numel() * qp)
        w = self.layer.weight
        if self.impl == "torch":
            xq = torch._fake_quantize_learnable_per_tensor_affine(x, self.a_scale, self.a_zp, -qn, qp, g_a)
            wq = torch._fake_quantize_learnable_per_channel_affine(w, self.w_scale, self.w_zp, 0, -W_QN, W_QP,
                                                                   self.g_w)
        else:
            xq = naive_lsq(x, self.a_scale, g_a, qn, qp)
            wq = naive_lsq(w, self.w_scale.reshape(-1, *([1] * (w.dim() - 1))), self.g_w, W_QN, W_QP)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(xq, wq, self.layer.bias)
        return F.linear(xq, wq, self.layer.bias)


def naive_lsq(x, s, g, qn, qp):
    """LSQ as commonly written: gradient-scaled step, clamp, straight-through round."""
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, -qn, qp)
    v = (v.round() - v).detach() + v
    return v * s


def swap_baseline(model: nn.Module, impl: str) -> nn.Module:
    """Wrap every Conv2d/Linear; the first one's input step stays fixed, as in q2ext's default
    QConfig (freeze_network_input), so every quantized variant does the same backward work."""
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    modules = dict(model.named_modules())
    for i, (name, layer) in enumerate(layers):
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, BaselineQuantLayer(layer, impl, learn_input_step=i > 0))
    return model


# ---------------------------------------------------------------------------- models

@dataclasses.dataclass
class Case:
    """A model of the benchmark: ``build()`` -> float model in train mode, ``batch()`` ->
    its inputs, ``loss(model, batch)`` -> the scalar training loss; ``timed``: in the
    step-time table too (else memory only); ``compiled``: also under torch.compile."""

    build: object
    batch: object
    loss: object
    timed: bool = True
    compiled: bool = True


def _classification_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _detection_loss(model, batch):
    images, targets = batch
    return sum(model(images, targets).values())


def _resnet18():
    import torchvision

    return torchvision.models.resnet18()


def _resnet18_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 96, 96, generator=g), torch.randint(0, 1000, (16,), generator=g)


def _unet():
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=2)


def _unet_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 128, 128, generator=g), torch.randint(0, 2, (8, 128, 128), generator=g)


def _fcos():
    import torchvision

    return torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                           min_size=128, max_size=128)


def _fcos_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0], [40.0, 8.0, 120.0, 60.0]]),
                "labels": torch.tensor([1, 2])} for _ in images]
    return images, targets


MODELS = {
    "ResNet-18 b16 3x96x96": Case(_resnet18, _resnet18_batch, _classification_loss),
    "U-Net(smp, resnet18) b8 3x128x128": Case(_unet, _unet_batch, _classification_loss),
    "FCOS(resnet50-FPN) 2x3x128x128": Case(_fcos, _fcos_batch, _detection_loss, timed=False, compiled=False),
}
QUICK_MODELS = ("ResNet-18 b16 3x96x96",)


@dataclasses.dataclass
class Step:
    """One SGD training step of a model (``run()``), its optimizer and compile time."""

    run: object
    opt: torch.optim.Optimizer
    compile_s: float | None = None


def make_step(model: nn.Module, batch, loss_fn=_classification_loss) -> Step:
    """A training step (zero_grad, forward, loss, backward, SGD step) of `model` on `batch`."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        return loss

    return Step(run, opt)


def _compiled(model, batch, loss_fn) -> Step:
    import_cpp_extension_quietly()
    step = make_step(torch.compile(model), batch, loss_fn)
    t0 = time.perf_counter()
    step.run()
    step.compile_s = time.perf_counter() - t0
    return step


def build_variants(case: Case, compile_variants: bool = True, extra: bool = True) -> dict:
    """{variant: Step}; quantizers initialised eagerly (one step each).  ``extra`` adds the
    rows beyond the six main ones (PyTorch's learnable op, q2ext learning the input step)."""
    torch.manual_seed(0)
    base = case.build().train()
    batch = case.batch()
    qcfg = QConfig(w_bits=BITS, a_bits=BITS, first_layer_bits=None, last_layer_bits=None)
    models = {"FP32": copy.deepcopy(base), "q2ext": prepare(base, qcfg),
              "naive LSQ": swap_baseline(copy.deepcopy(base), "naive")}
    if extra:
        models["PyTorch learnable fake-quant"] = swap_baseline(copy.deepcopy(base), "torch")
        models["q2ext, network-input step learned"] = prepare(base, dataclasses.replace(qcfg,
                                                                                        freeze_network_input=False))
    variants = {k: make_step(m, batch, case.loss) for k, m in models.items()}
    for step in variants.values():
        step.run()  # initialise quantizers (eagerly) and warm the allocator
    if compile_variants and case.compiled:
        for k in ("FP32", "naive LSQ", "q2ext"):
            variants[f"{k}, torch.compile"] = _compiled(copy.deepcopy(models[k]), batch, case.loss)
    return variants


def _reference(label: str) -> str:
    return "FP32, torch.compile" if label.endswith("torch.compile") else "FP32"


def time_variants(variants: dict, rounds: int = 5, min_run_time: float = 0.6) -> dict:
    """Per variant: (median step seconds, median ratio to its FP32 reference) over
    interleaved rounds; the reference of a compiled variant is the compiled FP32 step.

    Each round times every variant once with median_seconds; the ratio is taken within a
    round, so load that other processes put on the machine during a round cancels out.
    """
    samples = {k: [] for k in variants}
    for _ in range(rounds):
        for k, step in variants.items():
            samples[k].append(median_seconds(step.run, min_run_time))
    out = {}
    for k, v in samples.items():
        ref = samples[_reference(k)]
        out[k] = (statistics.median(v), statistics.median(t / f for t, f in zip(v, ref)))
    return out


def memory_variants(variants: dict) -> dict:
    """Per variant: peak bytes of one step above its resting state (see the module docstring)."""
    return {k: peak_memory_bytes(step.run, setup=lambda s=step: s.opt.zero_grad(set_to_none=True))
            for k, step in variants.items()}


# ---------------------------------------------------------------------------- profile

_ALLOC_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::zero_", "aten::zeros",
              "aten::zeros_like", "aten::fill_", "aten::copy_", "aten::clone", "aten::contiguous", "aten::to",
              "aten::_to_copy"}


def _family(name: str) -> str:
    """Operator family of a profiler event name (self times are summed per family)."""
    # The op's autograd wrapper is named GeneratedBackwardFor_q2ext_fake_quant_default (its
    # forward, where the forward kernel's time lands) and ...Backward (the backward node).
    wrapper = name.startswith("GeneratedBackwardFor_q2ext_fake_quant")
    if name.startswith("q2ext::fake_quant_backward") or (wrapper and name.endswith("Backward")):
        return "q2ext fake-quant backward"
    if name.startswith("q2ext::fake_quant") or wrapper:
        return "q2ext fake-quant forward"
    if "convolution_backward" in name:
        return "conv backward"
    if "convolution" in name or "conv2d" in name:
        return "conv forward"
    if "batch_norm" in name:
        return "batch norm"
    if name.startswith("aten::_foreach_"):
        return "SGD step (foreach ops)"
    if name in _ALLOC_OPS:
        return "allocation / copy / zero"
    if "CompiledFxGraph" in name:
        return "Inductor-generated kernels"
    if name.startswith("aten::"):
        return "other aten ops"
    return "autograd engine + Python (non-aten events)"


def profile_breakdown(steps: dict, n_steps: int = 3):
    """{variant: {family: ms per step}} from torch.profiler self CPU times, plus wall ms."""
    out = {}
    for label, step in steps.items():
        step()
        with quiet_profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step()
            wall = (time.perf_counter() - t0) / n_steps
        fams = {}
        for ev in prof.key_averages():
            fam = _family(ev.key)
            fams[fam] = fams.get(fam, 0.0) + ev.self_cpu_time_total / 1e3 / n_steps
        fams["wall (profiled)"] = wall * 1e3
        out[label] = fams
    return out


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def _profile_rows(mname, variants):
    pairs = [("FP32", "q2ext")]
    if "q2ext, torch.compile" in variants:
        pairs.append(("FP32, torch.compile", "q2ext, torch.compile"))
    rows = []
    for a_label, b_label in pairs:
        br = profile_breakdown({k: variants[k].run for k in (a_label, b_label)})
        fams = sorted({f for d in br.values() for f in d} - {"wall (profiled)"}, key=lambda f: -br[b_label].get(f, 0.0))
        for f in fams + ["wall (profiled)"]:
            a, b = br[a_label].get(f, 0.0), br[b_label].get(f, 0.0)
            rows.append([mname, b_label, f, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}"])
    return rows


def run(quick: bool = False, compile_variants: bool = True, profile: bool = True, memory: bool = True,
        min_run_time: float | None = None, models=None, threads: int | None = None):
    """Run the benchmark; returns (time table, memory table, profile table, records).

    ``quick``: ResNet-18 only, the six main variants eager, one round, short runs.
    Records: ``dict(model, variant, ms, vs_fp32, compile_s)`` for times and
    ``dict(model, variant, peak_mib, vs_fp32)`` for memory (``ms`` None)."""
    if threads:
        torch.set_num_threads(threads)
    mrt = min_run_time if min_run_time is not None else (0.3 if quick else 0.6)
    rounds = 1 if quick else 5
    chosen = list(models or (QUICK_MODELS if quick else MODELS))
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    print(machine_info(), f"| load average at start {_loadavg()}", flush=True)
    rows, mem_rows, prof_rows, records = [], [], [], []
    for mname in chosen:
        case = MODELS[mname]
        variants = build_variants(case, compile_variants and not quick, extra=not quick)
        if case.timed:
            times = time_variants(variants, rounds, mrt)
            for label, (t, ratio) in times.items():
                comp = variants[label].compile_s
                rows.append([mname, label, f"{t * 1e3:.1f}", f"{ratio:.2f}x ({_reference(label)})",
                             f"{comp:.1f}" if comp is not None else "-"])
                print(f"  {mname} | {label}: {t * 1e3:.1f} ms, {ratio:.2f}x {_reference(label)}", flush=True)
                records.append(dict(model=mname, variant=label, ms=t * 1e3, vs_fp32=ratio, compile_s=comp))
        if memory:
            peaks = memory_variants(variants)
            for label, b in peaks.items():
                ratio = b / peaks[_reference(label)]
                mem_rows.append([mname, label, f"{b / 2**20:.1f}", f"{ratio:.2f}x ({_reference(label)})"])
                print(f"  {mname} | {label}: step peak {b / 2**20:.1f} MiB, {ratio:.2f}x {_reference(label)}",
                      flush=True)
                records.append(dict(model=mname, variant=label, ms=None, peak_mib=b / 2**20, vs_fp32=ratio))
        if profile and case.timed:
            prof_rows += _profile_rows(mname, variants)
    print(f"load average at end {_loadavg()}", flush=True)
    table = print_table(rows, ["model", "variant", "step ms (median)", "vs FP32 (median per round)",
                               "compile s"]) if rows else ""
    mem_table = ""
    if mem_rows:
        print(flush=True)
        mem_table = print_table(mem_rows, ["model", "variant", "step peak MiB (activations, grads, temporaries)",
                                           "vs FP32"])
    prof_table = ""
    if prof_rows:
        print(flush=True)
        prof_table = print_table(prof_rows, ["model", "variant", "op family (self CPU)", "FP32 ms/step",
                                             "variant ms/step", "variant - FP32"])
    return table, mem_table, prof_table, records
