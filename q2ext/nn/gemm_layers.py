"""Real int8 / int4 inference layers built from trained QAT layers.

- :class:`Int8Linear` / :class:`Int8Conv2d`: W8A8 (or fewer bits on an 8-bit grid).  The
  activation is quantised with the QAT input quantizer's learned step, the weight is
  stored as int8 codes with per-output-channel steps, bias (+ ReLU) run in the GEMM
  epilogue.  ``y`` equals the fake-quant layer's ``F.linear(Q(x), Q(W), b)`` up to fp32
  rounding (summation order, and the epilogue's ``acc * s_x * s_W + b``), since
  ``Q(x) = q_x * s_x (+ offset)`` and ``Q(W) = q_W * s_W`` exactly.
- :class:`Int4Linear`: weight-only int4, group-wise scales/zeros.

Asymmetric activations (LSQ+ with an active offset ``o``: ``Q(x) = s q + o``, q on
``[0, 2^b - 1]``): the codes are taken of ``x - o`` exactly as the fake quant rounds them
(uint8), and ``W (s q + o) = s W q + o W 1``: the second term is a per-output-channel
constant ``o * s_W * sum_k q_W`` added to the epilogue bias.  A zero-padded conv sees 0,
not ``o``, at its border taps, so there the constant is the sum over the *valid* taps
only: a per-(channel, position) map, computed exactly (fp64 conv of a ones image) once per
input size, added after the GEMM.

Every int8 layer runs on one of two engines (``q2ext`` kernels or ``onednn``), chosen
per input shape on the machine at hand: see :mod:`q2ext.nn.gemm_engines`.  Both compute
the same int32 accumulators; their fp32 epilogues round in a different order (q2ext:
``(acc * s_x) * s_W + b``, oneDNN: ``acc * (s_x * s_W) + b``), a few ulp apart.
Supported quantizers: LSQ (signed/unsigned, per-tensor input, per-tensor or per-channel
weight), LSQ+ (input, per tensor, offset active or not), PACT (input).  Inference only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .._ops import sanitize_scale
from .._ops.fake_quant import lsq_levels
from . import gemm_engines

__all__ = ["Int8Linear", "Int8Conv2d", "Int4Linear", "INT_LAYERS", "describe_int_layer", "quantizer_grid", "input_grid"]


def quantizer_grid(q, name="quantizer"):
    """(step float32 [C], quant_min, quant_max) of a trained q2ext quantizer without an offset."""
    step, qmin, qmax, offset = input_grid(q, name)
    if offset is not None:
        raise ValueError(f"{name}: an LSQ+ offset is supported on input (activation) quantizers only")
    return step, qmin, qmax


def input_grid(q, name="input_quantizer"):
    """(step float32 [C], quant_min, quant_max, offset float32 [C] or None) of a trained
    quantizer; the step sanitised as every fake-quant kernel does (a step trained to <= 0
    or NaN runs as FLT_EPSILON there, and must here too)."""
    step, qmin, qmax, offset = _raw_grid(q, name)
    return sanitize_scale(step), qmin, qmax, offset


def _raw_grid(q, name):
    kind = type(q).__name__
    if kind == "LSQQuantizer":
        qn, qp = lsq_levels(q.bits, bool(q.is_signed))
        return q.step_size(), -qn, qp, None
    if kind == "LSQPlusQuantizer":
        offset = q.offset.detach().float().reshape(-1) if bool(q.offset_active) else None
        return q.step_size(), 0, 2 ** q.bits - 1, offset
    if kind == "PACTQuantizer":
        return q.step_size(), 0, 2 ** q.bits - 1, None
    raise TypeError(f"{name}: cannot convert a {kind} (supported: LSQQuantizer, LSQPlusQuantizer, PACTQuantizer)")


def _weight_codes(w, step, qmin, qmax):
    """Per-output-channel int8 codes exactly as the fake quant rounds them."""
    s = step.reshape(-1, *([1] * (w.dim() - 1))).expand(w.shape[0], *([1] * (w.dim() - 1)))
    v = (w.detach().float() * (1.0 / s)).clamp(qmin, qmax)
    return torch.round(v).to(torch.int8), s.reshape(-1).contiguous()


def _layer_grids(mod, out_channels):
    """(weight codes, w_scale, x_scale, x_offset, quant_min, quant_max) of a QAT layer."""
    s_w, wmin, wmax = quantizer_grid(mod.weight_quantizer, "weight_quantizer")
    if wmin < -128 or wmax > 127:
        raise ValueError(f"{type(mod).__name__}: the weight grid [{wmin}, {wmax}] must fit int8")
    s_x, qmin, qmax, offset = input_grid(mod.input_quantizer, "input_quantizer")
    if s_x.numel() != 1:
        raise ValueError(f"{type(mod).__name__}: the input quantizer must be per-tensor")
    w_q, s_w = _weight_codes(mod.weight, s_w.expand(out_channels) if s_w.numel() == 1 else s_w, wmin, wmax)
    return w_q, s_w, s_x, offset, qmin, qmax


class _Int8Layer(nn.Module):
    """What Int8Linear and Int8Conv2d share: the activation grid, the epilogue (bias + the
    offset correction), the engine choice and the engine-specific packed weights."""

    def _init_common(self, weight_int8, w_scale, x_scale, x_offset, bias, quant_min, quant_max, relu):
        self.quant_min, self.quant_max, self.relu = int(quant_min), int(quant_max), bool(relu)
        if x_offset is not None and (x_scale is None or quant_min < 0):
            raise ValueError("x_offset needs a static x_scale and an unsigned grid (quant_min >= 0)")
        self.register_buffer("weight_int8", weight_int8.detach().to(torch.int8).contiguous())
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("x_scale", None if x_scale is None else x_scale.detach().float().reshape(1))
        self.register_buffer("x_offset", None if x_offset is None else x_offset.detach().float().reshape(1))
        self.register_buffer("bias", None if bias is None else bias.detach().float().reshape(-1).contiguous())
        self.engine = "auto"  # or "q2ext" / "onednn": this layer's override (gemm_engines)
        self.engines = {}  # {shape key: engine used}, what q2ext.summary reports
        self._refresh()

    def _refresh(self):
        """Recompute everything derived from the buffers (packed weights, epilogue bias)."""
        self._onednn = None
        self._border = {}
        self._pack_q2ext()
        bias = torch.zeros_like(self.w_scale) if self.bias is None else self.bias
        if self.x_offset is not None:
            bias = (bias.double() + self.x_offset.double() * self.w_scale.double() * self._tap_sums()).float()
        self.register_buffer("epilogue_bias", None if self.bias is None and self.x_offset is None else
                             bias.contiguous(), persistent=False)

    def _tap_sums(self):
        return self.weight_int8.double().flatten(1).sum(1)

    def fold_output_affine(self, gain, shift):
        """``y <- y * gain + shift`` per output channel (a BatchNorm after the layer), exact:
        the gain goes into w_scale, no weight code changes.  gain, shift: float [C_out]."""
        if self.relu:
            raise ValueError("fold_output_affine: the layer already fuses a ReLU")
        gain, shift = gain.detach().to(self.w_scale), shift.detach().to(self.w_scale)
        b = self.bias if self.bias is not None else torch.zeros_like(self.w_scale)
        self.w_scale = (self.w_scale * gain).contiguous()
        self.bias = (b * gain + shift).contiguous()
        self._refresh()

    def _grid_name(self):
        return "s8" if self.quant_min < 0 else ("u8+offset" if self.x_offset is not None else "u8")

    def _codes(self, rows):
        """int8/uint8 codes of fp32/bf16 rows [M, C] on the layer's grid (offset removed first,
        in fp32 like the fake quant)."""
        if self.x_offset is not None:
            rows = rows.float() - self.x_offset
        return ops.quantize_activation(rows, self.x_scale, self.quant_min, self.quant_max)[0]

    def _x_scale_float(self):
        return float(sanitize_scale(self.x_scale))

    def _onednn_shape_reasons(self, x):
        return []

    def _pick(self, key, x, run):
        """The engine for this call: run(engine) runs it."""
        if torch.compiler.is_compiling():  # see gemm_engines: compiled code runs q2ext's kernels
            return "q2ext"
        if gemm_engines.settled(self.engine, self.engines.get(key)):
            return self.engines[key]
        cands, reasons = {"q2ext": lambda: run("q2ext")}, {}
        why = gemm_engines.onednn_reasons(x) + self._onednn_shape_reasons(x)
        if self.x_scale is None:
            why.append("dynamic per-row activation scales (x_scale=None) run on q2ext's kernels only")
        if why:
            reasons["onednn"] = why
        else:
            cands["onednn"] = lambda: run("onednn")
        engine = gemm_engines.choose(key, cands, reasons, self.engine, "int8")
        self.engines[key] = engine
        return engine

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._refresh()  # packed weights follow the buffers to their new device
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_onednn"] = None  # oneDNN's opaque packed tensors cannot be copied or pickled
        return state


class Int8Linear(_Int8Layer):
    """y = dequant(int8 GEMM(quant(x), W_q)) + bias for x [..., in_features] fp32/bf16.

    Buffers: ``weight_int8`` int8 [out, in], ``w_scale`` f32 [out], ``x_scale`` f32 [1]
    (``None`` = dynamic per-row), ``x_offset`` f32 [1] or None (LSQ+), ``bias`` f32 [out]
    or None.  ``engine``: 'auto' / 'q2ext' / 'onednn' (see gemm_engines).
    """

    def __init__(self, weight_int8, w_scale, x_scale, bias=None, quant_min=-128, quant_max=127, relu=False,
                 x_offset=None):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self._init_common(weight_int8, w_scale, x_scale, x_offset, bias, quant_min, quant_max, relu)

    def _pack_q2ext(self):
        self.register_buffer("w_packed", ops.pack_int8_weight(self.weight_int8, signed_act=self.quant_min < 0),
                             persistent=False)

    @classmethod
    def from_qat(cls, mod, relu=False):
        """From a trained ``q2ext.nn.QuantLinear`` (its learned steps are used as is)."""
        w_q, s_w, s_x, offset, qmin, qmax = _layer_grids(mod, mod.out_features)
        return cls(w_q, s_w, s_x, mod.bias, qmin, qmax, relu, x_offset=offset)

    @classmethod
    def from_float(cls, mod: nn.Linear, x_scale=None, relu=False):
        """Symmetric per-channel int8 weights of a float ``nn.Linear`` (round to nearest);
        ``x_scale`` None = dynamic per-row activation scales."""
        s_w = (mod.weight.detach().float().abs().amax(dim=1) / 127).clamp_min(1e-12)
        w_q, s_w = _weight_codes(mod.weight, s_w, -127, 127)
        return cls(w_q, s_w, x_scale, mod.bias, -128, 127, relu)

    def _run(self, engine, rows):
        if engine == "onednn":
            if self._onednn is None:
                self._onednn = (torch.ops.onednn.qlinear_prepack(self.weight_int8, None), self._x_scale_float(),
                                torch.zeros(self.out_features, dtype=torch.int64))
            w, s_x, w_zp = self._onednn
            return torch.ops.onednn.qlinear_pointwise(
                self._codes(rows), s_x, 0, w, self.w_scale, w_zp, self.epilogue_bias, 1.0, 0, rows.dtype,
                "relu" if self.relu else "none", [], "")
        xs = rows if self.x_offset is None else rows.float() - self.x_offset
        y = ops.w8a8_linear(xs, self.w_packed, self.w_scale, self.x_scale, self.epilogue_bias, self.quant_min,
                            self.quant_max, self.relu)
        return y.to(rows.dtype)

    def forward(self, x):
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        key = (f"linear {rows.shape[0]}x{self.in_features}->{self.out_features} {str(x.dtype)[6:]} "
               f"{self._grid_name()}{' relu' if self.relu else ''}")
        engine = self._pick(key, x, lambda e: self._run(e, rows))
        return self._run(engine, rows).reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act=[{self.quant_min}, {self.quant_max}]{', offset' if self.x_offset is not None else ''}, "
                f"relu={self.relu}, engine={self.engine}")


class Int8Conv2d(_Int8Layer):
    """Conv2d as an int8 GEMM.  Input [N, C, H, W] fp32/bf16 (any memory format), output
    [N, C_out, H', W'] (channels-last strides, x's dtype).

    q2ext engine: with a static activation step the input is quantised once, in NHWC, and
    the GEMM rows are gathered from the int8 codes (a strided view over the padded NHWC
    codes, copied once; 1x1 stride-1 convs use the NHWC rows directly), one w8a8_mm per
    group on weights packed once in patch order (kh, kw, c).  Zero padding is code 0 (the
    grids have no zero point).  oneDNN engine: ``qconv2d_pointwise`` on the same codes
    (signed codes shifted to uint8 with zero point 128: oneDNN's conv takes uint8 only).
    Dynamic per-row scales (x_scale None) gather fp32 patches instead (q2ext only).
    """

    def __init__(self, weight_int8, w_scale, x_scale, bias, stride, padding, dilation, groups,
                 quant_min=-128, quant_max=127, relu=False, x_offset=None):
        super().__init__()
        self.out_channels, cin_g, self.kh, self.kw = weight_int8.shape
        self.in_channels = cin_g * groups
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)
        self._init_common(weight_int8, w_scale, x_scale, x_offset, bias, quant_min, quant_max, relu)

    def _pack_q2ext(self):
        # The codes in patch order (kh, kw, c) for the int8 im2col rows, packed once per
        # group for w8a8_mm (repacking on every call cost more than the GEMMs of a batch-1
        # ResNet-18): [groups, panels, k-quads, 64, 4].
        g, cout_g = self.groups, self.out_channels // self.groups
        patch = self.weight_int8.permute(0, 2, 3, 1).reshape(g, cout_g, -1)
        self.register_buffer("w_patch", torch.stack(
            [ops.pack_int8_weight(patch[i].contiguous(), signed_act=self.quant_min < 0) for i in range(g)]),
            persistent=False)

    @classmethod
    def from_qat(cls, mod, relu=False):
        """From a trained ``q2ext.nn.QuantConv2d`` (zeros padding only)."""
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise ValueError("Int8Conv2d: only numeric zero padding is supported")
        w_q, s_w, s_x, offset, qmin, qmax = _layer_grids(mod, mod.out_channels)
        return cls(w_q, s_w, s_x, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups, qmin, qmax, relu,
                   x_offset=offset)

    def _onednn_shape_reasons(self, x):
        """oneDNN's int8 conv (torch 2.14) gave wrong results or crashed on some irregular
        shapes in a randomized sweep (tests/test_gemm_engines.py): it is used only where
        every kernel dimension, stride, padding and dilation is square, no output row or
        column lies in the padding alone, the kernel fits the unpadded input when
        strided, and a strided conv has at least 2x2 outputs (1-wide strided outputs
        were the failures left in the regular domain)."""
        h, w = x.shape[-2:]
        oh, ow = self._out_hw(h, w)
        k, s, p, d = self.kh, self.stride[0], self.padding[0], self.dilation[0]
        ext = d * (k - 1) + 1
        why = []
        if not (self.kw == k and self.stride[1] == s and self.padding[1] == p and self.dilation[1] == d):
            why.append("oneDNN's int8 conv is used for square kernel/stride/padding/dilation only")
        if p > d * (k - 1):
            why.append("padding wider than the dilated kernel (outputs made of padding only)")
        if s > 1 and (h < ext or w < ext or oh < 2 or ow < 2):
            why.append(f"strided conv on a small input ({h}x{w} -> {oh}x{ow}): wrong results seen in oneDNN")
        return why

    def _out_hw(self, h, w):
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        return oh, ow

    def _border_correction(self, h, w, dtype):
        """[1, C_out, H', W'] channels-last: offset * s_W * (sum over the valid taps - sum over
        all taps), the part of the offset term the epilogue bias (all taps) gets wrong at
        the zero-padded border.  None when no tap ever falls on the padding."""
        if self.x_offset is None or self.padding == (0, 0):
            return None
        key = (h, w, dtype)
        if key not in self._border:
            ones = torch.ones(1, self.in_channels, h, w, dtype=torch.float64, device=self.weight_int8.device)
            valid = F.conv2d(ones, self.weight_int8.double(), None, self.stride, self.padding, self.dilation,
                             self.groups)
            delta = (valid - self._tap_sums().reshape(1, -1, 1, 1)) * (
                self.x_offset.double() * self.w_scale.double()).reshape(1, -1, 1, 1)
            self._border[key] = delta.to(dtype).contiguous(memory_format=torch.channels_last)
        return self._border[key]

    def forward(self, x):
        n, c, h, w = x.shape
        oh, ow = self._out_hw(h, w)
        border = self._border_correction(h, w, x.dtype)
        relu = self.relu and border is None  # else the ReLU follows the border correction
        key = (f"conv {n}x{c}x{h}x{w}->{self.out_channels} k{self.kh}x{self.kw} s{self.stride} p{self.padding} "
               f"d{self.dilation} g{self.groups} {str(x.dtype)[6:]} {self._grid_name()}{' relu' if relu else ''}")
        run = lambda e: self._run(e, x, n, h, w, oh, ow, relu)  # noqa: E731
        y = run(self._pick(key, x, run))
        if border is not None:
            y = y + border
            if self.relu:
                y = torch.relu(y)
        return y

    def _nhwc_rows(self, x):
        # a free view when x is channels-last (every Int8Conv2d output is)
        return x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)

    def _run(self, engine, x, n, h, w, oh, ow, relu):
        if engine == "onednn":
            return self._run_onednn(x, n, h, w, relu)
        cin_g, cout_g = self.in_channels // self.groups, self.out_channels // self.groups
        rows = self._nhwc_rows(x)
        pointwise = (self.kh, self.kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        if self.x_scale is not None and not pointwise:
            rows = self._codes(rows)  # quantise once, gather int8 patches
        elif self.x_offset is not None:
            rows = rows.float() - self.x_offset
        ph, pw = self.padding
        src = F.pad(rows.view(n, h, w, self.in_channels), (0, 0, pw, pw, ph, ph))
        sn, sh, sw, sc = src.stride()
        outs = []
        for g in range(self.groups):
            sl = slice(g * cout_g, (g + 1) * cout_g)
            bias = None if self.epilogue_bias is None else self.epilogue_bias[sl]
            part = src[..., g * cin_g:(g + 1) * cin_g]
            patches = part.as_strided((n, oh, ow, self.kh, self.kw, cin_g),
                                      (sn, sh * self.stride[0], sw * self.stride[1], sh * self.dilation[0],
                                       sw * self.dilation[1], sc), part.storage_offset()).reshape(n * oh * ow, -1)
            if patches.dtype in (torch.int8, torch.uint8):
                y = ops.w8a8_mm(patches, self.w_patch[g], self.x_scale, self.w_scale[sl], bias,
                                out_dtype=x.dtype, relu=relu)
            else:
                y = ops.w8a8_linear(patches, self.w_patch[g], self.w_scale[sl], self.x_scale, bias, self.quant_min,
                                    self.quant_max, relu).to(x.dtype)
            outs.append(y.view(n, oh, ow, cout_g))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.permute(0, 3, 1, 2)

    def _run_onednn(self, x, n, h, w, relu):
        signed = self.quant_min < 0
        if self._onednn is None:
            s_x, zp = self._x_scale_float(), 128 if signed else 0
            packed = torch.ops.onednn.qconv_prepack(self.weight_int8, self.w_scale, s_x, zp, list(self.stride),
                                                    list(self.padding), list(self.dilation), self.groups, None)
            self._onednn = (packed, s_x, zp, torch.zeros(self.out_channels, dtype=torch.int64))
        packed, s_x, zp, w_zp = self._onednn
        q = self._codes(self._nhwc_rows(x))
        if signed:  # oneDNN's conv takes uint8: q + 128 with zero point 128, the same numbers
            q = q.view(torch.uint8).bitwise_xor_(0x80)
        qx = q.view(n, h, w, self.in_channels).permute(0, 3, 1, 2)
        return torch.ops.onednn.qconv2d_pointwise(
            qx, s_x, zp, packed, self.w_scale, w_zp, self.epilogue_bias, list(self.stride), list(self.padding),
            list(self.dilation), self.groups, 1.0, 0, x.dtype, "relu" if relu else "none", [], "none")

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kh}, {self.kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"act=[{self.quant_min}, {self.quant_max}]{', offset' if self.x_offset is not None else ''}, "
                f"engine={self.engine}")


class Int4Linear(nn.Module):
    """Weight-only int4 linear: y = x @ W.T + bias, W[n, k] = (q - 8) * scales[k//g, n] +
    zeros[k//g, n].  x [..., in_features] fp32/bf16 (in_features a multiple of group_size).
    Engines: q2ext's ``w4a16_mm`` or torch's ``_weight_int4pack_mm_for_cpu`` (same
    convention; its scales are cast to x's dtype, so bf16 calls agree to bf16 rounding)."""

    def __init__(self, codes, scales, zeros, bias=None, group_size=128):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = int(group_size)
        self.register_buffer("w_packed", ops.pack_int4(codes))
        self.register_buffer("scales", scales.detach().float().contiguous())
        self.register_buffer("zeros", zeros.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.engine = "auto"  # or "q2ext" / "torch"
        self.engines = {}
        self._torch_packed = {}

    @classmethod
    def from_qat(cls, mod, group_size=128):
        """From a ``QuantLinear`` whose weight quantizer is a <= 4-bit signed LSQ: the learned
        per-channel (or per-tensor) step becomes every group's scale, zeros are 0."""
        step, qmin, qmax = quantizer_grid(mod.weight_quantizer, "weight_quantizer")
        if qmin < -8 or qmax > 7:
            raise ValueError(f"Int4Linear: the weight grid [{qmin}, {qmax}] does not fit signed int4")
        step = step.expand(mod.out_features) if step.numel() == 1 else step
        w_q, _ = _weight_codes(mod.weight, step, qmin, qmax)
        groups = mod.in_features // group_size
        scales = step.reshape(1, -1).repeat(groups, 1)
        return cls(w_q.to(torch.int16) + 8, scales, torch.zeros_like(scales), mod.bias, group_size)

    @classmethod
    def from_float(cls, mod: nn.Linear, group_size=128):
        """Asymmetric group-wise round-to-nearest int4 of a float ``nn.Linear``."""
        w = mod.weight.detach().float()
        n, k = w.shape
        wg = w.reshape(n, k // group_size, group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).reshape(n, k)
        # (q - 8) * s + z = lo + q * s  =>  z = lo + 8 s
        return cls(codes.to(torch.int16), scale.T.contiguous(), (lo + 8 * scale).T.contiguous(), mod.bias, group_size)

    def _run(self, engine, rows):
        if engine == "torch":
            if rows.dtype not in self._torch_packed:
                codes = ops.unpack_int4(self.w_packed, self.out_features).to(torch.int32)
                sz = torch.stack([self.scales, self.zeros], dim=-1).to(rows.dtype).contiguous()
                self._torch_packed[rows.dtype] = (torch._convert_weight_to_int4pack_for_cpu(codes, 1), sz)
            packed, sz = self._torch_packed[rows.dtype]
            return torch._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, sz)
        return ops.w4a16_mm(rows, self.w_packed, self.scales, self.zeros, self.group_size)

    def forward(self, x):
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        key = f"int4 {rows.shape[0]}x{self.in_features}->{self.out_features} g{self.group_size} {str(x.dtype)[6:]}"
        y = self._run(self._pick(key, x, rows), rows)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _pick(self, key, x, rows):
        if torch.compiler.is_compiling():  # see gemm_engines: compiled code runs q2ext's kernels
            return "q2ext"
        if gemm_engines.settled(self.engine, self.engines.get(key), "int4"):
            return self.engines[key]
        cands, reasons = {"q2ext": lambda: self._run("q2ext", rows)}, {}
        why = gemm_engines.int4pack_reasons(x, self.out_features, self.in_features, self.group_size)
        if why:
            reasons["torch"] = why
        else:
            cands["torch"] = lambda: self._run("torch", rows)
        self.engines[key] = gemm_engines.choose(key, cands, reasons, self.engine, "int4")
        return self.engines[key]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._torch_packed = {}
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"engine={self.engine}")


INT_LAYERS = (Int8Linear, Int8Conv2d, Int4Linear)


def describe_int_layer(m) -> list:
    """[type, weight, activation, engines] strings of an int layer, for q2ext.summary: the
    engine per input shape seen so far, else the setting ('auto' = chosen at the first forward)."""
    if isinstance(m, Int4Linear):
        weight, act = f"int4 g{m.group_size}", "float (x dtype)"
    else:
        weight = "int8 per-channel"
        act = (f"{'int8' if m.quant_min < 0 else 'uint8'} [{m.quant_min}, {m.quant_max}]"
               + (" + offset" if m.x_offset is not None else "") + (" dynamic" if m.x_scale is None else ""))
    shapes = "; ".join(f"{k.split(' ')[1]}: {v}" for k, v in m.engines.items())
    return [type(m).__name__, weight, act, shapes or f"{m.engine} (no forward yet)"]
