"""CUDA kernels of the int8/int4 GEMM ops (csrc/cuda/gemm_w8a8.cu, gemm_w4a16.cu) against
q2ext/reference/gemm.py, run on CPU copies of the inputs.

Skipped unless a CUDA device is present *and* q2ext._C was built with CUDA.

What is checked:
  * quantize_activation, w8a8_mm (int32 and every epilogue) and w8a8_linear: bit-exact;
  * w4a16_mm: relative error <= 1e-3 (bf16: twice the error of rounding the exact result);
  * every kernel path: W8A8 dp4a GEMV (M <= 16, with and without a K split), tensor-core
    MMA (M > 16), odd shapes (M = 1, N = 1, K = 4097, K not a multiple of the tile),
    strided / unaligned operands (copied paths), int8 and uint8 A; W4A16 GEMV with 1 and 4
    rows per block and the dequant + GEMM path (M > 16);
  * opcheck, empty inputs, and clear errors for mixed devices and wrong dtypes.
"""
from __future__ import annotations

import pytest
import torch

from q2ext import ops as gemm
from q2ext.reference import gemm as ref

from helpers import ints as _ints, opcheck_cases, requires_cuda  # noqa: E402  (tests/ is on sys.path)

pytestmark = requires_cuda

ops = torch.ops.q2ext
DEV = "cuda"


def _cuda(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def assert_same(got, want, what=""):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    if got.is_floating_point():
        bad = (got.view(torch.int32 if got.dtype == torch.float32 else torch.int16)
               != want.view(torch.int32 if want.dtype == torch.float32 else torch.int16))
        bad &= ~(got.isnan() & want.isnan())
    else:
        bad = got != want
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} differ, first {i}: "
                             f"got {got[i].item()!r} want {want[i].item()!r}")


# (M, N, K): dp4a GEMV (M <= 16; K = 8192 and N = 64 splits K), MMA (M > 16), odd sizes.
SHAPES_8 = [(1, 1, 1), (1, 1, 4097), (1, 64, 4097), (3, 70, 8192), (16, 33, 96), (17, 1, 5),
            (17, 130, 1025), (129, 257, 4097), (200, 128, 64), (130, 65, 67)]


@pytest.mark.parametrize("m,n,k", SHAPES_8)
@pytest.mark.parametrize("adt", [torch.int8, torch.uint8])
def test_w8a8_mm_exact(m, n, k, adt):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    a, b = _ints((m, k), adt, g), _ints((n, k), torch.int8, g)
    a_s, b_s = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    bias = torch.randn(n, generator=g)
    ad, bd = _cuda(a, b)
    assert_same(ops.w8a8_mm(ad, bd, *_cuda(a_s, b_s), None, torch.int32), ref.int_mm(a, b), "int32")
    for od, bi, relu, asc in [(torch.float32, bias, False, a_s), (torch.bfloat16, bias, True, a_s[:1]),
                              (torch.float32, None, True, a_s), (torch.bfloat16, None, False, a_s)]:
        got = ops.w8a8_mm(ad, bd, *_cuda(asc, b_s, bi), od, relu)
        assert_same(got, ref.w8a8_mm(a, b, asc, b_s, bi, od, relu), f"{od} relu={relu}")
    bp = gemm.pack_int8_weight(b, signed_act=adt == torch.int8).to(DEV)  # packed once: panels used as they are
    assert_same(ops.w8a8_mm(ad, bp, *_cuda(a_s, b_s), None, torch.int32), ref.int_mm(a, b), "packed int32")
    assert_same(ops.w8a8_mm(ad, bp, *_cuda(a_s, b_s, bias), torch.float32, True),
                ref.w8a8_mm(a, b, a_s, b_s, bias, torch.float32, True), "packed f32")


def test_w8a8_mm_extremes_and_layouts():
    # All -128 x -128 over K = 4097 on both paths: exact int32 (no saturation).
    for m in (3, 40):
        a = torch.full((m, 4097), -128, dtype=torch.int8)
        b = torch.full((70, 4097), -128, dtype=torch.int8)
        ones = torch.ones(70)
        assert_same(ops.w8a8_mm(*_cuda(a, b, ones[:1], ones), None, torch.int32), ref.int_mm(a, b))
    g = torch.Generator().manual_seed(1)
    big, wide = _ints((80, 300), torch.int8, g), _ints((80, 320), torch.int8, g)
    bigd, wided = big.to(DEV), wide.to(DEV)
    bt = _ints((200, 33), torch.int8, g)  # b = bt.t(): [33, 200] with strides (1, 33)
    ones = torch.ones(33, device=DEV)
    cases = [(big, bigd, (slice(5, 30), slice(10, 210))),  # row stride 300: copied rows
             (big, bigd, (slice(3, 75), slice(1, 201))),   # misaligned start: copied rows
             (wide, wided, (slice(0, 40), slice(0, 200))),  # stride 320, K = 200 < lda: direct (MMA)
             (wide, wided, (slice(16, 21), slice(0, 200)))]  # direct (dp4a)
    for host, dev, sl in cases:
        got = ops.w8a8_mm(dev[sl], bt.to(DEV).t(), ones[:1], ones, None, torch.int32)
        assert_same(got, ref.int_mm(host[sl], bt.t()), str(sl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (-8, 7)])
@pytest.mark.parametrize("kind", ["tensor", "row", "dynamic"])
@pytest.mark.parametrize("m,k", [(37, 131), (1, 4097), (5, 1)])
def test_quantize_activation_exact(dtype, qrange, kind, m, k):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -1e30]).to(dtype)[: x.numel()]
    scale = {"tensor": torch.tensor([0.021]), "row": torch.rand(m, generator=g) * 0.05, "dynamic": None}[kind]
    if kind == "row":
        scale[0] = 0.0  # sanitised to FLT_EPSILON
    q, s = ops.quantize_activation(x.to(DEV), None if scale is None else scale.to(DEV), *qrange)
    rq, rs = ref.quantize_activation(x, scale, *qrange)
    assert_same(q, rq, "q")
    assert_same(s, rs, "scale")


def test_quantize_activation_empty_and_strided():
    q, s = ops.quantize_activation(torch.empty(0, 8, device=DEV), torch.tensor([float("nan")], device=DEV), -128, 127)
    assert q.shape == (0, 8) and s.cpu().item() == ref.sanitize_scale(torch.tensor([float("nan")])).item()
    x = torch.randn(64, 40)
    for view in (x[::2, 3:], x.t()):
        q, s = ops.quantize_activation(view.to(DEV), None, -128, 127)
        rq, rs = ref.quantize_activation(view, None, -128, 127)
        assert_same(q, rq)
        assert_same(s, rs)


@pytest.mark.parametrize("m,n,k", [(1, 1, 5), (1, 300, 4097), (16, 65, 96), (59, 130, 1025), (300, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255)])
def test_w8a8_linear_exact(m, n, k, dtype, qrange):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = _ints((n, k), torch.int8, g)
    wp = gemm.pack_int8_weight(w, signed_act=qrange[0] < 0)
    w_s, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    for x_s, bi, relu in ((None, bias, True), (torch.tensor([0.03]), None, False),
                          (torch.rand(m, generator=g) * 0.05 + 0.01, bias, False)):
        got = ops.w8a8_linear(*_cuda(x, wp, w_s, x_s, bi), *qrange, relu)
        assert_same(got, ref.w8a8_linear(x, wp, w_s, x_s, bi, *qrange, relu), f"x_s={x_s is not None}")


def test_cuda_matches_cpu_kernels():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(33, 300, generator=g)
    w = _ints((70, 300), torch.int8, g)
    wp, ws = gemm.pack_int8_weight(w), torch.rand(70, generator=g) * 0.01
    assert_same(ops.w8a8_linear(*_cuda(x, wp, ws), None, None, -128, 127, True),
                ops.w8a8_linear(x, wp, ws, None, None, -128, 127, True))


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("n", [1, 33, 520])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a16_mm(m, n, group):
    g = torch.Generator().manual_seed(m * 100 + n + group)
    k = 2304 if n == 520 else 256  # > 256 threads x 4 loads x 2 rows: several block steps
    q = torch.randint(0, 16, (n, k), generator=g)
    wp = gemm.pack_int4(q)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 1e-3
    zeros = torch.randn(k // group, n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    w = gemm.dequantize_int4(wp, scales, zeros, group)
    got = ops.w4a16_mm(*_cuda(x, wp, scales, zeros), group)
    assert got.dtype == torch.float32 and got.device.type == DEV
    assert _rel(got.cpu(), x @ w.T) <= 1e-3
    xb = x.bfloat16()
    want_b = xb.float() @ w.T
    got_b = ops.w4a16_mm(*_cuda(xb, wp, scales, zeros), group).cpu()
    assert got_b.dtype == torch.bfloat16
    assert _rel(got_b, want_b) <= 2 * _rel(want_b.bfloat16(), want_b) + 1e-6


def test_w4a16_mm_strided_and_unaligned():
    g = torch.Generator().manual_seed(9)
    q = torch.randint(0, 16, (40, 128), generator=g)
    wp = gemm.pack_int4(q)
    s, z = torch.rand(4, 40, generator=g) * 0.02 + 1e-3, torch.randn(4, 40, generator=g) * 0.01
    buf = torch.empty(wp.numel() + 1, dtype=torch.uint8, device=DEV)
    wp_odd = buf[1:].view(wp.shape)  # contiguous at a 1-byte offset: copied to aligned storage
    wp_odd.copy_(wp.to(DEV))
    x_full = torch.randn(6, 256, generator=g)
    x = x_full[:, ::2]  # column stride 2
    want = x @ gemm.dequantize_int4(wp, s, z, 32).T
    got = ops.w4a16_mm(x_full.to(DEV)[:, ::2], wp_odd, *_cuda(s, z), 32)
    assert _rel(got.cpu(), want) <= 1e-3


def test_empty():
    e8 = torch.empty(0, 16, dtype=torch.int8, device=DEV)
    b = torch.zeros(5, 16, dtype=torch.int8, device=DEV)
    one = torch.ones(1, device=DEV)
    assert ops.w8a8_mm(e8, b, one, torch.ones(5, device=DEV)).shape == (0, 5)
    x = torch.empty(0, 64, device=DEV)
    assert ops.w4a16_mm(x, gemm.pack_int4(torch.zeros(5, 64, dtype=torch.long)).to(DEV),
                        torch.ones(1, 5, device=DEV), torch.zeros(1, 5, device=DEV), 64).shape == (0, 5)


def test_bad_inputs_name_the_argument():
    a = torch.zeros(4, 8, dtype=torch.int8, device=DEV)
    b = torch.zeros(3, 8, dtype=torch.int8, device=DEV)
    sa, sb = torch.ones(4, device=DEV), torch.ones(3, device=DEV)
    with pytest.raises(RuntimeError, match="b is on cpu but a on cuda"):
        ops.w8a8_mm(a, b.cpu(), sa, sb)
    with pytest.raises(RuntimeError, match="a_scale is on cpu"):
        ops.w8a8_mm(a, b, sa.cpu(), sb)
    with pytest.raises(RuntimeError, match="bias is on cpu"):
        ops.w8a8_mm(a, b, sa, sb, torch.ones(3))
    with pytest.raises(RuntimeError, match="b_scale must be float32"):
        ops.w8a8_mm(a, b, sa, sb.double())
    with pytest.raises(RuntimeError, match="a must be a 2-D int8 or uint8"):
        ops.w8a8_mm(a.float(), b, sa, sb)
    x = torch.randn(4, 8, device=DEV)
    wp = gemm.pack_int8_weight(b.cpu()).to(DEV)
    with pytest.raises(RuntimeError, match="w_packed is on cpu"):
        ops.w8a8_linear(x, wp.cpu(), sb, None, None, -128, 127)
    with pytest.raises(RuntimeError, match="x_scale is on cpu"):
        ops.w8a8_linear(x, wp, sb, torch.ones(1), None, -128, 127)
    with pytest.raises(RuntimeError, match="scale is on cpu"):
        ops.quantize_activation(x, torch.ones(1), -128, 127)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32 or bfloat16"):
        ops.quantize_activation(x.half(), None, -128, 127)
    x4 = torch.randn(2, 64, device=DEV)
    wp4 = gemm.pack_int4(torch.zeros(5, 64, dtype=torch.long)).to(DEV)
    s4, z4 = torch.ones(1, 5, device=DEV), torch.zeros(1, 5, device=DEV)
    with pytest.raises(RuntimeError, match="scales is on cpu"):
        ops.w4a16_mm(x4, wp4, s4.cpu(), z4, 64)
    with pytest.raises(RuntimeError, match="w_packed is on cpu"):
        ops.w4a16_mm(x4, wp4.cpu(), s4, z4, 64)
    with pytest.raises(RuntimeError, match="zeros must be float32"):
        ops.w4a16_mm(x4, wp4, s4, z4.double(), 64)


def test_opcheck():
    for op, args in opcheck_cases(DEV):
        torch.library.opcheck(op, args)