"""Triton int GEMM kernels (q2ext/triton/gemm.py) against q2ext/reference/gemm.py.

Runs on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py).  W8A8 must be bit
identical to the reference (int32 exactly, the fp32/bf16 epilogue bit for bit); W4A16
within 1e-3 relative error (fp32 accumulation in another order), and bit identical
where every fp32 value is exact, which pins the bf16 rounding to nearest even.  Shapes
are small and tiles big: the interpreter costs about a millisecond per program; a few
tests shrink the tiles to get many tiles and K steps out of small shapes.
"""
from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import q2ext
from helpers import requires_triton_interpreter
from q2ext import backend
from q2ext import ops as gemm
from q2ext.reference import gemm as ref

pytestmark = requires_triton_interpreter

if q2ext._ext.has_triton():
    from q2ext.triton import gemm as tg

    W8 = torch.ops.q2ext.w8a8_mm_triton
    W4 = torch.ops.q2ext.w4a16_mm_triton

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.int32: torch.int32}


def assert_bits_equal(got, want):
    """Same shape, dtype and bits (NaNs compare by position)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype.is_floating_point:
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        bad = (got.view(_INT[got.dtype]) != want.view(_INT[want.dtype])) & ~nan
    else:
        bad = got != want
    assert not bad.any(), f"{int(bad.sum())} elements differ, e.g. {got[bad][:5]} vs {want[bad][:5]}"


def _ints(shape, dtype, gen):
    lo, hi = (-128, 128) if dtype == torch.int8 else (0, 256)
    return torch.randint(lo, hi, shape, dtype=dtype, generator=gen)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _check_w8a8(a, b, gen):
    """int32 exactly, then every epilogue variant bit for bit."""
    m, n = a.shape[0], b.shape[0]
    a_s, b_s = torch.rand(m, generator=gen) + 0.01, torch.rand(n, generator=gen) + 0.01
    bias = torch.randn(n, generator=gen)
    assert_bits_equal(W8(a, b, a_s, b_s, None, torch.int32), ref.int_mm(a, b))
    for od, bi, relu, asc in [(torch.float32, bias, False, a_s), (torch.bfloat16, bias, True, a_s[:1]),
                              (torch.float32, None, True, a_s[:1]), (torch.bfloat16, None, False, a_s)]:
        assert_bits_equal(W8(a, b, asc, b_s, bi, od, relu), ref.w8a8_mm(a, b, asc, b_s, bi, od, relu))


# ----------------------------------------------------------------------------- W8A8

# M = 1, N = 1, K below / not a multiple of / far above one K tile (K = 4097: 9 K steps).
SHAPES_8 = [(1, 1, 1), (1, 33, 65), (37, 1, 97), (45, 70, 300), (2, 3, 4097)]


@pytest.mark.parametrize("m,n,k", SHAPES_8)
@pytest.mark.parametrize("adt", [torch.int8, torch.uint8])
def test_w8a8_exact(m, n, k, adt):
    g = torch.Generator().manual_seed(m * 7919 + n * 31 + k)
    a, b = _ints((m, k), adt, g), _ints((n, k), torch.int8, g)
    _check_w8a8(a, b, g)
    bp = gemm.pack_int8_weight(b, signed_act=adt == torch.int8)  # a packed b is accepted too
    ones = torch.ones(n)
    assert_bits_equal(W8(a, bp, ones[:1], ones, None, torch.int32), ref.int_mm(a, b))


@pytest.mark.parametrize("adt", [torch.int8, torch.uint8])
def test_w8a8_many_tiles(monkeypatch, adt):
    """16x16x32 tiles: 10 tile rows (more than one GROUP_M band of 8), ragged M, N and K
    edges, 4 K steps per tile."""
    monkeypatch.setattr(tg, "_INTERP_W8", (16, 16, 32))
    g = torch.Generator().manual_seed(5)
    _check_w8a8(_ints((150, 100), adt, g), _ints((40, 100), torch.int8, g), g)


def test_w8a8_extremes_and_strides():
    ones = torch.ones(70)
    # |acc| up to 128 * 128 * 4097 > 2^24: the int32 -> fp32 conversion rounds (to nearest even).
    for av, bv, adt in [(-128, -128, torch.int8), (127, -128, torch.int8), (255, -128, torch.uint8),
                        (255, 127, torch.uint8)]:
        a = torch.full((3, 4097), av, dtype=adt)
        b = torch.full((5, 4097), bv, dtype=torch.int8)
        b[1, ::3] = 0
        assert_bits_equal(W8(a, b, ones[:1], ones[:5], None, torch.int32), ref.int_mm(a, b))
        s = torch.tensor([0.3, 1.7, 2.1])
        assert_bits_equal(W8(a, b, s, ones[:5] / 3), ref.w8a8_mm(a, b, s, ones[:5] / 3))
    g = torch.Generator().manual_seed(1)
    big = _ints((40, 300), torch.int8, g)
    view = big[5:30, 10:210]  # row stride != K
    wt = _ints((200, 33), torch.int8, g).t()  # b [33, 200] with K not innermost
    assert_bits_equal(W8(view, wt, ones[:1], ones[:33], None, torch.int32), ref.int_mm(view, wt))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter: 0 * inf, overflow
def test_w8a8_epilogue_special_values():
    """NaN (0 * inf), -0.0 through ReLU, infinities, a [0-dim] a_scale: as the reference."""
    g = torch.Generator().manual_seed(2)
    a, b = _ints((4, 20), torch.int8, g), _ints((6, 20), torch.int8, g)
    a[0] = 0  # acc = 0 -> 0 * inf = NaN, 0 * -1 = -0.0
    a_s = torch.tensor([float("inf"), -1.0, 1e30, 0.5])
    b_s = torch.tensor([1.0, -2.0, 1e-30, 3.0, 1e10, 0.0])
    bias = torch.tensor([0.0, -0.0, 1.0, float("-inf"), -1.0, 2.0])
    for bi in (None, bias):
        for relu in (False, True):
            for od in (torch.float32, torch.bfloat16):
                assert_bits_equal(W8(a, b, a_s, b_s, bi, od, relu), ref.w8a8_mm(a, b, a_s, b_s, bi, od, relu))
    s0 = torch.tensor(0.25)
    assert_bits_equal(W8(a, b, s0, b_s.abs()), ref.w8a8_mm(a, b, s0.reshape(1), b_s.abs()))


@pytest.mark.parametrize("m,n,k", [(0, 3, 5), (3, 0, 5), (2, 3, 0)])
def test_w8a8_empty(m, n, k):
    a, b = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    a_s, b_s = torch.ones(max(m, 1)), torch.ones(n)
    for od in (torch.float32, torch.int32):
        assert_bits_equal(W8(a, b, a_s, b_s, None, od), ref.w8a8_mm(a, b, a_s, b_s, None, od))


# ----------------------------------------------------------------------------- W4A16

def _w4_inputs(m, n, k, group, gen):
    q = torch.randint(0, 16, (n, k), generator=gen)
    wp = gemm.pack_int4(q)
    scales = torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3
    zeros = torch.randn(k // group, n, generator=gen) * 0.01
    return torch.randn(m, k, generator=gen), wp, scales, zeros


def _check_w4a16(x, wp, scales, zeros, group):
    got = W4(x, wp, scales, zeros, group)
    want = ref.w4a16_mm(x, wp, scales, zeros, group)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert _rel(got, want) <= 1e-3
    if x.dtype == torch.bfloat16:
        # Only near-ties may round the other way: at most 2x the error of rounding the
        # exact fp32 product to bf16.
        exact = x.float() @ ref.dequantize_int4(wp, scales, zeros, group).T
        assert _rel(got, exact) <= 2 * _rel(want, exact) + 1e-6


@pytest.mark.parametrize("m,n", [(1, 33), (19, 70)])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_matches_reference(m, n, group, dtype):
    g = torch.Generator().manual_seed(m * 100 + n + group)
    x, wp, scales, zeros = _w4_inputs(m, n, 256, group, g)
    _check_w4a16(x.to(dtype), wp, scales, zeros, group)


def test_w4a16_many_tiles_and_strides(monkeypatch):
    """16x16x32 tiles with group 128: 4 K steps per group of scales, 8 K steps, ragged
    M and N edges; x a strided view."""
    monkeypatch.setattr(tg, "_INTERP_W4", (16, 16, 32))
    g = torch.Generator().manual_seed(3)
    x, wp, scales, zeros = _w4_inputs(40, 50, 256, 128, g)
    xs = torch.randn(40, 512, generator=g)[:, ::2]
    for xx in (x, xs, xs.bfloat16()):
        _check_w4a16(xx, wp, scales, zeros, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a16_exact_values_round_to_nearest_even(dtype):
    """Small integers everywhere: every product and sum is exact in fp32 whatever the
    order, so the result must equal the reference bit for bit, bf16 ties included
    (|y| up to ~1e3, where bf16's spacing is 2..8)."""
    g = torch.Generator().manual_seed(4)
    n, k, group = 21, 128, 32
    wp = gemm.pack_int4(torch.randint(0, 16, (n, k), generator=g))
    scales = torch.randint(1, 3, (k // group, n), generator=g).float()
    zeros = torch.randint(-2, 3, (k // group, n), generator=g).float()
    x = torch.randint(-4, 5, (9, k), generator=g).to(dtype)
    want = ref.w4a16_mm(x, wp, scales, zeros, group)
    assert want.float().abs().max() > 256  # bf16 rounding happens
    assert_bits_equal(W4(x, wp, scales, zeros, group), want)


def test_w4a16_empty():
    wp = gemm.pack_int4(torch.zeros(5, 64, dtype=torch.int64))
    s, z = torch.ones(2, 5), torch.zeros(2, 5)
    assert W4(torch.zeros(0, 64), wp, s, z, 32).shape == (0, 5)


# ----------------------------------------------------------------------------- both

def test_int64_offsets(monkeypatch):
    """The 64-bit offset variant (taken on huge tensors) computes the same."""
    monkeypatch.setattr(tg, "_I64_LIMIT", 0)
    g = torch.Generator().manual_seed(6)
    _check_w8a8(_ints((5, 40), torch.uint8, g), _ints((7, 40), torch.int8, g), g)
    x, wp, scales, zeros = _w4_inputs(3, 21, 64, 32, g)
    _check_w4a16(x, wp, scales, zeros, 32)


def test_bad_inputs_name_the_argument():
    a, b = torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8)
    sa, sb = torch.ones(4), torch.ones(3)
    with pytest.raises(RuntimeError, match="a must be a 2-D int8 or uint8"):
        W8(a.float(), b, sa, sb)
    with pytest.raises(RuntimeError, match="b must be a 2-D int8"):
        W8(a, b.to(torch.uint8), sa, sb)
    with pytest.raises(RuntimeError, match="a_scale must have shape"):
        W8(a, b, torch.ones(3), sb)
    with pytest.raises(RuntimeError, match="b_scale must be float32"):
        W8(a, b, sa, sb.double())
    with pytest.raises(RuntimeError, match="bias must have shape"):
        W8(a, b, sa, sb, torch.ones(5))
    with pytest.raises(RuntimeError, match="out_dtype=int32 returns the raw accumulator"):
        W8(a, b, sa, sb, torch.ones(3), torch.int32)
    x = torch.randn(2, 128)
    q = torch.randint(0, 16, (20, 128))
    wp, s, z = gemm.pack_int4(q), torch.ones(1, 20), torch.zeros(1, 20)
    with pytest.raises(RuntimeError, match="unpacked weights"):
        W4(x, q.to(torch.uint8), s, z, 128)
    with pytest.raises(RuntimeError, match="group_size must be 32, 64 or 128"):
        W4(x, wp, s, z, 16)
    with pytest.raises(RuntimeError, match="zeros must be float32 with the shape of scales"):
        W4(x, wp, s, torch.zeros(1, 19), 128)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32 or bfloat16"):
        W4(x.half(), wp, s, z, 128)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    a, b = _ints((5, 64), torch.uint8, g), _ints((7, 64), torch.int8, g)
    x, wp4, s, z = _w4_inputs(5, 7, 64, 32, g)
    cases = [
        (W8, (a, b, torch.rand(5), torch.rand(7), torch.randn(7), torch.bfloat16, True)),
        (W8, (a.view(torch.int8), b, torch.rand(1), torch.rand(7), None, torch.int32, False)),
        (W4, (x, wp4, s, z, 32)),
        (W4, (x.bfloat16(), wp4, s, z, 32)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["native", "triton"])
def test_selector_routes_public_api(name):
    """gemm.w8a8_mm / gemm.w4a16_mm reach exactly the op the backend names."""
    g = torch.Generator().manual_seed(7)
    a, b = _ints((3, 40), torch.int8, g), _ints((5, 40), torch.int8, g)
    a_s, b_s = torch.rand(3, generator=g), torch.rand(5, generator=g)
    x, wp, scales, zeros = _w4_inputs(3, 5, 64, 32, g)
    try:
        backend.set_backend(name)
        with _OpLog() as log:
            y8 = gemm.w8a8_mm(a, b, a_s, b_s)
            y4 = gemm.w4a16_mm(x, wp, scales, zeros, 32)
    finally:
        backend.set_backend("auto")
    suffix = "_triton" if name == "triton" else ""
    assert log.names == [f"q2ext::w8a8_mm{suffix}", f"q2ext::w4a16_mm{suffix}"]
    assert_bits_equal(y8, ref.w8a8_mm(a, b, a_s, b_s))
    assert _rel(y4, ref.w4a16_mm(x, wp, scales, zeros, 32)) <= 1e-3


def test_selector_cuda_prefers_the_compiled_kernels(monkeypatch):
    """With a CUDA build of q2ext._C (csrc/cuda/gemm_*.cu), 'auto' on CUDA runs the native
    int GEMMs; 'triton' is taken only when asked for or when _C has no CUDA kernels.
    (Decision logic only: no tensor is created on a GPU.)"""
    monkeypatch.setattr(q2ext._ext, "has_compiled", lambda: True)
    monkeypatch.setattr(q2ext._ext, "has_triton", lambda: True)
    try:
        backend.set_backend("auto")
        monkeypatch.setattr(q2ext._ext, "compiled_with_cuda", lambda: True)
        assert backend.select("cuda") == "native"
        monkeypatch.setattr(q2ext._ext, "compiled_with_cuda", lambda: False)
        assert backend.select("cuda") == "triton"
        assert backend.select("cpu") == "native"
        backend.set_backend("native")
        with pytest.raises(RuntimeError, match="built without CUDA"):
            backend.select("cuda")
    finally:
        backend.set_backend("auto")


def test_torch_compile_fullgraph():
    """The Triton ops through the public API in a compiled graph (under the interpreter
    they are opaque custom ops traced through their fake kernels)."""
    g = torch.Generator().manual_seed(8)
    a, b = _ints((4, 48), torch.uint8, g), _ints((6, 48), torch.int8, g)
    a_s, b_s, bias = torch.rand(1, generator=g), torch.rand(6, generator=g), torch.randn(6, generator=g)
    x, wp, scales, zeros = _w4_inputs(4, 6, 64, 64, g)

    def f(a, x):
        return gemm.w8a8_mm(a, b, a_s, b_s, bias, torch.bfloat16, True), gemm.w4a16_mm(x, wp, scales, zeros, 64)

    torch._dynamo.reset()
    try:
        backend.set_backend("triton")
        y8, y4 = torch.compile(f, fullgraph=True, backend="aot_eager")(a, x)
    finally:
        backend.set_backend("auto")
        torch._dynamo.reset()
    assert_bits_equal(y8, ref.w8a8_mm(a, b, a_s, b_s, bias, torch.bfloat16, True))
    assert _rel(y4, ref.w4a16_mm(x, wp, scales, zeros, 64)) <= 1e-3
