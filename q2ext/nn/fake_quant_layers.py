"""Drop-in QAT layers: QuantConv2d, QuantConvTranspose2d, QuantLinear.

Each is a subclass of its float layer (so ``isinstance(m, nn.Conv2d)`` still holds and
every attribute - stride, padding, groups, dilation, padding_mode - means what it did)
with two child modules: ``weight_quantizer`` (default: signed per-output-channel LSQ) and
``input_quantizer`` (default: per-tensor LSQ, unsigned when the input is non-negative,
LSQ+ when it goes negative, decided from the first batch).  ``from_float`` keeps the float
layer's own ``weight``/``bias`` Parameter objects, so an optimizer or a tied weight that
refers to them keeps working, and a float checkpoint loads with ``strict=False``.

The forward is the float layer's op applied to ``input_quantizer(x)`` and
``weight_quantizer(weight)``: no extra copies (the q2ext kernels keep ``x``'s memory
format, so channels_last stays channels_last), no host synchronisation.

Memory: the float op saves its (quantized) input and weight for its backward, and the
quantizers' backward saves their float inputs: two full-size copies per layer where a
float layer keeps one.  In eager training a layer therefore lets the float op save the
quantizer's float input in place of the quantized tensor (``saved_tensors_hooks``) and
the backward recomputes the quantized tensor from it, one fake-quant forward, bit for bit
the same values.  The training step's peak memory stays near the float model's.  Under
``torch.compile`` the hooks are off and Inductor's partitioner decides what to save (it
keeps the quantized tensors today).  Set ``layer.recompute_quantized = False`` to save the
quantized tensors in eager too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..qconfig import LayerQConfig
from .fake_quant import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer

__all__ = ["QuantConv2d", "QuantConvTranspose2d", "QuantLinear", "QUANT_LAYERS", "FLOAT_TO_QUANT",
           "make_weight_quantizer", "make_input_quantizer"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_weight_quantizer(cfg: LayerQConfig, out_channels: int, axis: int, device=None) -> nn.Module:
    """The weight quantizer a layer with `out_channels` outputs gets under `cfg`.

    Args:
        cfg: the layer's configuration.
        out_channels: number of output channels (per-channel scale length).
        axis: the output-channel dimension of the (possibly regrouped) weight.
        device: where the learnable scale lives (the weight's device).
    """
    if cfg.w_quantizer == "none":
        return nn.Identity()
    per_ch = cfg.w_per_channel
    q = LSQQuantizer(cfg.w_bits, signed=True, axis=axis if per_ch else None,
                     num_channels=out_channels if per_ch else 1, kind="weight", init_batches=1)
    return q.to(device) if device is not None else q


def make_input_quantizer(cfg: LayerQConfig, in_channels: int, axis: int, device=None) -> nn.Module:
    """The input-activation quantizer under `cfg` for inputs with `in_channels` along `axis`."""
    if cfg.a_quantizer == "none":
        return nn.Identity()
    kw = dict(axis=axis if cfg.a_per_channel else None, num_channels=in_channels if cfg.a_per_channel else 1,
              kind="activation", init_batches=cfg.init_batches)
    if cfg.a_quantizer == "auto":
        q = LSQPlusQuantizer(cfg.a_bits, offset="auto", **kw)
    elif cfg.a_quantizer == "lsq+":
        q = LSQPlusQuantizer(cfg.a_bits, offset="learn", **kw)
    elif cfg.a_quantizer == "pact":
        q = PACTQuantizer(cfg.a_bits, **kw)
    else:
        q = LSQQuantizer(cfg.a_bits, signed="auto" if cfg.a_signed is None else cfg.a_signed, **kw)
    if not cfg.a_learnable:
        q.freeze()
    return q.to(device) if device is not None else q


def _check_float_layer(mod: nn.Module, base: type, name: str) -> None:
    """Errors naming the layer and the argument that q2ext cannot quantize."""
    label = f"layer {name!r} ({type(mod).__name__})" if name else type(mod).__name__
    if not isinstance(mod, base):
        raise TypeError(f"{label}: expected an instance of {base.__name__}")
    w = mod.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ValueError(f"{label}: weight is not materialised yet (lazy module); run one forward first")
    if w.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{label}: weight dtype {w.dtype} is not supported (float32, float16 or bfloat16)")
    if w.device.type == "meta":
        raise ValueError(f"{label}: weight is on the meta device; materialise the model first")
    if not isinstance(w, nn.Parameter) or getattr(mod, "parametrizations", None) is not None:
        # weight_norm / spectral_norm / parametrize recompute `weight` from other tensors.
        raise ValueError(f"{label}: weight is computed (weight_norm, spectral_norm or a parametrization), "
                         "not a plain Parameter; remove it before prepare")


class _Recompute:
    """What a pack hook keeps instead of a fake-quantized tensor: the quantizer's input, the
    op call that produced the tensor, and the geometry of the (view of the) tensor saved."""

    __slots__ = ("source", "fn", "versions", "geometry")

    def __init__(self, source, fn, saved):
        self.source, self.fn = source, fn
        bound = [source] + [v for v in getattr(fn, "keywords", {}).values() if isinstance(v, torch.Tensor)]
        self.versions = [(t, t._version) for t in bound]
        self.geometry = (saved.size(), saved.stride(), saved.storage_offset())

    def materialize(self) -> torch.Tensor:
        if any(t._version != v for t, v in self.versions):
            raise RuntimeError("q2ext: a quantized layer's input or quantizer parameter was modified in place "
                               "between the forward and the backward; the quantized tensor the backward needs "
                               "cannot be recomputed (set layer.recompute_quantized = False to save it instead)")
        with torch.no_grad():
            y = self.fn(self.source)
        size, stride, offset = self.geometry
        if y.size() == size and y.stride() == stride and offset == 0:
            return y
        return y.as_strided(size, stride, offset)


def _recompute_entries(tensors):
    """(tensor, its quantizer input, the op call) for each tensor a q2ext quantizer produced
    in this forward and whose input is still alive."""
    entries = []
    for t in tensors:
        info = getattr(t, "_q2ext_recompute", None)
        source = info[0]() if info is not None else None
        if source is not None and t.numel() > 0:
            entries.append((t.untyped_storage().data_ptr(), t.dtype, source, info[1]))
    return entries


def _float_op(layer, fn, xq, wq, *args):
    """``fn(xq, wq, *args)``, with the quantized tensors that fn saves for its backward
    replaced by their recipe (see the module docstring)."""
    if not (layer.recompute_quantized and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return fn(xq, wq, *args)
    entries = _recompute_entries((xq, wq))
    if not entries:
        return fn(xq, wq, *args)

    def pack(t):
        if t.dtype.is_floating_point:
            ptr = t.untyped_storage().data_ptr()
            for e_ptr, dtype, source, op in entries:
                if ptr == e_ptr and t.dtype == dtype:
                    return _Recompute(source, op, t)
        return t

    def unpack(packed):
        return packed.materialize() if isinstance(packed, _Recompute) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(xq, wq, *args)


class _QuantMixin:
    """Shared by the quantized layers: construction from a float layer and quantizer access."""

    _float_type: type = nn.Module
    recompute_quantized = True  # eager: recompute quantized tensors in the backward, do not save them

    def _set_quantizers(self, cfg: LayerQConfig | None, weight_quantizer, input_quantizer, device):
        cfg = cfg if cfg is not None else LayerQConfig()
        self.weight_quantizer = (weight_quantizer if weight_quantizer is not None
                                 else make_weight_quantizer(cfg, self._out_channels(), self._weight_axis(), device))
        self.input_quantizer = (input_quantizer if input_quantizer is not None
                                else make_input_quantizer(cfg, self._in_channels(), self._input_axis(), device))

    @classmethod
    def from_float(cls, mod: nn.Module, qconfig: LayerQConfig | None = None, *, weight_quantizer=None,
                   input_quantizer=None, name: str = ""):
        """Quantized copy of float layer `mod` that shares its weight/bias Parameters.

        Args:
            mod: an ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` with float32,
                float16 or bfloat16 weights.
            qconfig: how to quantize (default :class:`LayerQConfig`: W4A4 LSQ).
            weight_quantizer, input_quantizer: explicit modules that replace the
                qconfig's choice (any module mapping a tensor to a same-shaped tensor).
            name: the layer's name in its model, used in error messages.
        """
        _check_float_layer(mod, cls._float_type, name)
        new = cls._empty_like(mod)
        new.weight = mod.weight
        new.bias = mod.bias
        new._set_quantizers(qconfig, weight_quantizer, input_quantizer, mod.weight.device)
        new.train(mod.training)
        # Hooks (e.g. feature taps of timm / torchvision) belong to the layer, not its class.
        new._forward_hooks.update(mod._forward_hooks)
        new._forward_pre_hooks.update(mod._forward_pre_hooks)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the forward uses (same shape, dtype as ``weight``)."""
        return self.weight_quantizer(self.weight)

    def quantizers(self) -> dict:
        return {"weight": self.weight_quantizer, "input": self.input_quantizer}


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` on fake-quantized input and weight.

    Input ``x``: float ``[N, C_in, H, W]`` (any memory format); weight
    ``[C_out, C_in/groups, kH, kW]`` quantized per output channel (axis 0).
    Extra keyword args: ``qconfig`` (LayerQConfig), ``weight_quantizer``, ``input_quantizer``.
    """

    _float_type = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, qconfig=None,
                 weight_quantizer=None, input_quantizer=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._set_quantizers(qconfig, weight_quantizer, input_quantizer, self.weight.device)

    @classmethod
    def _empty_like(cls, m: nn.Conv2d):
        # Built on the meta device: the float layer's parameters replace these at once.
        return cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                   m.bias is not None, m.padding_mode, device="meta", weight_quantizer=nn.Identity(),
                   input_quantizer=nn.Identity())

    def _out_channels(self):
        return self.out_channels

    def _in_channels(self):
        return self.in_channels

    def _weight_axis(self):
        return 0

    def _input_axis(self):
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float_op(self, self._conv_forward, self.input_quantizer(x), self.weight_quantizer(self.weight),
                         self.bias)


class QuantConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` on fake-quantized input and weight.

    Input ``x``: float ``[N, C_in, H, W]``; weight ``[C_in, C_out/groups, kH, kW]``.  Per
    output channel means per ``(group, C_out/groups index)`` pair: with ``groups > 1`` the
    weight is regrouped to ``[C_in/groups, C_out, kH, kW]`` (a copy, weights are small)
    and quantized along axis 1, so every output channel has its own scale.
    """

    _float_type = nn.ConvTranspose2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *, qconfig=None,
                 weight_quantizer=None, input_quantizer=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        self._set_quantizers(qconfig, weight_quantizer, input_quantizer, self.weight.device)

    @classmethod
    def _empty_like(cls, m: nn.ConvTranspose2d):
        return cls(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.output_padding, m.groups,
                   m.bias is not None, m.dilation, m.padding_mode, device="meta",
                   weight_quantizer=nn.Identity(), input_quantizer=nn.Identity())

    def _out_channels(self):
        return self.out_channels

    def _in_channels(self):
        return self.in_channels

    def _weight_axis(self):
        return 1

    def _input_axis(self):
        return 1

    def quantized_weight(self) -> torch.Tensor:
        w, g = self.weight, self.groups
        per_channel = getattr(self.weight_quantizer, "axis", None) is not None
        if g == 1 or not per_channel:
            return self.weight_quantizer(w)
        cin_g, cout_g = w.shape[0] // g, w.shape[1]
        # [g*cin_g, cout_g, k, k] -> [cin_g, g*cout_g, k, k]: output channel o = group*cout_g + j.
        regrouped = w.unflatten(0, (g, cin_g)).transpose(0, 1).reshape(cin_g, g * cout_g, *w.shape[2:])
        wq = self.weight_quantizer(regrouped)
        return wq.unflatten(1, (g, cout_g)).transpose(0, 1).reshape(w.shape)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"QuantConvTranspose2d: padding_mode must be 'zeros', got {self.padding_mode!r}")
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return _float_op(self, F.conv_transpose2d, self.input_quantizer(x), self.quantized_weight(), self.bias,
                         self.stride, self.padding, output_padding, self.groups, self.dilation)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` on fake-quantized input ``[..., in_features]`` and weight ``[out, in]`` (axis 0)."""

    _float_type = nn.Linear

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, qconfig=None,
                 weight_quantizer=None, input_quantizer=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._set_quantizers(qconfig, weight_quantizer, input_quantizer, self.weight.device)

    @classmethod
    def _empty_like(cls, m: nn.Linear):
        return cls(m.in_features, m.out_features, m.bias is not None, device="meta",
                   weight_quantizer=nn.Identity(), input_quantizer=nn.Identity())

    def _out_channels(self):
        return self.out_features

    def _in_channels(self):
        return self.in_features

    def _weight_axis(self):
        return 0

    def _input_axis(self):
        return -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float_op(self, F.linear, self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


QUANT_LAYERS = (QuantConv2d, QuantConvTranspose2d, QuantLinear)
FLOAT_TO_QUANT = {nn.Conv2d: QuantConv2d, nn.ConvTranspose2d: QuantConvTranspose2d, nn.Linear: QuantLinear}
