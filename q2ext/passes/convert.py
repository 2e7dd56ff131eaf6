"""QAT model -> real int8 inference model.

``convert(model, calib_batches)`` replaces every trained ``QuantLinear`` / ``QuantConv2d`` by
``Int8Linear`` / ``Int8Conv2d`` (or ``Int4Linear`` for weight-only), folding a following
``BatchNorm2d`` (eval statistics) into the int8 conv's per-channel epilogue scale and
bias - exact, no weight re-rounding: ``bn(s_x s_W acc + b) = s_x (s_W g) acc + (b - mu) g + beta``
with ``g = gamma / sqrt(var + eps)``.  Conv -> BN edges are found with torch.fx; a model
that does not trace keeps its BatchNorms as float modules (still correct, just unfused).

Q-GBFusion nodes, with ``gbfusion="fold"`` (the default), are frozen to the
paper's deployment form (with ``"keep"`` they stay frozen GBFusion nodes that run the
fused per-pixel LayerNorm kernel, i.e. the trained function): alpha frozen, the per-pixel
LayerNorm replaced by constants calibrated on ``calib_batches`` with the *fake-quant*
model (its upstream is what the int model reproduces), i.e. one constant per-channel
affine ``fuse(alpha_i x_i) * scale_c + shift_c`` (a FixedFusion).  That affine is not
folded into a following quantized conv: it scales the conv's *input* channels, and
``Q(W diag(a))`` is not ``Q(W) diag(a)`` - per-output-channel int8 steps cannot absorb a
per-input-channel factor without re-rounding the trained weight codes, and the conv's
learned per-tensor input step was trained on the normalised input, not on the raw fused
one (the int8 kernel has no per-input-channel activation scale to fold it into either).
So the FixedFusion stays in front of the int conv (one elementwise pass), and the int
model equals the calibrated fake-quant model up to fp32 rounding.  Only a consumer left
in float (a plain ``nn.Conv2d``, e.g. skipped by the QConfig) gets the affine folded into
its weight, exactly (``fold_gbfusion(..., fold_shift="keep")``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..nn.fake_quant import Quantizer
from ..nn.fake_quant_layers import QuantConv2d, QuantLinear
from ..nn.gb_fusion import GBFusion
from ..nn.gemm_layers import Int4Linear, Int8Conv2d, Int8Linear
from ._surgery import Tracer, set_submodule
from .gb_fusion_fold import calibrate_gbfusion, fold_gbfusion

__all__ = ["convert"]


def _conv_bn_pairs(model):
    """{conv qualified name: bn qualified name} for BNs that consume only a QuantConv2d output."""
    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable control flow: keep BNs unfused
        return {}
    mods = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), QuantConv2d) and len(src.users) == 1):
            pairs[src.target] = node.target
    return pairs


def _fold_bn(int_conv: Int8Conv2d, bn: nn.BatchNorm2d):
    g = (bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(g)
    cout_g = int_conv.out_channels // int_conv.groups
    for i, lin in enumerate(int_conv.linears):
        sl = slice(i * cout_g, (i + 1) * cout_g)
        b = lin.bias if lin.bias is not None else torch.zeros(cout_g)
        lin.w_scale = (lin.w_scale * g[sl].float()).contiguous()
        lin.bias = ((b - bn.running_mean[sl]) * g[sl] + beta[sl]).float().contiguous()


def _check_quantizers(model):
    for name, mod in model.named_modules():
        if not isinstance(mod, (QuantConv2d, QuantLinear)):
            continue
        for kind, q in (("input_quantizer", mod.input_quantizer), ("weight_quantizer", mod.weight_quantizer)):
            if isinstance(q, Quantizer) and not q.enabled:
                raise ValueError(f"convert: {name}.{kind} is disabled; enable it or leave the layer in float")
            if isinstance(q, Quantizer) and not q.is_initialized:
                raise ValueError(f"convert: {name}.{kind} is not initialised; train or q2ext.calibrate the model first")


def _calibrate_gbfusion(model, calib_batches):
    """Freeze every GBFusion with calibrated LN constants (on the fake-quant model)."""
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        return False
    if calib_batches is not None:
        calibrate_gbfusion(model, calib_batches)
        return True
    missing = [n for n, m in nodes if m.const_mean is None or m.branch_channels is None]
    if missing:
        raise ValueError(f"convert: GBFusion node(s) {missing} have no calibrated LayerNorm constants; pass "
                         "calib_batches (an iterable of model inputs, e.g. a few training batches)")
    for _, m in nodes:
        m.freeze()
        m.use_constants = True
    return True


@torch.no_grad()
def convert(model: nn.Module, calib_batches=None, *, int4_weight_only: bool = False, group_size: int = 128,
            inplace: bool = False, gbfusion: str = "fold") -> nn.Module:
    """Int inference copy of a trained QAT model (call ``model.eval()`` first).

    Args:
        model: a prepared (``q2ext.prepare``) and trained model, quantizers initialised.
        calib_batches: iterable of model inputs (tensors or tuples of positional args) on
            which the LayerNorm constants of every GBFusion node are (re)calibrated.  None:
            nodes calibrated before (``q2ext.calibrate_gbfusion``) keep their constants,
            an uncalibrated node raises ValueError.  Unused without GBFusion nodes.
        int4_weight_only: convert QuantLinear layers to Int4Linear (W4A16) instead of
            Int8Linear; convs stay W8A8.
        group_size: Int4Linear group size (in_features must be a multiple of it).
        inplace: modify ``model`` instead of a deep copy.
        gbfusion: "fold" (the paper's deployment, Eq. 11-12: LayerNorm statistics replaced
            by constants calibrated on ``calib_batches``) or "keep" (each node stays a
            frozen GBFusion that normalises every pixel as in training: one fused
            LayerNorm kernel per node at inference, no calibration, predictions of the
            trained model).  Folding changes the function the model was trained with; on
            the demo task it costs 7 mDICE (72.2 -> 65.0, W8A8) where "keep" loses none,
            so check it on your data (``q2ext demo`` reports both).
    Returns the int model: Int8Conv2d/Int8Linear/Int4Linear layers, BatchNorms after a
    quantized conv folded, GBFusion nodes as constant FixedFusion affines (see the module
    docstring for why they are not folded into the quantized conv that follows).
    """
    if model.training:
        raise ValueError("convert: call model.eval() first (BatchNorm folding uses running statistics)")
    if gbfusion not in ("fold", "keep"):
        raise ValueError(f"convert: gbfusion must be 'fold' or 'keep', got {gbfusion!r}")
    _check_quantizers(model)
    model = model if inplace else copy.deepcopy(model)
    if gbfusion == "keep":
        for m in model.modules():
            if isinstance(m, GBFusion):
                m.freeze()
                m.use_constants = False
        has_gbfusion = False
    else:
        has_gbfusion = _calibrate_gbfusion(model, calib_batches)
    pairs = _conv_bn_pairs(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantConv2d):
            new = Int8Conv2d.from_qat(mod)
            if name in pairs:
                _fold_bn(new, model.get_submodule(pairs[name]))
                set_submodule(model, pairs[name], nn.Identity())
            set_submodule(model, name, new)
        elif isinstance(mod, QuantLinear):
            set_submodule(model, name, Int4Linear.from_qat(mod, group_size) if int4_weight_only else Int8Linear.from_qat(mod))
    if has_gbfusion:
        # After the swap no quantized conv is an nn.Conv2d any more: fold_gbfusion keeps the
        # constant affine in front of the int layers and folds only into float convs.
        fold_gbfusion(model, None, fold_shift="keep")
    return model
