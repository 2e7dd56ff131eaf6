"""int8/int4 GEMM ops against q2ext/reference/gemm.py on every CPU path."""
import pytest
import torch

import q2ext
from q2ext import ops as gemm
from q2ext.reference import gemm as ref

from helpers import ints as _ints, opcheck_cases  # noqa: E402  (tests/ is on sys.path)

ops = torch.ops.q2ext


def _isas():
    if not q2ext.has_compiled():
        return ["reference"]
    order = ["scalar", "avx2", "avx512"]
    best = q2ext._ext._C.best_cpu_isa()
    return order[: order.index(best) + 1]


@pytest.fixture(params=_isas())
def isa(request):
    if request.param != "reference":
        q2ext.set_cpu_isa(request.param)
    yield request.param
    if request.param != "reference":
        q2ext.set_cpu_isa("auto")


SHAPES_8 = [(1, 1, 1), (1, 64, 4097), (59, 1, 97), (97, 130, 1025), (6, 65, 4), (13, 200, 67)]


@pytest.mark.parametrize("m,n,k", SHAPES_8)
@pytest.mark.parametrize("adt", [torch.int8, torch.uint8])
def test_w8a8_mm_exact(isa, m, n, k, adt):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    a, b = _ints((m, k), adt, g), _ints((n, k), torch.int8, g)
    a_s, b_s = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    bias = torch.randn(n, generator=g)
    acc = ops.w8a8_mm(a, b, a_s, b_s, None, torch.int32)
    assert torch.equal(acc, ref.int_mm(a, b))  # int8 -> int32: exact
    for od, bi, relu, asc in [(torch.float32, bias, False, a_s), (torch.bfloat16, bias, True, a_s[:1]),
                              (torch.float32, None, True, a_s)]:
        got = ops.w8a8_mm(a, b, asc, b_s, bi, od, relu)
        assert torch.equal(got, ref.w8a8_mm(a, b, asc, b_s, bi, od, relu)), (od, relu)
    # b packed once (pack_int8_weight for a's signedness): the same results
    bp = gemm.pack_int8_weight(b, signed_act=adt == torch.int8)
    assert torch.equal(ops.w8a8_mm(a, bp, a_s, b_s, None, torch.int32), acc)
    assert torch.equal(ops.w8a8_mm(a, bp, a_s, b_s, bias, torch.float32, True),
                       ref.w8a8_mm(a, b, a_s, b_s, bias, torch.float32, True))


def test_w8a8_mm_extremes_and_strides(isa):
    # All -128 x -128 over K = 4097 stays exact (int32, no saturation in VNNI/madd paths).
    a = torch.full((3, 4097), -128, dtype=torch.int8)
    b = torch.full((70, 4097), -128, dtype=torch.int8)
    ones = torch.ones(70)
    assert torch.equal(ops.w8a8_mm(a, b, ones[:1], ones, None, torch.int32), ref.int_mm(a, b))
    big = torch.randint(-128, 128, (40, 300), dtype=torch.int8)
    view = big[5:30, 10:210]  # row stride != K
    w = torch.randint(-128, 128, (33, 200), dtype=torch.int8)
    assert torch.equal(ops.w8a8_mm(view, w, ones[:1], ones[:33], None, torch.int32), ref.int_mm(view, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (-8, 7)])
@pytest.mark.parametrize("kind", ["tensor", "row", "dynamic"])
def test_quantize_activation_exact(isa, dtype, qrange, kind):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 131, generator=g) * 3).to(dtype)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -1e30
    scale = {"tensor": torch.tensor([0.021]), "row": torch.rand(37, generator=g) * 0.05, "dynamic": None}[kind]
    q, s = ops.quantize_activation(x, scale, *qrange)
    rq, rs = ref.quantize_activation(x, scale, *qrange)
    assert q.dtype == (torch.int8 if qrange[0] < 0 else torch.uint8)
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("m,n,k", [(1, 1, 5), (16, 65, 96), (59, 130, 1025)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255)])
def test_w8a8_linear_matches_reference(isa, m, n, k, dtype, qrange):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = _ints((n, k), torch.int8, g)
    wp = gemm.pack_int8_weight(w, signed_act=qrange[0] < 0)
    assert torch.equal(gemm.unpack_int8_weight(wp, n, k), w)
    w_s, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    for x_s in (None, torch.tensor([0.03])):
        got = ops.w8a8_linear(x, wp, w_s, x_s, bias, *qrange, True)
        assert got.dtype == dtype
        assert torch.equal(got, ref.w8a8_linear(x, wp, w_s, x_s, bias, *qrange, True))


def _rel(a, b):
    # float64: norms of tiny (subnormal-range) outputs must not underflow
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("m", [1, 16, 59])
@pytest.mark.parametrize("n", [1, 33, 64])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a16_mm(isa, m, n, group):
    g = torch.Generator().manual_seed(m * 100 + n + group)
    k = 256
    q = torch.randint(0, 16, (n, k), generator=g)
    wp = gemm.pack_int4(q)
    assert torch.equal(gemm.unpack_int4(wp, n), q.to(torch.uint8))  # exact round trip
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 1e-3
    zeros = torch.randn(k // group, n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g)
    want = x @ gemm.dequantize_int4(wp, scales, zeros, group).T  # dequantized fp32 GEMM
    assert _rel(ops.w4a16_mm(x, wp, scales, zeros, group), want) <= 1e-3
    xb = x.bfloat16()
    want_b = xb.float() @ gemm.dequantize_int4(wp, scales, zeros, group).T
    got_b = ops.w4a16_mm(xb, wp, scales, zeros, group)
    assert got_b.dtype == torch.bfloat16
    # bf16 output: at most 2x the error of rounding the exact result to bf16
    assert _rel(got_b, want_b) <= 2 * _rel(want_b.bfloat16(), want_b) + 1e-6


def _w4_case(m, n, k, group, seed, x_mean=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    wp = gemm.pack_int4(q)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 1e-3
    zeros = torch.randn(k // group, n, generator=g) * 0.01
    x = (torch.randn(m, k, generator=g) + x_mean).bfloat16()
    w = gemm.dequantize_int4(wp, scales, zeros, group).double()
    return x, wp, scales, zeros, x.double() @ w.T  # exact up to float64 rounding


def _check_bf16_out(got, want):
    """bf16 x: the kernel's fp32 result must be within 1e-3 (relative) of the exact one
    before the final rounding to bf16.  Rounding hides that, so compare with the
    correctly rounded result: an fp32 result off by e (relative) lands on another bf16
    value for a fraction ~e / 2^-9 of the outputs, each then off by one bf16 step
    (2^-8 relative), so the norm of the difference is ~sqrt(e / 2^-9) * 2^-8: 5e-4 for
    e = 1e-3 (an fp32 accumulation gives ~1e-5)."""
    assert got.dtype == torch.bfloat16
    exact = want.float().bfloat16()
    assert _rel(got, exact) <= 5e-4, _rel(got, exact)


def _check_f32_out(got, want):
    # The contract is 1e-3; fp32 accumulation over K <= 4096 stays near 1e-6, so a
    # tighter bound catches lost precision long before it matters.
    assert got.dtype == torch.float32
    assert _rel(got, want) <= 1e-4, _rel(got, want)


@pytest.mark.parametrize("m", [1, 2, 16, 17])
@pytest.mark.parametrize("n,k", [(33, None), (1, 4096), (129, 4096)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a16_mm_shapes(isa, m, n, k, group):
    """bf16 x (the AVX512-BF16 tile on CPUs that have it) and fp32 x (the same values);
    k=None: 2 groups."""
    k = k or 2 * group
    x, wp, s, z, want = _w4_case(m, n, k, group, m * 1000 + n + k + group)
    _check_bf16_out(ops.w4a16_mm(x, wp, s, z, group), want)
    _check_f32_out(ops.w4a16_mm(x.float(), wp, s, z, group), want)


@pytest.mark.parametrize("x_mean", [30.0, -1000.0])
def test_w4a16_mm_large_mean(isa, x_mean):
    """|mean x| >> std x: the per-group x sums (zeros term) are large, the code term is
    not; nothing may cancel catastrophically.  Zero zeros make the true result depend
    only on the code term."""
    x, wp, s, _, _ = _w4_case(17, 70, 512, 128, 5, x_mean)
    for z in (torch.randn(s.shape) * 0.05, torch.zeros(s.shape)):
        want = x.double() @ gemm.dequantize_int4(wp, s, z, 128).double().T
        _check_bf16_out(ops.w4a16_mm(x, wp, s, z, 128), want)
        _check_f32_out(ops.w4a16_mm(x.float(), wp, s, z, 128), want)


def test_w4a16_mm_bf16_tiny_x(isa):
    """Subnormal and near-subnormal bf16 x: VDPBF16PS would flush them, so the kernel
    must fall back to the fp32 tile and still be accurate."""
    x, wp, s, z, _ = _w4_case(3, 40, 256, 64, 9)
    for scale in (2.0 ** -130, 2.0 ** -110):
        xt = (x.double() * scale).bfloat16()
        assert xt.abs().max() > 0
        want = xt.double() @ gemm.dequantize_int4(wp, s, z, 64).double().T
        _check_bf16_out(ops.w4a16_mm(xt, wp, s, z, 64), want)
    xm = x.clone()
    xm[1, 7] = 1e-39  # one subnormal among normal values
    want = xm.double() @ gemm.dequantize_int4(wp, s, z, 64).double().T
    _check_bf16_out(ops.w4a16_mm(xm, wp, s, z, 64), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_mm_non_finite_x(isa, dtype):
    """inf / NaN in x give the reference's inf / NaN outputs (the factored tiles would
    turn inf * (q - 8 = 0) into NaN, so the kernel dequantises each weight then)."""
    x, wp, s, z, _ = _w4_case(4, 33, 64, 32, 13)
    x[0, 3], x[1, 5], x[2, 9] = float("inf"), float("nan"), -float("inf")
    x = x.to(dtype)
    got, want = ops.w4a16_mm(x, wp, s, z, 32), ref.w4a16_mm(x, wp, s, z, 32)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])  # same signs
    assert _rel(got[3], want[3]) <= 1e-2  # the finite row (bf16 output rounding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_mm_empty(isa, dtype):
    wp = gemm.pack_int4(torch.zeros(5, 0, dtype=torch.int64))
    y = ops.w4a16_mm(torch.randn(3, 0).to(dtype), wp, torch.ones(0, 5), torch.zeros(0, 5), 32)
    assert y.dtype == dtype and torch.equal(y, torch.zeros(3, 5, dtype=dtype))  # K = 0: y = 0
    wp = gemm.pack_int4(torch.zeros(5, 64, dtype=torch.int64))
    y = ops.w4a16_mm(torch.randn(0, 64).to(dtype), wp, torch.ones(2, 5), torch.zeros(2, 5), 32)
    assert y.shape == (0, 5) and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_mm_thread_invariant(isa, dtype):
    x, wp, s, z, _ = _w4_case(17, 129, 1024, 64, 11)
    x = x.to(dtype)
    torch.set_num_threads(1)
    one = ops.w4a16_mm(x, wp, s, z, 64)
    torch.set_num_threads(2)
    assert torch.equal(ops.w4a16_mm(x, wp, s, z, 64), one)


def _w8_args():
    a = torch.zeros(4, 8, dtype=torch.int8)
    b = torch.zeros(3, 8, dtype=torch.int8)
    return a, b, torch.ones(4), torch.ones(3)


@pytest.mark.parametrize("mutate,match", [
    (lambda a, b, sa, sb: (a.float(), b, sa, sb), "a must be a 2-D int8 or uint8"),
    (lambda a, b, sa, sb: (a, b.to(torch.uint8), sa, sb), "b must be a 2-D int8"),
    (lambda a, b, sa, sb: (a, b[:, :5], sa, sb), "K="),
    (lambda a, b, sa, sb: (a, b, torch.ones(3), sb), "a_scale must have shape"),
    (lambda a, b, sa, sb: (a, b, sa, torch.ones(4)), "b_scale must have shape"),
    (lambda a, b, sa, sb: (a, b, sa, sb.double()), "b_scale must be float32"),
])
def test_w8a8_bad_inputs(mutate, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.w8a8_mm(*mutate(*_w8_args()))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.w8a8_mm(*_w8_args(), torch.ones(5))
    with pytest.raises(RuntimeError, match="out_dtype"):
        ops.w8a8_mm(*_w8_args(), None, torch.float16)


def test_w8a8_linear_bad_inputs():
    x, w = torch.randn(4, 8), torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="w_packed was packed for unsigned"):
        ops.w8a8_linear(x, gemm.pack_int8_weight(w, False), torch.ones(3), None, None, -128, 127)
    with pytest.raises(RuntimeError, match="w_packed must be the contiguous output"):
        ops.w8a8_linear(x, w, torch.ones(3), None, None, -128, 127)
    with pytest.raises(RuntimeError, match="quant_min"):
        ops.w8a8_linear(x, gemm.pack_int8_weight(w), torch.ones(3), None, None, -200, 127)
    with pytest.raises(RuntimeError, match="x_scale must have shape"):
        ops.w8a8_linear(x, gemm.pack_int8_weight(w), torch.ones(3), torch.ones(2), None, -128, 127)


def test_w4a16_bad_inputs():
    x = torch.randn(2, 128)
    q = torch.randint(0, 16, (20, 128))
    wp, s, z = gemm.pack_int4(q), torch.ones(1, 20), torch.zeros(1, 20)
    with pytest.raises(RuntimeError, match="unpacked weights"):
        ops.w4a16_mm(x, q.to(torch.uint8), s, z, 128)
    with pytest.raises(RuntimeError, match="must be a multiple of group_size"):
        ops.w4a16_mm(torch.randn(2, 96), wp, s, z, 64)
    with pytest.raises(RuntimeError, match="group_size must be 32, 64 or 128"):
        ops.w4a16_mm(x, wp, s, z, 16)
    with pytest.raises(RuntimeError, match="scales must have K / group_size"):
        ops.w4a16_mm(x, wp, torch.ones(2, 20), torch.zeros(2, 20), 128)
    with pytest.raises(RuntimeError, match="zeros must be float32 with the shape of scales"):
        ops.w4a16_mm(x, wp, s, torch.zeros(1, 19), 128)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32 or bfloat16"):
        ops.w4a16_mm(x.half(), wp, s, z, 128)
    with pytest.raises(ValueError, match="0..15"):
        gemm.pack_int4(q - 1)


def test_opcheck():
    for op, args in opcheck_cases("cpu"):
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    x = torch.randn(8, 64)
    w = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    wp, ws = gemm.pack_int8_weight(w), torch.rand(16)
    fn = torch.compile(lambda t: gemm.w8a8_linear(t, wp, ws, None, None), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), gemm.w8a8_linear(x, wp, ws))


def test_w8a8_mm_packed_b_bad_inputs():
    a = torch.zeros(3, 70, dtype=torch.int8)
    w = torch.zeros(5, 70, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="packed b was packed for unsigned activations"):
        ops.w8a8_mm(a, gemm.pack_int8_weight(w, signed_act=False), torch.ones(1), torch.ones(5))
    with pytest.raises(RuntimeError, match="packed b must be the contiguous output of pack_int8_weight"):
        ops.w8a8_mm(a[:, :60], gemm.pack_int8_weight(w), torch.ones(1), torch.ones(5))
    with pytest.raises(RuntimeError, match=r"shape \[2, 18, 64, 4\] for N=b_scale.numel\(\)=70"):
        ops.w8a8_mm(a, gemm.pack_int8_weight(w), torch.ones(1), torch.ones(70))  # N comes from b_scale
