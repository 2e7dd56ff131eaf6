"""Int8Linear / Int8Conv2d / Int4Linear built from trained QAT layers, on every engine.

Oracle: the fake-quant layer itself.  ``Q(x) = s q (+ offset)`` and ``Q(W) = s_W q_W``
exactly, so the int layer differs only by fp32 rounding (summation order, epilogue): a
relative error of a few fp32 ulps, except where that rounding flips an activation code
at an exact tie (none in these data).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from q2ext import ops as gemm
from q2ext.nn import QuantConv2d, QuantLinear
from q2ext.nn.gemm_layers import Int4Linear, Int8Conv2d, Int8Linear
from q2ext.qconfig import LayerQConfig

ENGINES = ["q2ext", "onednn"]
# the default QConfig's input quantizer ("auto": LSQ+, offset active on signed data), and LSQ
GRIDS = {"lsq+ offset": dict(a_quantizer="auto"), "lsq signed": dict(a_quantizer="lsq", a_signed=True),
         "lsq unsigned": dict(a_quantizer="lsq", a_signed=False)}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _qat(layer, cfg, x):
    q = (QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d).from_float(layer, cfg)
    with torch.no_grad():
        q(x)  # data-driven init of the quantizers
        q.input_quantizer.scale.mul_(1.1)  # move off the init values: "learned" steps
        q.weight_quantizer.scale.mul_(0.9)
        if hasattr(q.input_quantizer, "offset") and bool(q.input_quantizer.offset_active):
            q.input_quantizer.offset.add_(0.0123)  # an offset that is no multiple of the step
    return q.eval()


def _data(grid, shape):
    x = torch.randn(shape)
    return x.abs() if grid == "lsq unsigned" else x + 0.3


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_linear_matches_fake_quant(engine, grid, bits):
    torch.manual_seed(0)
    x = _data(grid, (2, 5, 97))
    q = _qat(nn.Linear(97, 33), LayerQConfig(w_bits=bits, a_bits=bits, **GRIDS[grid]), x)
    if grid == "lsq+ offset":  # the default QConfig on signed data: the asymmetric path
        assert bool(q.input_quantizer.offset_active)
    with torch.no_grad():
        want = q(x)
        m = Int8Linear.from_qat(q)
        m.engine = engine
        got = m(x)
        assert got.shape == want.shape and m.engines and set(m.engines.values()) == {engine}
        assert _rel(got, want) < 1e-5
        relu = Int8Linear.from_qat(q, relu=True)
        relu.engine = engine
        assert _rel(relu(x), F.relu(want)) < 1e-5
        assert _rel(m(x[:1, :1]), want[:1, :1]) < 1e-5  # batch 1, one row
        xb = x.bfloat16()
        want_b, got_b = q(xb.float()), m(xb)  # the fake-quant layer on the same (bf16-rounded) input
        assert got_b.dtype == torch.bfloat16 and _rel(got_b, want_b) < 2 * _rel(want_b.bfloat16(), want_b) + 1e-5


CONVS = [  # kernel, stride, padding, dilation, groups
    (1, 1, 0, 1, 1), (3, 1, 1, 1, 1), (3, 2, 1, 1, 2), (1, 2, 0, 1, 1), (3, 1, 0, 1, 4),
    ((3, 2), (2, 1), (2, 1), (2, 3), 1), (3, 1, 1, 1, 12),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("k,stride,padding,dilation,groups", CONVS)
def test_int8_conv_matches_fake_quant(engine, grid, k, stride, padding, dilation, groups):
    """Both engines, every grid: stride, padding (the offset's border correction),
    dilation, groups (depthwise too), NCHW and channels-last input, batch 1."""
    torch.manual_seed(1)
    conv = nn.Conv2d(12, 24, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = _data(grid, (2, 12, 11, 9))
    q = _qat(conv, LayerQConfig(w_bits=8, a_bits=8, **GRIDS[grid]), x)
    with torch.no_grad():
        want = q(x)
        m = Int8Conv2d.from_qat(q)
        m.engine = engine
        if engine == "onednn" and m._onednn_shape_reasons(x):  # outside oneDNN's vetted shapes
            with pytest.raises(RuntimeError, match="cannot run this layer"):
                m(x)
            return
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            got = m(inp)
            assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
            assert _rel(got, want) < 1e-5
        assert _rel(m(x[:1]), want[:1]) < 1e-5
        relu = Int8Conv2d.from_qat(q, relu=True)
        relu.engine = engine
        assert _rel(relu(x), F.relu(want)) < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_conv_bf16(engine):
    torch.manual_seed(1)
    x = torch.rand(2, 8, 11, 9)
    q = _qat(nn.Conv2d(8, 12, 3, padding=1), LayerQConfig(w_bits=8, a_bits=8, a_quantizer="lsq", a_signed=False), x)
    with torch.no_grad():
        want = q(x.bfloat16().float())  # the fake-quant layer on the same (bf16-rounded) input
        m = Int8Conv2d.from_qat(q)
        m.engine = engine
        got = m(x.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert _rel(got, want) < 2 * _rel(want.bfloat16(), want) + 1e-5  # <= 2x bf16's own rounding


def test_offset_border_correction_is_needed_and_exact():
    """An LSQ+ offset with zero padding: without the per-position correction the border
    outputs are off by offset * (the weights of the padded taps); with it they match."""
    torch.manual_seed(4)
    x = torch.randn(1, 6, 7, 7) - 1.0
    q = _qat(nn.Conv2d(6, 5, 3, padding=1), LayerQConfig(w_bits=8, a_bits=8), x)
    assert bool(q.input_quantizer.offset_active) and abs(float(q.input_quantizer.offset.detach())) > 0.5
    with torch.no_grad():
        want = q(x)
        m = Int8Conv2d.from_qat(q)
        got = m(x)
        border = m._border_correction(7, 7, torch.float32)
        assert border[..., 1:-1, 1:-1].abs().max() == 0 and border.abs().max() > 0.05
        assert _rel(got, want) < 1e-5
        assert _rel(got - border, want) > 1e-3


@pytest.mark.parametrize("engine", ENGINES)
def test_bn_fold_and_copies(engine):
    """fold_output_affine (a BatchNorm) refreshes the offset correction; deepcopy and
    state_dict work on every engine (oneDNN's packed weight is rebuilt, not copied)."""
    torch.manual_seed(5)
    x = torch.randn(2, 6, 9, 9)
    q = _qat(nn.Conv2d(6, 8, 3, padding=1), LayerQConfig(w_bits=8, a_bits=8), x)
    gain, shift = torch.rand(8) + 0.5, torch.randn(8)
    with torch.no_grad():
        want = q(x) * gain.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        m = Int8Conv2d.from_qat(q)
        m.engine = engine
        m(x)
        m.fold_output_affine(gain, shift)
        assert _rel(m(x), want) < 1e-5
        twin = copy.deepcopy(m)
        assert _rel(twin(x), want) < 1e-5
        fresh = Int8Conv2d.from_qat(q)
        fresh.engine = engine
        fresh.load_state_dict(m.state_dict())
        assert _rel(fresh(x), want) < 1e-5


def test_int4_linear():
    torch.manual_seed(2)
    lin = nn.Linear(256, 48)
    x = torch.randn(3, 256)
    q = _qat(lin, LayerQConfig(w_bits=4, a_bits=8), x)
    with torch.no_grad():
        w_fq = q.weight_quantizer(q.weight)
        want = F.linear(x, w_fq, q.bias)  # weight-only: the input stays float
        for engine in ("q2ext", "torch"):
            int4 = Int4Linear.from_qat(q, group_size=64)
            int4.engine = engine
            assert _rel(int4(x), want) < 1e-5
            assert set(int4.engines.values()) == {engine}
            assert _rel(int4(x.bfloat16()), want) < 2 * _rel(want.bfloat16(), want) + 2e-3
        rtn = Int4Linear.from_float(lin, group_size=128)
        w = gemm.dequantize_int4(rtn.w_packed, rtn.scales, rtn.zeros, 128)
        assert (w - lin.weight).abs().max() <= (rtn.scales.max() / 2 + 1e-6)
        assert _rel(rtn(x), F.linear(x, w, lin.bias)) < 1e-5


def test_unsupported_quantizer_is_named():
    lin = nn.Linear(16, 4)
    q = QuantLinear.from_float(lin, LayerQConfig(w_bits=8, a_bits=8), input_quantizer=nn.Identity())
    with pytest.raises(TypeError, match="input_quantizer: cannot convert a Identity"):
        Int8Linear.from_qat(q)
    with pytest.raises(ValueError, match="x_offset needs a static x_scale"):
        Int8Linear(torch.zeros(4, 16, dtype=torch.int8), torch.ones(4), None, x_offset=torch.tensor([0.5]))


@pytest.mark.parametrize("engine", ["auto", "q2ext", "onednn"])
def test_int8_linear_compiles(engine):
    """Under torch.compile every layer runs q2ext's kernels (see gemm_engines)."""
    torch.manual_seed(3)
    m = Int8Linear.from_float(nn.Linear(64, 16), x_scale=torch.tensor([0.05]))
    m.engine = engine
    x = torch.randn(4, 64)
    fn = torch.compile(m, fullgraph=True, backend="eager")
    assert _rel(fn(x), m(x)) < 1e-6


@pytest.mark.parametrize("engine", ENGINES)
def test_step_trained_to_zero_or_below_is_sanitised_as_in_fake_quant(engine):
    """LSQ steps can train through zero; the fake quant then runs them as FLT_EPSILON
    (the one scale rule), so the int layer must too (it used the raw negative step)."""
    torch.manual_seed(6)
    x = torch.rand(2, 6, 8, 8)
    q = _qat(nn.Conv2d(6, 8, 3, padding=1), LayerQConfig(w_bits=8, a_bits=8, a_quantizer="lsq", a_signed=False), x)
    with torch.no_grad():
        q.weight_quantizer.scale[2] = -q.weight_quantizer.scale[2]
        q.weight_quantizer.scale[5] = 0.0
        want = q(x)
        m = Int8Conv2d.from_qat(q)
        m.engine = engine
        assert _rel(m(x), want) < 1e-5
