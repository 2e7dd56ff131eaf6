"""ONNX export of a prepared (QAT) q2ext model as a QuantizeLinear/DequantizeLinear graph.

``export_onnx(model, example_input, path)`` writes the fake-quant model in eval mode as a
standard QDQ graph that any ONNX runtime can execute (and that int8 runtimes such as
onnxruntime or TensorRT turn into integer kernels):

- Weights of ``QuantConv2d`` / ``QuantLinear``: stored as int8 initializers holding the
  LSQ codes (rounded exactly as the fake quant rounds them, range already narrowed by the
  clamp) followed by ``DequantizeLinear(axis=0)`` with the learned per-output-channel
  steps (a per-tensor step is repeated per channel).
- Activations (every ``q2ext::fake_quant`` call, i.e. input quantizers, and weights of
  other layers such as ``QuantConvTranspose2d``): ``QuantizeLinear -> DequantizeLinear``
  with the learned per-tensor (or per-channel) step.  The signed grid maps to int8, the
  unsigned one (unsigned LSQ, LSQ+ with its offset inactive, PACT) to uint8, zero point 0.
  ONNX Q/DQ only saturate to the full 8-bit range, so a narrower grid (bits < 8, e.g. 4-bit
  ``[-8, 7]``) gets a float ``Clip(x, q_min * s, q_max * s)`` in front of the
  QuantizeLinear.  That is exact (``round(fl(q_max * s) / s) = q_max``) and keeps every
  QuantizeLinear directly followed by its DequantizeLinear, the pattern QDQ-aware runtimes
  fuse.  Opset-21 int4 Q/DQ were not used: they only fit exactly 4 bits, still need the
  clip at 2/3/5-7 bits, and int8 Q/DQ is what deployment runtimes accept everywhere.
  An active LSQ+ offset ``b`` (not an integer multiple of the step) becomes
  ``Sub(b) -> Q/DQ -> Add(b)``.

Numerics: QuantizeLinear divides by the step where the fake quant multiplies by its
reciprocal, and the runtime sums convolutions in another order; both only matter for
values within float rounding of a rounding boundary, so the runtime's output matches
q2ext's up to a few isolated one-step flips (see tests/test_export_onnx.py for the
tolerances).  The graph uses opset 18 and the torch.export-based exporter (onnxscript).
"""
from __future__ import annotations

import copy
import importlib
import os
import warnings

import numpy as np
import torch
from torch import nn

from .._ops import SCALE_MAX, SCALE_MIN
from .._ops.fake_quant import MODE_PACT
from .._ops.gb_fusion import MODES, gb_fusion_composite
from ..nn.fake_quant import Quantizer
from ..nn.fake_quant_layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from ..nn.gb_fusion import GBFusion
from ..nn.gemm_layers import _weight_codes, quantizer_grid
from ._surgery import set_submodule

__all__ = ["export_onnx", "OPSET"]

OPSET = 18


def _onnx_fake_quant(x, scale, zero_point, offset, quant_min: int, quant_max: int, axis, mode: int,
                     grad_factor: float):
    """onnxscript translation of ``q2ext::fake_quant`` (semantics: q2ext/reference/fake_quant.py)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if quant_min >= 0 and quant_max <= 255:
        int_np, full = np.uint8, (0, 255)
    elif quant_min >= -128 and quant_max <= 127:
        int_np, full = np.int8, (-128, 127)
    else:
        raise ValueError(f"export_onnx: quantization range [{quant_min}, {quant_max}] fits neither int8 nor uint8")

    def const(value, dtype=np.float32):
        return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    orig = x.type.dtype if x.type is not None else ir.DataType.FLOAT
    if orig != ir.DataType.FLOAT:  # opset 18 Q/DQ take float32 only
        x = op.Cast(x, to=ir.DataType.FLOAT)
    s = op.Clip(scale, const(SCALE_MIN), const(SCALE_MAX))
    if mode == MODE_PACT:  # scale holds the clip alpha
        s = op.Div(s, const(float(quant_max)))
    rank = len(x.shape) if x.shape is not None else None
    if axis is None:
        s = op.Squeeze(s)  # [1] -> scalar: a 1-D scale would mean per-axis
        bshape = None
    else:
        if rank is None:
            raise ValueError("export_onnx: a per-channel fake quant needs a static input rank")
        bshape = [1] * rank
        bshape[axis] = -1

    def bcast(t):  # [C] / [1] parameter -> broadcastable against x
        return op.Squeeze(t) if bshape is None else op.Reshape(t, const(bshape, np.int64))

    n = 1 if axis is None else int(scale.shape[0])
    if zero_point is None:
        zp = const(np.zeros(() if axis is None else (n,)), int_np)
        zp_f = None
    else:  # ATen-style affine: round half to even, clamp to the grid (reference._params)
        zp_f = op.Clip(op.Round(zero_point), const(float(quant_min)), const(float(quant_max)))
        zp = op.Cast(op.Squeeze(zp_f) if axis is None else zp_f, to=ir.DataType.UINT8 if int_np is np.uint8
                     else ir.DataType.INT8)
    qaxis = {} if axis is None else {"axis": axis}
    if offset is not None:
        x = op.Sub(x, bcast(offset))
    if (quant_min, quant_max) != full:
        sb = op.Squeeze(s) if bshape is None else op.Reshape(s, const(bshape, np.int64))
        lo, hi = const(float(quant_min)), const(float(quant_max))
        if zp_f is not None:
            zb = bcast(zp_f)
            lo, hi = op.Sub(lo, zb), op.Sub(hi, zb)
        x = op.Max(op.Min(x, op.Mul(hi, sb)), op.Mul(lo, sb)) if bshape is not None else \
            op.Clip(x, op.Mul(lo, sb), op.Mul(hi, sb))
    y = op.DequantizeLinear(op.QuantizeLinear(x, s, zp, **qaxis), s, zp, **qaxis)
    if offset is not None:
        y = op.Add(y, bcast(offset))
    return op.Cast(y, to=orig) if orig != ir.DataType.FLOAT else y


class _Int8Weight(nn.Module):
    """Replaces a weight quantizer for export: returns DequantizeLinear(int8 codes) and
    ignores the float weight it is handed (the exporter then drops that weight)."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.register_buffer("codes", codes)
        self.register_buffer("step", step.float().contiguous())

    def forward(self, w):
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.codes, self.step, None, 0, self.qmin, self.qmax, torch.int8)


class _LiveFusion(nn.Module):
    """A GBFusion exported with its per-pixel LayerNorm (``gbfusion="keep"``): alpha frozen
    at softmax(lam), the forward in plain tensor ops (mean, variance, rsqrt over channels)
    that the ONNX exporter translates; the same formulas as the fused kernel."""

    def __init__(self, g: GBFusion):
        super().__init__()
        self.mode = MODES[g.mode]
        self.eps = float(g.eps)
        self.register_buffer("alpha", g.alpha.detach().clone())
        self.weight = None if g.weight is None else nn.Parameter(g.weight.detach().clone(), requires_grad=False)
        self.bias = None if g.bias is None else nn.Parameter(g.bias.detach().clone(), requires_grad=False)

    def forward(self, *xs):
        branches = list(xs[0]) if len(xs) == 1 and isinstance(xs[0], (list, tuple)) else list(xs)
        return gb_fusion_composite(branches, self.alpha, self.weight, self.bias, self.mode, self.eps)


def _keep_fusions(model):
    for name, m in list(model.named_modules()):
        if isinstance(m, GBFusion):
            set_submodule(model, name, _LiveFusion(m))


def _check_model(model, gbfusion):
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: model must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        raise ValueError("export_onnx: model has no q2ext quantized layer (QuantConv2d/QuantLinear/"
                         "QuantConvTranspose2d); run q2ext.prepare(model) and train or calibrate it first "
                         "(export the QAT model, not the output of q2ext.convert)")
    for name, m in model.named_modules():
        if isinstance(m, Quantizer) and m.enabled and not m.is_initialized:
            raise ValueError(f"export_onnx: quantizer {name!r} is not initialised; run one forward or "
                             "q2ext.calibrate(model, batches) first")
        if gbfusion == "fold" and isinstance(m, GBFusion) and not (m.use_constants and m.const_mean is not None):
            raise ValueError(f"export_onnx: GBFusion node {name!r} still runs its training LayerNorm; "
                             "freeze it with q2ext.calibrate_gbfusion(model, calib_batches) first, or "
                             "export it as it is with gbfusion='keep'")


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_onnx: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    try:  # fail before the (slow) export, and with the argument's name
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise OSError(f"export_onnx: cannot write the ONNX file at path {path!r}: {exc.strerror}") from exc
    return path


def _swap_weights(model):
    """QuantConv2d/QuantLinear weight quantizers -> int8 codes + DequantizeLinear."""
    for mod in model.modules():
        if not isinstance(mod, (QuantConv2d, QuantLinear)) or not isinstance(mod.weight_quantizer, Quantizer) \
                or not mod.weight_quantizer.enabled:
            continue
        try:
            step, qmin, qmax = quantizer_grid(mod.weight_quantizer, "weight_quantizer")
        except (TypeError, ValueError):
            continue  # exported through the generic fake-quant translation instead
        if qmin < -128 or qmax > 127:
            continue
        c = mod.weight.shape[0]
        step = step.clamp(SCALE_MIN, SCALE_MAX)
        codes, step = _weight_codes(mod.weight, step.expand(c) if step.numel() == 1 else step, qmin, qmax)
        mod.weight_quantizer = _Int8Weight(codes, step, qmin, qmax)


def export_onnx(model: nn.Module, example_input, path, *, dynamic_batch: bool = False,
                opset_version: int = OPSET, gbfusion: str = "keep"):
    """Write the QDQ ONNX graph of a prepared q2ext model to ``path``.

    Args:
        model: a model from :func:`q2ext.prepare` whose quantizers are initialised
            (trained or calibrated); exported in eval mode on the CPU in float32 (the
            model itself is not modified).  GBFusion nodes export as ``gbfusion`` says;
            nodes already folded (``q2ext.fold_gbfusion``) are plain float ops in front of
            the next layer's Q/DQ, like ``q2ext.convert`` keeps them.
        example_input: a float tensor (e.g. ``[1, 3, H, W]``) or a tuple of positional
            inputs; fixes the graph's input shapes.
        path: destination ``.onnx`` file (str or os.PathLike).
        dynamic_batch: make dimension 0 of every input symbolic.
        opset_version: ONNX opset, >= 18.
        gbfusion: "keep" (the default): every GBFusion exports with alpha frozen and its
            per-pixel LayerNorm as ONNX ops (the model as trained, lossless;
            ``q2ext.convert``'s default is its int8 counterpart), or "fold": every node
            must run with calibrated constants (``q2ext.calibrate_gbfusion``) and exports
            as a constant affine (the fold changes the function; see gb_fusion_fold).
    Returns: the exported ``onnx.ModelProto``.
    Raises: ValueError for a model without q2ext quantized layers, with uninitialised
    quantizers or uncalibrated GBFusion nodes; OSError naming ``path`` when it cannot be
    written; ImportError without onnx/onnxscript.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError("export_onnx needs the onnx and onnxscript packages (pip install onnx onnxscript)") from exc
    if gbfusion not in ("fold", "keep"):
        raise ValueError(f"export_onnx: gbfusion must be 'fold' or 'keep', got {gbfusion!r}")
    _check_model(model, gbfusion)
    if isinstance(opset_version, bool) or not isinstance(opset_version, int) or opset_version < OPSET:
        raise ValueError(f"export_onnx: opset_version must be an int >= {OPSET}, got {opset_version!r}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args):
        raise TypeError("export_onnx: example_input must be a float tensor or a tuple of float tensors")
    args = tuple(a.detach().cpu().float() for a in args)
    existed = os.path.exists(path) if isinstance(path, (str, os.PathLike)) else True
    path = _check_path(path)
    importlib.import_module("torch.ao.quantization.fx._decomposed")  # registers quantized_decomposed ops

    model = copy.deepcopy(model).cpu().float().eval()
    _swap_weights(model)
    if gbfusion == "keep":
        _keep_fusions(model)
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter is chatty about unrelated deprecations
            with torch.no_grad():
                program = torch.onnx.export(
                    model, args, dynamo=True, opset_version=opset_version, dynamic_shapes=dynamic, verbose=False,
                    custom_translation_table={torch.ops.q2ext.fake_quant.default: _onnx_fake_quant})
        program.save(path)
    except BaseException:
        if not existed and os.path.exists(path):
            os.remove(path)  # the empty file _check_path created
        raise
    return program.model_proto
