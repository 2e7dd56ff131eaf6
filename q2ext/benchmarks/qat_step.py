"""W4A4 QAT training-step benchmark: one forward + backward + SGD step.

Models: torchvision ResNet-18 (batch 16, 3x96x96, 1000 classes) and a
segmentation-models-pytorch U-Net with a ResNet-18 encoder (batch 8, 3x128x128, 2
classes).  Variants, all measured in this process, all W4A4 on every Conv2d/Linear
(per-output-channel weight scales, per-tensor input scales, LSQ initialisation):

- FP32: the float model;
- q2ext: ``q2ext.prepare`` (first/last layer also 4 bits here, for a like-for-like count);
- PyTorch learnable: the same layers with ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``;
- naive LSQ: the LSQ code most projects carry (grad-scale trick, clamp, round with STE),
  eager and under ``torch.compile`` (compile time reported separately);
- q2ext under ``torch.compile`` (compile time reported separately).

Every quantized variant keeps the first layer's input step (the network input) fixed after
its data initialisation, q2ext's default (``QConfig.freeze_network_input``); the row
"q2ext, network-input step learned" shows what learning it costs (the first conv's
backward-data pass).

Each number is the median over interleaved rounds of ``median_seconds`` (the machine's
other load shifts all variants of a round alike).  ``profile`` breaks one step of FP32 and
q2ext down by operator family (self CPU time) to show where the extra time goes.
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
from .common import machine_info, median_seconds, print_table

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

def _resnet18():
    import torchvision

    def batch():
        g = torch.Generator().manual_seed(0)
        return torch.randn(16, 3, 96, 96, generator=g), torch.randint(0, 1000, (16,), generator=g)

    return torchvision.models.resnet18(), batch


def _unet():
    import segmentation_models_pytorch as smp

    def batch():
        g = torch.Generator().manual_seed(0)
        return torch.randn(8, 3, 128, 128, generator=g), torch.randint(0, 2, (8, 128, 128), generator=g)

    return smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=2), batch


MODELS = {"ResNet-18 b16 3x96x96": _resnet18, "U-Net(smp, resnet18) b8 3x128x128": _unet}


def make_step(model: nn.Module, batch):
    """A closure running one SGD training step (zero_grad, forward, loss, backward, step)."""
    x, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def build_variants(model_fn, compile_variants=True):
    """{variant: (step closure, compile seconds or None)}; quantizers initialised eagerly."""
    torch.manual_seed(0)
    base, batch_fn = model_fn()
    batch = batch_fn()
    base.train()
    qcfg = QConfig(w_bits=BITS, a_bits=BITS, first_layer_bits=None, last_layer_bits=None)
    variants = {"FP32": (make_step(copy.deepcopy(base), batch), None)}
    q2 = prepare(base, qcfg)
    variants["q2ext"] = (make_step(q2, batch), None)
    q2_learn = prepare(base, dataclasses.replace(qcfg, freeze_network_input=False))
    variants["q2ext, network-input step learned"] = (make_step(q2_learn, batch), None)
    variants["PyTorch learnable fake-quant"] = (make_step(swap_baseline(copy.deepcopy(base), "torch"), batch), None)
    naive = swap_baseline(copy.deepcopy(base), "naive")
    variants["naive LSQ"] = (make_step(naive, batch), None)
    for _, (step, _) in variants.items():
        step()  # initialise quantizers (eagerly) and warm the allocator
    if compile_variants:
        for label, src in (("naive LSQ, torch.compile", naive), ("q2ext, torch.compile", q2)):
            step = make_step(torch.compile(copy.deepcopy(src)), batch)
            t0 = time.perf_counter()
            step()
            variants[label] = (step, time.perf_counter() - t0)
    return variants


def time_variants(variants, rounds=5, min_run_time=0.6):
    """Per variant: (median step seconds, median ratio to FP32) over interleaved rounds.

    Each round times every variant once with median_seconds; the ratio is taken within a
    round, so load that other processes put on the machine during a round cancels out.
    """
    samples = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (step, _) in variants.items():
            samples[k].append(median_seconds(step, min_run_time))
    fp32 = samples["FP32"]
    return {k: (statistics.median(v), statistics.median(t / f for t, f in zip(v, fp32))) for k, v in samples.items()}


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
    if name.startswith("aten::"):
        return "other aten ops"
    return "autograd engine + Python (non-aten events)"


def profile_breakdown(steps: dict, n_steps: int = 3):
    """{variant: {family: ms per step}} from torch.profiler self CPU times, plus wall ms."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label, step in steps.items():
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
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


def run(quick: bool = False, compile_variants: bool = True, profile: bool = True, min_run_time: float | None = None,
        models=None, threads: int | None = None):
    """Run the benchmark; returns (results table, profile table or '', records)."""
    if threads:
        torch.set_num_threads(threads)
    mrt = min_run_time if min_run_time is not None else (0.3 if quick else 0.6)
    rounds = 1 if quick else 5
    print(machine_info(), f"| load average at start {_loadavg()}", flush=True)
    rows, records, prof_rows = [], [], []
    for mname in models or MODELS:
        variants = build_variants(MODELS[mname], compile_variants and not quick)
        times = time_variants(variants, rounds, mrt)
        for label, (t, ratio) in times.items():
            comp = variants[label][1]
            rows.append([mname, label, f"{t * 1e3:.1f}", f"{ratio:.2f}x", f"{comp:.1f}" if comp is not None else "-"])
            records.append(dict(model=mname, variant=label, ms=t * 1e3, vs_fp32=ratio, compile_s=comp))
        if profile:
            br = profile_breakdown({k: variants[k][0] for k in ("FP32", "q2ext")})
            fams = sorted({f for d in br.values() for f in d} - {"wall (profiled)"},
                          key=lambda f: -br["q2ext"].get(f, 0.0))
            for f in fams + ["wall (profiled)"]:
                a, b = br["FP32"].get(f, 0.0), br["q2ext"].get(f, 0.0)
                prof_rows.append([mname, f, f"{a:.1f}", f"{b:.1f}", f"{b - a:+.1f}"])
    print(f"load average at end {_loadavg()}", flush=True)
    table = print_table(rows, ["model", "variant", "step ms (median)", "vs FP32 (median per round)", "compile s"])
    prof_table = ""
    if profile:
        print(flush=True)
        prof_table = print_table(prof_rows, ["model", "op family (self CPU)", "FP32 ms/step", "q2ext ms/step",
                                             "q2ext - FP32"])
    return table, prof_table, records
