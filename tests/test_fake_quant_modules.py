"""q2ext.nn quantizers and layers against independent expectations.

Oracles: q2ext.reference.fake_quant (quantizer numerics and gradients, wrapped in an autograd
Function below), the LSQ/LSQ+/PACT init formulas written out here, and torch's own
float conv/linear ops on reference-quantized tensors.
"""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q2ext
from q2ext._ops.fake_quant import MODE_LSQ, MODE_PACT
from q2ext.reference import fake_quant as reference
from q2ext.nn import (LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, QuantConv2d, QuantConvTranspose2d,
                      QuantLinear)

BITS = 4


class RefFakeQuant(torch.autograd.Function):
    """reference.fake_quant / fake_quant_backward as a differentiable op (the oracle)."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, axis, mode, g):
        ctx.save_for_backward(x, scale, offset)
        ctx.args = (qmin, qmax, axis, mode, g)
        return reference.fake_quant(x, scale, None, offset, qmin, qmax, axis, mode)

    @staticmethod
    def backward(ctx, dy):
        x, scale, offset = ctx.saved_tensors
        qmin, qmax, axis, mode, g = ctx.args
        dx, ds, doff = reference.fake_quant_backward(dy, x, scale, None, offset, qmin, qmax, axis, mode, g)
        return dx, ds, doff, None, None, None, None, None


def ref_lsq(x, scale, bits, signed, axis=None, offset=None, g=1.0):
    q_n, q_p = reference.lsq_levels(bits, signed)
    return RefFakeQuant.apply(x, scale, offset, -q_n, q_p, axis, MODE_LSQ, g)


def ref_pact(x, alpha, bits, axis=None):
    return RefFakeQuant.apply(x, alpha, None, 0, 2 ** bits - 1, axis, MODE_PACT, 1.0)


def act_g(x, channels, q_p):
    """LSQ paper: g = 1/sqrt(N Q_P), N = features per sample per scale value."""
    return 1.0 / math.sqrt(x.numel() / x.shape[0] / channels * q_p)


def init_lsq(x, bits, signed, axis=None):
    _, q_p = reference.lsq_levels(bits, signed)
    v = x.abs() if axis is None else x.abs().transpose(0, axis).reshape(x.shape[axis], -1)
    m = v.mean().reshape(1) if axis is None else v.mean(dim=1)
    return 2 * m / math.sqrt(q_p)


def grads_of(fn, *tensors, dy):
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*ts)
    y.backward(dy)
    return y.detach(), [t.grad for t in ts]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------ LSQ

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_matches_reference(bits, signed, axis):
    x = torch.randn(3, 5, 7, 6) + (0 if signed else 1.0)
    c = 1 if axis is None else 5
    q = LSQQuantizer(bits, signed=signed, axis=axis, num_channels=c)
    q(x)  # first batch initialises
    torch.testing.assert_close(q.scale.detach(), init_lsq(x, bits, signed, axis), rtol=1e-6, atol=0)
    scale = q.scale.detach().clone()
    x2 = torch.randn(3, 5, 7, 6) * 1.5
    dy = torch.randn_like(x2)
    _, q_p = reference.lsq_levels(bits, signed)
    g = act_g(x2, c, q_p)
    y_ref, (dx_ref, ds_ref) = grads_of(lambda a, s: ref_lsq(a, s, bits, signed, axis, g=g), x2, scale, dy=dy)
    x2r = x2.clone().requires_grad_()
    y = q(x2r)
    y.backward(dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(x2r.grad, dx_ref)
    torch.testing.assert_close(q.scale.grad, ds_ref, rtol=1e-5, atol=1e-7)


def test_weight_kind_grad_scale_counts_elements_per_scale():
    w = torch.randn(8, 4, 3, 3)
    q = LSQQuantizer(BITS, signed=True, axis=0, num_channels=8, kind="weight")
    q(w)
    dy = torch.randn_like(w)
    g = 1.0 / math.sqrt(4 * 3 * 3 * 7)
    _, (_, ds_ref) = grads_of(lambda a, s: ref_lsq(a, s, BITS, True, 0, g=g), w, q.scale.detach(), dy=dy)
    q(w).backward(dy)
    torch.testing.assert_close(q.scale.grad, ds_ref, rtol=1e-5, atol=1e-7)


def test_lsq_auto_sign_and_explicit_grad_scale():
    q = LSQQuantizer(BITS, signed="auto", grad_scale=0.5)
    q(torch.rand(2, 10))
    assert q._signed is False and not bool(q.is_signed)
    q2 = LSQQuantizer(BITS, signed="auto")
    q2(torch.randn(2, 10))
    assert q2._signed is True and bool(q2.is_signed)
    x, dy = torch.rand(2, 10), torch.randn(2, 10)
    _, (_, ds_ref) = grads_of(lambda a, s: ref_lsq(a, s, BITS, False, g=0.5), x, q.scale.detach(), dy=dy)
    q(x).backward(dy)
    torch.testing.assert_close(q.scale.grad, ds_ref, rtol=1e-5, atol=1e-7)


def test_init_over_several_batches_passes_through_then_quantizes():
    q = LSQQuantizer(BITS, signed=True, init_batches=3)
    xs = [torch.randn(4, 6) * (i + 1) for i in range(3)]
    assert q(xs[0]) is xs[0] and q(xs[1]) is xs[1]
    assert not q.is_initialized
    y = q(xs[2])
    assert q.is_initialized and bool(q.initialized)
    expect = 2 * torch.stack([x.abs().mean() for x in xs]).mean() / math.sqrt(7)
    torch.testing.assert_close(q.scale.detach(), expect.reshape(1), rtol=1e-6, atol=0)
    assert torch.equal(y, reference.lsq(xs[2], q.scale.detach(), BITS, True))


def test_calibrate_averages_batches_and_restores_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model = q2ext.prepare(model, q2ext.QConfig(first_layer_bits=None, last_layer_bits=None))
    model.train()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    first_in = []
    model[0].input_quantizer.register_forward_hook(lambda m, i, o: first_in.append((i[0], o)))
    q2ext.calibrate(model, batches, num_batches=3)
    assert model.training
    assert all(o is i for i, o in first_in)  # float pass-through while calibrating
    q = model[0].input_quantizer
    assert q._offset_active  # image-like input goes negative: LSQ+
    lo = torch.stack([b.amin() for b in batches[:3]]).min()
    hi = torch.stack([b.amax() for b in batches[:3]]).max()
    mean = torch.stack([b.mean() for b in batches[:3]]).mean()
    expect = torch.minimum(2 * (mean - lo) / math.sqrt(15), (hi - lo) / 15)
    torch.testing.assert_close(q.offset.detach(), lo.reshape(1))
    torch.testing.assert_close(q.scale.detach(), expect.reshape(1), rtol=1e-5, atol=0)
    assert not model[2].input_quantizer._offset_active  # after ReLU: unsigned LSQ
    with pytest.raises(ValueError, match="no enabled q2ext quantizer"):
        q2ext.calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])


# ------------------------------------------------------------------------ LSQ+ and PACT

@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_plus_matches_reference(axis):
    c = 1 if axis is None else 5
    x = torch.randn(3, 5, 4, 4) * 2 - 0.5
    q = LSQPlusQuantizer(BITS, offset="learn", axis=axis, num_channels=c)
    q(x)
    dims = None if axis is None else [0, 2, 3]
    lo = x.amin() if axis is None else x.amin(dim=dims)
    hi = x.amax() if axis is None else x.amax(dim=dims)
    mean = x.mean() if axis is None else x.mean(dim=dims)
    expect = torch.minimum(2 * (mean - lo) / math.sqrt(15), (hi - lo) / 15)
    torch.testing.assert_close(q.offset.detach(), lo.reshape(c))
    torch.testing.assert_close(q.scale.detach(), expect.reshape(c), rtol=1e-5, atol=0)
    x2, dy = torch.randn(3, 5, 4, 4) * 3, torch.randn(3, 5, 4, 4)
    g = act_g(x2, c, 15)
    y_ref, (dx_ref, ds_ref, do_ref) = grads_of(
        lambda a, s, o: ref_lsq(a, s, BITS, False, axis, offset=o, g=g), x2, q.scale.detach(), q.offset.detach(),
        dy=dy)
    x2r = x2.clone().requires_grad_()
    y = q(x2r)
    y.backward(dy)
    assert torch.equal(y, y_ref) and torch.equal(x2r.grad, dx_ref)
    torch.testing.assert_close(q.scale.grad, ds_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.offset.grad, do_ref, rtol=1e-5, atol=1e-7)


def test_lsq_plus_auto_offset_inactive_is_unsigned_lsq_with_zero_offset_grad():
    x = torch.relu(torch.randn(2, 3, 5, 5))
    q = LSQPlusQuantizer(BITS, offset="auto")
    q(x)
    assert not q._offset_active and not bool(q.offset_active)
    torch.testing.assert_close(q.scale.detach(), init_lsq(x, BITS, False), rtol=1e-6, atol=0)
    dy = torch.randn_like(x)
    y_ref, (_, ds_ref) = grads_of(lambda a, s: ref_lsq(a, s, BITS, False, g=act_g(x, 1, 15)), x, q.scale.detach(),
                                  dy=dy)
    y = q(x)
    y.backward(dy)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(q.scale.grad, ds_ref, rtol=1e-5, atol=1e-7)
    assert q.offset.grad is not None and torch.equal(q.offset.grad, torch.zeros(1))


@pytest.mark.parametrize("axis", [None, 1])
def test_pact_matches_reference(axis):
    c = 1 if axis is None else 4
    x = torch.randn(2, 4, 6, 6).relu() * 3
    q = PACTQuantizer(BITS, axis=axis, num_channels=c)
    q(x)
    dims = None if axis is None else [0, 2, 3]
    absmean = x.abs().mean() if axis is None else x.abs().mean(dim=dims)
    hi = x.amax() if axis is None else x.amax(dim=dims)
    expect = torch.minimum(2 * absmean * math.sqrt(15), hi).reshape(c)
    torch.testing.assert_close(q.alpha.detach(), expect, rtol=1e-6, atol=0)
    dy = torch.randn_like(x)
    y_ref, (dx_ref, da_ref) = grads_of(lambda a, al: ref_pact(a, al, BITS, axis), x, q.alpha.detach(), dy=dy)
    xr = x.clone().requires_grad_()
    y = q(xr)
    y.backward(dy)
    assert torch.equal(y, y_ref) and torch.equal(xr.grad, dx_ref)
    torch.testing.assert_close(q.alpha.grad, da_ref, rtol=1e-5, atol=1e-6)


def test_bf16_input_keeps_dtype_and_is_close():
    x = torch.randn(2, 8, 4, 4)
    q = LSQQuantizer(BITS, signed=True)
    q(x)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.lsq(x.bfloat16(), q.scale.detach(), BITS, True).float())


# ------------------------------------------------------------------------ switches and state

def test_enabled_false_is_identity_and_does_not_initialise():
    q = LSQQuantizer(BITS, enabled=False)
    x = torch.randn(3, 3)
    assert q(x) is x and not q.is_initialized
    q.enabled = True
    assert not torch.equal(q(x), x) and q.is_initialized


def test_freeze_stops_learning_but_keeps_quantizing():
    q = LSQPlusQuantizer(BITS, offset="learn")
    x = torch.randn(4, 4)
    q(x)
    q.freeze()
    assert not q.scale.requires_grad and not q.offset.requires_grad
    xr = x.clone().requires_grad_()
    y = q(xr)
    y.sum().backward()
    assert q.scale.grad is None and xr.grad is not None
    assert torch.equal(y.detach(), reference.lsq(x, q.scale.detach(), BITS, False, offset=q.offset.detach()))
    q.unfreeze()
    assert q.scale.requires_grad


@pytest.mark.parametrize("make", [lambda: LSQQuantizer(BITS, signed="auto"),
                                  lambda: LSQPlusQuantizer(BITS, offset="auto"),
                                  lambda: PACTQuantizer(BITS)])
def test_state_dict_pickle_deepcopy_restore_decisions(make):
    x = torch.rand(2, 6) * 2
    q = make()
    q(x)
    y = q(x)
    fresh = make()
    fresh.load_state_dict(q.state_dict())
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    for other in (fresh, copy.deepcopy(q), torch.load(buf, weights_only=False)):
        assert other.is_initialized
        assert getattr(other, "_signed", None) == getattr(q, "_signed", None)
        assert getattr(other, "_offset_active", None) == getattr(q, "_offset_active", None)
        assert torch.equal(other(x), y)
    assert not any(k.startswith("_stats") for k in q.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits must be an int in 2..8"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"),
    (dict(bits=True), "bits"), (dict(bits=4, axis=None, num_channels=3), "num_channels must be 1"),
    (dict(bits=4, kind="bias"), "kind"), (dict(bits=4, init_batches=0), "init_batches"),
    (dict(bits=4, signed="yes"), "signed"), (dict(bits=4, grad_scale=-1.0), "grad_scale"),
])
def test_bad_quantizer_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LSQQuantizer(**kwargs)
    with pytest.raises(ValueError, match="offset"):
        LSQPlusQuantizer(4, offset="sometimes")


def test_channel_mismatch_names_the_quantizer():
    q = LSQQuantizer(BITS, axis=1, num_channels=3)
    with pytest.raises(ValueError, match="LSQQuantizer: x has 4 channels"):
        q(torch.randn(2, 4))


# ------------------------------------------------------------------------ layers

def _ref_quant_weight(layer):
    wq = layer.weight_quantizer
    return ref_lsq(layer.weight, wq.scale, wq.bits, True, wq.axis, g=1.0)


def _ref_quant_input(layer, x):
    q = layer.input_quantizer
    off = q.offset if isinstance(q, LSQPlusQuantizer) and q._offset_active else None
    return ref_lsq(x, q.scale, q.bits, bool(getattr(q, "_signed", False)), q.axis, offset=off)


@pytest.mark.parametrize("kw", [
    dict(), dict(groups=4), dict(groups=8, out_channels=8), dict(dilation=2, padding=2), dict(bias=False),
    dict(padding_mode="reflect", padding=1), dict(stride=2), dict(padding="same"),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_quant_conv2d_matches_reference(kw, channels_last):
    args = dict(in_channels=8, out_channels=16, kernel_size=3)
    args.update(kw)
    conv = nn.Conv2d(**args)
    layer = QuantConv2d.from_float(conv)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    x = torch.randn(2, 8, 9, 9) - 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer(x)  # initialise
    y = layer(x)
    xq = _ref_quant_input(layer, x.contiguous())
    y_ref = conv._conv_forward(xq, _ref_quant_weight(layer), conv.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight_quantizer.scale.grad is not None
    assert layer.input_quantizer.scale.grad is not None


@pytest.mark.parametrize("groups", [1, 2])
def test_quant_conv_transpose2d_matches_per_output_channel_reference(groups):
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=groups)
    layer = QuantConvTranspose2d.from_float(conv)
    x = torch.randn(2, 4, 5, 5).relu()
    layer(x)
    y = layer(x, output_size=[10, 10])
    wq_mod = layer.weight_quantizer
    assert wq_mod.scale.numel() == 6
    # Output channel o = group * (6 / groups) + j uses weight[group's input rows, j].
    w, cin_g, cout_g = conv.weight.detach(), 4 // groups, 6 // groups
    wq = torch.empty_like(w)
    for o in range(6):
        gi, j = divmod(o, cout_g)
        rows = slice(gi * cin_g, (gi + 1) * cin_g)
        wq[rows, j] = reference.lsq(w[rows, j], wq_mod.scale.detach()[o:o + 1], BITS, True)
    xq = reference.lsq(x, layer.input_quantizer.scale.detach(), BITS, False)
    y_ref = F.conv_transpose2d(xq, wq, conv.bias, 2, 1, 1, groups)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert torch.isfinite(wq_mod.scale.grad).all() and wq_mod.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(3, 10), (2, 5, 10)])
def test_quant_linear_matches_reference(shape):
    lin = nn.Linear(10, 7)
    layer = QuantLinear.from_float(lin, q2ext.LayerQConfig(a_quantizer="lsq", a_per_channel=True))
    x = torch.randn(*shape)
    layer(x)
    q = layer.input_quantizer
    assert q.axis == -1 and q.scale.numel() == 10 and q._signed
    y = layer(x)
    y_ref = F.linear(ref_lsq(x, q.scale, BITS, True, -1 % x.dim()), _ref_quant_weight(layer), lin.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_direct_construction_and_bad_layer_inputs():
    layer = QuantConv2d(3, 4, 3, padding=1)
    assert isinstance(layer, nn.Conv2d) and isinstance(layer.weight_quantizer, LSQQuantizer)
    assert layer(torch.randn(1, 3, 6, 6)).shape == (1, 4, 6, 6)
    with pytest.raises(TypeError, match=r"layer 'head' \(Conv2d\): weight dtype torch.float64"):
        QuantConv2d.from_float(nn.Conv2d(3, 4, 3).double(), name="head")
    with pytest.raises(ValueError, match="lazy module"):
        QuantConv2d.from_float(nn.LazyConv2d(4, 3), name="lazy")


# ------------------------------------------------------------------------ torch.compile

class _AllKinds(nn.Module):
    """Every layer type and quantizer kind in one small model (one compile for all)."""

    def __init__(self):
        super().__init__()
        cfg = q2ext.LayerQConfig
        self.conv = QuantConv2d.from_float(nn.Conv2d(3, 8, 3, padding=1))  # LSQ+ (input goes negative)
        self.dw = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1, groups=8), cfg(a_quantizer="pact"))
        self.up = QuantConvTranspose2d.from_float(nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2),
                                                  cfg(a_per_channel=True))  # auto -> unsigned LSQ
        self.fc = QuantLinear.from_float(nn.Linear(8, 5), cfg(a_quantizer="lsq", w_per_channel=False))

    def forward(self, x):
        x = self.dw(torch.relu(self.conv(x)))
        x = self.up(torch.relu(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_all_modules_under_torch_compile_fullgraph():
    model = _AllKinds()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(Exception, match="calibrate"):
        torch.compile(_AllKinds(), fullgraph=True, backend="eager")(x)
    model(x)  # eager initialisation
    compiled = torch.compile(model, fullgraph=True)
    x2 = torch.randn(2, 3, 8, 8)
    y_eager = model(x2)
    y_eager.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    y = compiled(x2)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    assert model.conv.input_quantizer._offset_active and not model.up.input_quantizer._offset_active
