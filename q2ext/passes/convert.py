"""QAT model -> real int8 inference model.

``convert(model)`` replaces every trained ``QuantLinear`` / ``QuantConv2d`` by
``Int8Linear`` / ``Int8Conv2d`` (or ``Int4Linear`` for weight-only), folding a following
``BatchNorm2d`` (eval statistics) into the int8 conv's per-channel epilogue scale and
bias - exact, no weight re-rounding: ``bn(s_x s_W acc + b) = s_x (s_W g) acc + (b - mu) g + beta``
with ``g = gamma / sqrt(var + eps)``.  Conv -> BN edges are found with torch.fx; a model
that does not trace keeps its BatchNorms as float modules (still correct, just unfused).
Every model ``q2ext.prepare`` makes converts: signed activations under the default
``a_quantizer="auto"`` (LSQ+ with an active offset) take the asymmetric int8 path of
:mod:`q2ext.nn.gemm_layers`.  Each int8 layer picks its engine (q2ext's kernels or
oneDNN) per input shape on the machine (:mod:`q2ext.nn.gemm_engines`).

Q-GBFusion nodes: with ``gbfusion="keep"`` (the default) each stays a frozen GBFusion
that runs the fused per-pixel LayerNorm kernel, i.e. the trained function: lossless.
``gbfusion="fold"`` is the paper's deployment (App. 7.1, :mod:`.gb_fusion_fold`): LN
replaced by constants calibrated on ``calib_batches`` with the *fake-quant* model (scalar
or per-channel), the constant affine folded into float consumers and kept in front of
the int8 convs (a FixedFusion, one elementwise pass: per-output-channel int8 steps cannot
absorb a per-input-channel factor without re-rounding the trained codes), then optionally
a short fine-tune of the fake-quant model without LN (``finetune=FinetuneSpec(...)``)
before the layers are swapped.  A fold changes the function the model was trained with;
bench/RESULTS.md reports what it cost on a U-Net task with and without the fine-tune.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..nn import gemm_engines
from ..nn.fake_quant import Quantizer
from ..nn.fake_quant_layers import QuantConv2d, QuantLinear
from ..nn.gb_fusion import GBFusion
from ..nn.gemm_layers import Int4Linear, Int8Conv2d, Int8Linear
from ._surgery import Tracer, set_submodule
from .gb_fusion_fold import FOLD_MODES, FinetuneSpec, fold_gbfusion

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
    int_conv.fold_output_affine(g.float(), (beta - bn.running_mean * g).float())


def _check_quantizers(model):
    for name, mod in model.named_modules():
        if not isinstance(mod, (QuantConv2d, QuantLinear)):
            continue
        for kind, q in (("input_quantizer", mod.input_quantizer), ("weight_quantizer", mod.weight_quantizer)):
            if isinstance(q, Quantizer) and not q.enabled:
                raise ValueError(f"convert: {name}.{kind} is disabled; enable it or leave the layer in float")
            if isinstance(q, Quantizer) and not q.is_initialized:
                raise ValueError(f"convert: {name}.{kind} is not initialised; train or q2ext.calibrate the model first")


def _check_args(gbfusion, fold_mode, finetune, engine, example_inputs):
    if gbfusion not in ("fold", "keep"):
        raise ValueError(f"convert: gbfusion must be 'fold' or 'keep', got {gbfusion!r}")
    if fold_mode not in FOLD_MODES:
        raise ValueError(f"convert: fold_mode must be one of {FOLD_MODES}, got {fold_mode!r}")
    if finetune is not None and not isinstance(finetune, FinetuneSpec):
        raise TypeError(f"convert: finetune must be a q2ext.FinetuneSpec or None, got {type(finetune).__name__}")
    if finetune is not None and gbfusion != "fold":
        raise ValueError("convert: finetune is the fine-tune after the GBFusion fold; pass gbfusion='fold' with it")
    gemm_engines.check_engine(engine, "int8", "convert: engine")
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise TypeError("convert: example_inputs must be a tensor or a tuple of tensors (one model input)")


def _fold(model, calib_batches, fold_mode, finetune):
    """The GBFusion nodes in their deployed form (before the layer swap, so that a fine-tune
    trains the fake-quant model)."""
    nodes = [(n, m) for n, m in model.named_modules() if isinstance(m, GBFusion)]
    if not nodes:
        return
    if calib_batches is None:
        missing = [n for n, m in nodes if m.const_mean is None or m.branch_channels is None]
        if missing or fold_mode == "per_channel":
            raise ValueError(f"convert: GBFusion node(s) {missing or [n for n, _ in nodes]} need calibrated "
                             f"LayerNorm constants ({fold_mode}); pass calib_batches (an iterable of model "
                             "inputs, e.g. a few training batches)")
    # fold_shift="keep": exact; only float consumers absorb the affine (see gb_fusion_fold)
    fold_gbfusion(model, calib_batches, fold_shift="keep", mode=fold_mode, finetune=finetune)


@torch.no_grad()
def convert(model: nn.Module, calib_batches=None, *, int4_weight_only: bool = False, group_size: int = 128,
            inplace: bool = False, gbfusion: str = "keep", fold_mode: str = "scalar",
            finetune: FinetuneSpec | None = None, engine: str = "auto", example_inputs=None) -> nn.Module:
    """Int inference copy of a trained QAT model (call ``model.eval()`` first).

    Args:
        model: a prepared (``q2ext.prepare``) and trained model, quantizers initialised.
        calib_batches: with ``gbfusion="fold"``: iterable of model inputs (tensors or
            tuples of positional args) on which the LayerNorm constants of every GBFusion
            node are calibrated.  None: nodes calibrated before (``q2ext.calibrate_gbfusion``)
            keep their constants (scalar mode), an uncalibrated node raises ValueError.
        int4_weight_only: convert QuantLinear layers to Int4Linear (W4A16) instead of
            Int8Linear; convs stay W8A8.
        group_size: Int4Linear group size (in_features must be a multiple of it).
        inplace: modify ``model`` instead of a deep copy.
        gbfusion: "keep" (default: each node stays a frozen GBFusion that normalises every
            pixel as in training, one fused LayerNorm kernel per node; predictions of the
            trained model, no calibration) or "fold" (App. 7.1: LayerNorm replaced by
            calibrated constants; changes the function: on the demo U-Net the scalar fold
            cost 7-13 mDICE without a fine-tune, see bench/RESULTS.md).
        fold_mode: "scalar" (Eq. 11) or "per_channel" (A_c, B_c per input channel of the
            next conv); with gbfusion="fold".
        finetune: a :class:`q2ext.FinetuneSpec`: after the fold, fine-tune the fake-quant
            copy (task loss only, Adam) before the layers are swapped; gbfusion="fold" only.
        engine: "auto" (per layer and input shape, the fastest engine measured on this
            machine), "q2ext" or "onednn": the int8 engine of every Int8Linear/Int8Conv2d
            (a layer's ``engine`` attribute can be changed later).
        example_inputs: one model input (a tensor or a tuple of positional args); the int
            model runs it once so that every layer picks its engine now instead of at its
            first forward.
    Returns the int model: Int8Conv2d/Int8Linear/Int4Linear layers, BatchNorms after a
    quantized conv folded, GBFusion nodes frozen ("keep") or constant FixedFusion affines
    ("fold").
    """
    if model.training:
        raise ValueError("convert: call model.eval() first (BatchNorm folding uses running statistics)")
    _check_args(gbfusion, fold_mode, finetune, engine, example_inputs)
    _check_quantizers(model)
    model = model if inplace else copy.deepcopy(model)
    if gbfusion == "keep":
        for m in model.modules():
            if isinstance(m, GBFusion):
                m.freeze()
                m.use_constants = False
    else:
        _fold(model, calib_batches, fold_mode, finetune)
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
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Conv2d)) or (isinstance(m, Int4Linear) and engine != "onednn"):
            m.engine = engine
    if example_inputs is not None:
        model(*(example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)))
    return model
