"""Int8Linear / Int8Conv2d / Int4Linear built from trained QAT layers."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from q2ext import ops as gemm
from q2ext.nn import QuantConv2d, QuantLinear
from q2ext.nn.gemm_layers import Int4Linear, Int8Conv2d, Int8Linear
from q2ext.qconfig import LayerQConfig


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _qat(layer, cfg, x):
    q = (QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d).from_float(layer, cfg)
    with torch.no_grad():
        q(x)  # data-driven init of the quantizers
        q.input_quantizer.scale.mul_(1.1)  # move off the init values: "learned" steps
        q.weight_quantizer.scale.mul_(0.9)
    return q.eval()


@pytest.mark.parametrize("a_signed", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_linear_matches_fake_quant(a_signed, bits):
    torch.manual_seed(0)
    lin = nn.Linear(97, 33)
    x = torch.randn(2, 5, 97) if a_signed else torch.rand(2, 5, 97)
    q = _qat(lin, LayerQConfig(w_bits=bits, a_bits=bits, a_quantizer="lsq", a_signed=a_signed), x)
    with torch.no_grad():
        want = q(x)
        got = Int8Linear.from_qat(q)(x)
        assert got.shape == want.shape
        # Q(x) = q_x s_x and Q(W) = q_W s_W exactly: only fp32 summation order differs
        assert _rel(got, want) < 1e-5
        relu = Int8Linear.from_qat(q, relu=True)(x)
        assert _rel(relu, F.relu(want)) < 1e-5


@pytest.mark.parametrize("k,stride,padding,groups", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 2), (1, 2, 0, 1), (3, 1, 0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_conv_matches_fake_quant(k, stride, padding, groups, dtype):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 12, k, stride=stride, padding=padding, groups=groups)
    x = torch.rand(2, 8, 11, 9)
    q = _qat(conv, LayerQConfig(w_bits=8, a_bits=8, a_quantizer="lsq", a_signed=False), x)
    with torch.no_grad():
        want = q(x.to(dtype).float())  # the fake-quant layer on the same (bf16-rounded) input
        got = Int8Conv2d.from_qat(q)(x.to(dtype))
    assert got.dtype == dtype and got.shape == want.shape
    # fp32: summation order only; bf16 output: at most 2x its own rounding error
    tol = 1e-5 if dtype == torch.float32 else 2 * _rel(want.to(dtype), want) + 1e-5
    assert _rel(got, want) < tol


def test_int4_linear():
    torch.manual_seed(2)
    lin = nn.Linear(256, 40)
    x = torch.randn(3, 256)
    q = _qat(lin, LayerQConfig(w_bits=4, a_bits=8), x)
    int4 = Int4Linear.from_qat(q, group_size=64)
    with torch.no_grad():
        w_fq = q.weight_quantizer(q.weight)
        want = F.linear(x, w_fq, q.bias)  # weight-only: the input stays float
        assert _rel(int4(x), want) < 1e-5
        rtn = Int4Linear.from_float(lin, group_size=128)
        w = gemm.dequantize_int4(rtn.w_packed, rtn.scales, rtn.zeros, 128)
        assert (w - lin.weight).abs().max() <= (rtn.scales.max() / 2 + 1e-6)
        assert _rel(rtn(x), F.linear(x, w, lin.bias)) < 1e-5


def test_unsupported_quantizer_is_named():
    lin = nn.Linear(16, 4)
    q = QuantLinear.from_float(lin, LayerQConfig(w_bits=8, a_bits=8), input_quantizer=nn.Identity())
    with pytest.raises(TypeError, match="input_quantizer: cannot convert a Identity"):
        Int8Linear.from_qat(q)


def test_int8_linear_compiles():
    torch.manual_seed(3)
    m = Int8Linear.from_float(nn.Linear(64, 16), x_scale=torch.tensor([0.05]))
    x = torch.randn(4, 64)
    fn = torch.compile(m, fullgraph=True, backend="eager")
    assert torch.equal(fn(x), m(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_int8_conv_dilation_and_layouts(channels_last):
    """The int8 im2col path (static step): dilation, asymmetric padding/stride, signed grid,
    a channels-last input (its NHWC rows are a free view) - against the fake-quant layer."""
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 3))
    x = torch.randn(2, 6, 13, 12)
    q = _qat(conv, LayerQConfig(w_bits=8, a_bits=8, a_quantizer="lsq", a_signed=True), x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = q(x)
        int_conv = Int8Conv2d.from_qat(q)
        got = int_conv(x)
        rows = int_conv._float_rows(x, 2, want.shape[2], want.shape[3], False)[0].permute(0, 3, 1, 2)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-5
    assert torch.equal(got, rows)  # int32 sums are exact: both row builders give the same bits
