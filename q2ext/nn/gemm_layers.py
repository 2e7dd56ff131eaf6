"""Real int8 / int4 inference layers built from trained QAT layers.

- :class:`Int8Linear` / :class:`Int8Conv2d`: W8A8 (or fewer bits on an 8-bit grid):
  the activation is quantised with the QAT input quantizer's learned step inside the
  fused ``q2ext::w8a8_linear`` op, the weight is stored as int8 codes with per-output-
  channel steps, bias (+ ReLU) run in the GEMM epilogue.  ``y`` equals the fake-quant
  layer's ``F.linear(Q(x), Q(W), b)`` up to fp32 summation order, since
  ``Q(x) = q_x * s_x`` and ``Q(W) = q_W * s_W`` exactly.
- :class:`Int4Linear`: weight-only int4 (``q2ext::w4a16_mm``), group-wise scales/zeros.

Supported quantizers: LSQ (signed/unsigned, per-tensor input, per-tensor or per-channel
weight), LSQ+ with its offset inactive, PACT (input).  An active LSQ+ offset has no
zero-point path in the int8 kernel and raises.  Inference only (no autograd).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .._ops.fake_quant import lsq_levels

__all__ = ["Int8Linear", "Int8Conv2d", "Int4Linear", "quantizer_grid"]


def quantizer_grid(q, name="quantizer"):
    """(step float32 [C], quant_min, quant_max) of a trained q2ext quantizer."""
    kind = type(q).__name__
    if kind == "LSQQuantizer":
        qn, qp = lsq_levels(q.bits, bool(q.is_signed))
        return q.step_size(), -qn, qp
    if kind == "LSQPlusQuantizer":
        if bool(q.offset_active):
            raise ValueError(f"{name}: LSQ+ with an active offset has no int8 zero-point path; "
                             "use offset='auto' on non-negative data or LSQ")
        return q.step_size(), 0, 2 ** q.bits - 1
    if kind == "PACTQuantizer":
        return q.step_size(), 0, 2 ** q.bits - 1
    raise TypeError(f"{name}: cannot convert a {kind} (supported: LSQQuantizer, LSQPlusQuantizer, PACTQuantizer)")


def _weight_codes(w, step, qmin, qmax):
    """Per-output-channel int8 codes exactly as the fake quant rounds them."""
    s = step.reshape(-1, *([1] * (w.dim() - 1))).expand(w.shape[0], *([1] * (w.dim() - 1)))
    v = (w.detach().float() * (1.0 / s)).clamp(qmin, qmax)
    return torch.round(v).to(torch.int8), s.reshape(-1).contiguous()


class Int8Linear(nn.Module):
    """y = dequant(int8 GEMM(quant(x), W_q)) + bias for x [..., in_features] fp32/bf16.

    Buffers: ``w_packed`` (VNNI panels), ``w_scale`` f32 [out], ``x_scale`` f32 [1]
    (``None`` = dynamic per-row), ``bias`` f32 [out] or None.
    """

    def __init__(self, weight_int8, w_scale, x_scale, bias=None, quant_min=-128, quant_max=127, relu=False):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.quant_min, self.quant_max, self.relu = int(quant_min), int(quant_max), bool(relu)
        self.register_buffer("w_packed", ops.pack_int8_weight(weight_int8, signed_act=quant_min < 0))
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("x_scale", None if x_scale is None else x_scale.detach().float().reshape(1))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_qat(cls, mod, relu=False):
        """From a trained ``q2ext.nn.QuantLinear`` (its learned steps are used as is)."""
        s_w, wmin, wmax = quantizer_grid(mod.weight_quantizer, "weight_quantizer")
        if wmin < -128 or wmax > 127:
            raise ValueError("Int8Linear: the weight grid must fit int8")
        s_x, qmin, qmax = quantizer_grid(mod.input_quantizer, "input_quantizer")
        if s_x.numel() != 1:
            raise ValueError("Int8Linear: the input quantizer must be per-tensor")
        w_q, s_w = _weight_codes(mod.weight, s_w.expand(mod.out_features) if s_w.numel() == 1 else s_w, wmin, wmax)
        return cls(w_q, s_w, s_x, mod.bias, qmin, qmax, relu)

    @classmethod
    def from_float(cls, mod: nn.Linear, x_scale=None, relu=False):
        """Symmetric per-channel int8 weights of a float ``nn.Linear`` (round to nearest);
        ``x_scale`` None = dynamic per-row activation scales."""
        s_w = (mod.weight.detach().float().abs().amax(dim=1) / 127).clamp_min(1e-12)
        w_q, s_w = _weight_codes(mod.weight, s_w, -127, 127)
        return cls(w_q, s_w, x_scale, mod.bias, -128, 127, relu)

    def forward(self, x):
        shape = x.shape
        y = ops.w8a8_linear(x.reshape(-1, self.in_features), self.w_packed, self.w_scale, self.x_scale,
                             self.bias, self.quant_min, self.quant_max, self.relu)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act=[{self.quant_min}, {self.quant_max}], relu={self.relu}")


class Int8Conv2d(nn.Module):
    """Conv2d as an int8 GEMM; groups loop over per-group weights.  Input [N, C, H, W]
    fp32/bf16, output [N, C_out, H', W'] (channels-last strides, x's dtype).

    With a static activation step (every converted QAT layer) the input is quantised once,
    in NHWC, and the GEMM rows are gathered from the int8 codes (a strided view over the
    padded NHWC codes, copied once): a quarter of the bytes of an fp32 im2col and no
    transpose.  Zero padding is code 0 (the grids have no zero point).  1x1/stride-1 convs
    use the NHWC rows directly; dynamic (per-row) scales keep the fp32 im2col (F.unfold),
    since the scales belong to the patch rows.
    """

    def __init__(self, weight_int8, w_scale, x_scale, bias, stride, padding, dilation, groups,
                 quant_min=-128, quant_max=127, relu=False):
        super().__init__()
        self.out_channels, cin_g, self.kh, self.kw = weight_int8.shape
        self.in_channels = cin_g * groups
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        cout_g = self.out_channels // groups
        self.linears = nn.ModuleList(
            Int8Linear(weight_int8[g * cout_g:(g + 1) * cout_g].reshape(cout_g, -1),
                       w_scale[g * cout_g:(g + 1) * cout_g], x_scale,
                       None if bias is None else bias[g * cout_g:(g + 1) * cout_g], quant_min, quant_max, relu)
            for g in range(groups))
        # The same codes in patch order (kh, kw, c) for the int8 im2col rows, packed once
        # per group for w8a8_mm (repacking them on every call cost more than the GEMMs of
        # a batch-1 ResNet-18): [groups, panels, k-quads, 64, 4].
        patch = weight_int8.permute(0, 2, 3, 1).reshape(groups, cout_g, -1)
        self.register_buffer("w_patch", torch.stack(
            [ops.pack_int8_weight(patch[g].contiguous(), signed_act=quant_min < 0) for g in range(groups)]))

    @classmethod
    def from_qat(cls, mod, relu=False):
        """From a trained ``q2ext.nn.QuantConv2d`` (zeros padding only)."""
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise ValueError("Int8Conv2d: only numeric zero padding is supported")
        s_w, wmin, wmax = quantizer_grid(mod.weight_quantizer, "weight_quantizer")
        s_x, qmin, qmax = quantizer_grid(mod.input_quantizer, "input_quantizer")
        if s_x.numel() != 1:
            raise ValueError("Int8Conv2d: the input quantizer must be per-tensor")
        w_q, s_w = _weight_codes(mod.weight, s_w.expand(mod.out_channels) if s_w.numel() == 1 else s_w, wmin, wmax)
        return cls(w_q, s_w, s_x, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups, qmin, qmax, relu)

    def forward(self, x):
        n, _, h, w = x.shape
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kw - 1) - 1) // self.stride[1] + 1
        pointwise = (self.kh, self.kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        if pointwise or self.linears[0].x_scale is None:
            outs = self._float_rows(x, n, oh, ow, pointwise)
        else:
            outs = self._int8_rows(x, n, h, w, oh, ow)
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.permute(0, 3, 1, 2)

    def _float_rows(self, x, n, oh, ow, pointwise):
        cin_g = self.in_channels // self.groups
        outs = []
        for g, lin in enumerate(self.linears):
            xg = x[:, g * cin_g:(g + 1) * cin_g] if self.groups > 1 else x
            if pointwise:  # the NHWC rows are the GEMM rows: no im2col
                rows = xg.permute(0, 2, 3, 1).reshape(-1, cin_g)
            else:
                cols = F.unfold(xg, (self.kh, self.kw), self.dilation, self.padding, self.stride)
                rows = cols.transpose(1, 2).reshape(-1, cin_g * self.kh * self.kw)
            outs.append(lin(rows).reshape(n, oh, ow, -1))
        return outs

    def _int8_rows(self, x, n, h, w, oh, ow):
        lin0 = self.linears[0]
        cin_g, cout_g = self.in_channels // self.groups, self.out_channels // self.groups
        # NHWC rows: a free view when x is channels-last (every Int8Conv2d output is).
        q, _ = ops.quantize_activation(x.permute(0, 2, 3, 1).reshape(-1, self.in_channels), lin0.x_scale,
                                        lin0.quant_min, lin0.quant_max)
        ph, pw = self.padding
        q = F.pad(q.view(n, h, w, self.in_channels), (0, 0, pw, pw, ph, ph))
        sn, sh, sw, sc = q.stride()
        outs = []
        for g, lin in enumerate(self.linears):
            qg = q[..., g * cin_g:(g + 1) * cin_g]
            patches = qg.as_strided((n, oh, ow, self.kh, self.kw, cin_g),
                                    (sn, sh * self.stride[0], sw * self.stride[1], sh * self.dilation[0],
                                     sw * self.dilation[1], sc), qg.storage_offset())
            rows = patches.reshape(n * oh * ow, -1)
            y = ops.w8a8_mm(rows, self.w_patch[g], lin.x_scale, lin.w_scale, lin.bias,
                             out_dtype=x.dtype, relu=lin.relu)
            outs.append(y.view(n, oh, ow, cout_g))
        return outs

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kh}, {self.kw}), stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")


class Int4Linear(nn.Module):
    """Weight-only int4 linear: y = x @ W.T + bias, W[n, k] = (q - 8) * scales[k//g, n] +
    zeros[k//g, n].  x [..., in_features] fp32/bf16 (in_features a multiple of group_size)."""

    def __init__(self, codes, scales, zeros, bias=None, group_size=128):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = int(group_size)
        self.register_buffer("w_packed", ops.pack_int4(codes))
        self.register_buffer("scales", scales.detach().float().contiguous())
        self.register_buffer("zeros", zeros.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

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

    def forward(self, x):
        shape = x.shape
        y = ops.w4a16_mm(x.reshape(-1, self.in_features), self.w_packed, self.scales, self.zeros, self.group_size)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
