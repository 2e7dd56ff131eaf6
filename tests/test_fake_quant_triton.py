"""Triton fake-quant kernels against the reference (and the C++ op's conventions).

Runs on CPU tensors under TRITON_INTERPRET=1 (set in tests/conftest.py before triton is
imported).  Forward and grad_x must be bit-identical to q2ext.reference.fake_quant; the parameter
gradients (fp32 partial sums, fp64 fixed-order total) must match the reference's
float64 sums within float tolerance.  Shapes are small and blocks big: the interpreter
costs about a millisecond per program instance.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import q2ext
from helpers import requires_triton_interpreter
from q2ext import backend
from q2ext.reference import fake_quant as reference
from q2ext._ops.fake_quant import MODE_AFFINE, MODE_LSQ, MODE_PACT

pytestmark = requires_triton_interpreter

if q2ext._ext.has_triton():
    from q2ext.triton import fake_quant as tfq

    FQ = torch.ops.q2ext.fake_quant_triton
    FQB = torch.ops.q2ext.fake_quant_backward_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# ----------------------------------------------------------------------------- helpers

def assert_bits_equal(a, b):
    """Same shape, strides, dtype and bits (every NaN counts as equal to every NaN)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.stride() == b.stride(), (a.stride(), b.stride())
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    ia, ib = a.view(_INT[a.dtype]), b.view(_INT[b.dtype])
    bad = (ia != ib) & ~nan_a
    assert not bad.any(), f"{int(bad.sum())} elements differ, e.g. {a[bad][:5]} vs {b[bad][:5]}"


def assert_grad_close(got, want, bound):
    """fp32-accumulated sums vs the float64 reference, within 1e-5 of a bound on the
    sum of the terms' magnitudes (equal values, infinities included, and NaN pairs pass)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    diff = (got.double() - want.double()).abs()
    ok = same | (diff <= 1e-5 * bound.reshape(got.shape) + 1e-6 * want.double().abs())
    assert bool(ok.all()), (got, want, bound)


def grad_bounds(dy, x, scale, zp, off, qmin, qmax, axis, mode, g):
    """Per-parameter bounds of sum |term| for dscale and dthird."""
    a = dy.double().abs()
    dims = [d for d in range(x.dim()) if d != axis]
    a = a.sum().reshape(1) if axis is None else (a.sum(dim=dims) if dims else a)
    s = reference._params(x, scale, zp, off, qmin, qmax, axis, mode)[0].double().reshape(-1)
    b_scale = abs(g) * a * (2 * (abs(qmin) + abs(qmax)) + 1)
    b_third = abs(g) * a * (s if zp is not None else 1.0)
    return b_scale, b_third


def make_params(kind, channels, gen):
    """(scale, zero_point, offset, qmin, qmax, mode) for a quantizer kind."""
    scale = (torch.rand(channels, generator=gen) * 0.2 + 0.02).float()
    if kind == "affine_zp":
        zp = torch.rand(channels, generator=gen) * 255
        zp[0] = 100.5  # a tie: rounds half to even
        return scale, zp, None, 0, 255, MODE_AFFINE
    if kind == "lsq_offset":
        off = torch.randn(channels, generator=gen) * 0.1
        return scale, None, off, -8, 7, MODE_LSQ
    if kind == "lsq":
        return scale, None, None, -4, 3, MODE_LSQ
    if kind == "pact":
        alpha = (torch.rand(channels, generator=gen) * 2 + 0.5).float()
        return alpha, None, None, 0, 15, MODE_PACT
    raise AssertionError(kind)


def check_against_reference(x, scale, zp, off, qmin, qmax, axis, mode, g=0.75, dy=None, gen=None):
    y = FQ(x, scale, zp, off, qmin, qmax, axis, mode, g)
    y_ref = reference.fake_quant(x, scale, zp, off, qmin, qmax, axis, mode)
    assert_bits_equal(y, y_ref)
    # The C++ op's output layout convention.
    assert y.stride() == torch.ops.q2ext.fake_quant(x, scale, zp, off, qmin, qmax, axis, mode, g).stride()

    if dy is None:
        dy = torch.randn(x.shape, generator=gen).to(x.dtype)
    dx, dscale, dthird = FQB(dy, x, scale, zp, off, qmin, qmax, axis, mode, g, [True, True, True])
    rdx, rdscale, rdthird = reference.fake_quant_backward(dy, x, scale, zp, off, qmin, qmax, axis, mode, g)
    assert_bits_equal(dx, reference.dense_like(x).copy_(rdx))
    b_scale, b_third = grad_bounds(dy, x, scale, zp, off, qmin, qmax, axis, mode, g)
    assert_grad_close(dscale, rdscale, b_scale)
    if rdthird is None:
        assert dthird.numel() == 0
    else:
        assert_grad_close(dthird, rdthird, b_third)
    return y, (dx, dscale, dthird)


def layout(x, kind):
    if kind == "contiguous":
        return x
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # non-dense view: every other column of a wider tensor
        wide = torch.cat([x, x.flip(-1)], dim=-1)
        return wide[..., ::2]
    raise AssertionError(kind)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["affine_zp", "lsq_offset", "lsq", "pact"])
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
@pytest.mark.parametrize("lay", ["contiguous", "channels_last", "sliced"])
def test_matches_reference(dtype, kind, axis, lay):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((dtype, kind, axis, lay)).encode()))
    x = (torch.randn(3, 5, 4, 7, generator=gen) * 0.6).to(dtype)
    if kind == "pact":
        x = x.abs() * 2 - 0.3
    x = layout(x, lay)
    channels = 1 if axis is None else x.shape[axis]
    scale, zp, off, qmin, qmax, mode = make_params(kind, channels, gen)
    check_against_reference(x, scale, zp, off, qmin, qmax, axis, mode, gen=gen)


@pytest.mark.parametrize("n", [1, 59, 97, 1025])
@pytest.mark.parametrize("per_channel", [False, True])
def test_odd_sizes(n, per_channel):
    gen = torch.Generator().manual_seed(n)
    for shape, axis in ([(n,), 0], [(n, 3), 1], [(2, n), 0], [(n, 3), 0]):
        x = torch.randn(shape, generator=gen)
        ax = axis if per_channel else None
        channels = 1 if ax is None else shape[ax]
        scale, _, off, qmin, qmax, mode = make_params("lsq_offset", channels, gen)
        check_against_reference(x, scale, None, off, qmin, qmax, ax, mode, gen=gen)


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((3, 8195), None),      # several per-tensor programs
        ((2, 3, 4100), 1),      # channel axis not innermost, several chunks per channel
        ((300, 40), 1),         # channel axis innermost, several row blocks
        ((20, 300), 1),         # innermost, several channel blocks (C > 128)
        ((50, 3, 2), 1),        # inner = 2: strided gather per channel
        ((700, 3), 0),          # many short channels (inner = 3): several per tile
        ((2, 5, 300), 1),       # per-channel runs of 300, two runs per channel
    ],
)
def test_multi_program(shape, axis):
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[-1])
    x = torch.randn(shape, generator=gen)
    channels = 1 if axis is None else shape[axis]
    for kind in ("affine_zp", "pact"):
        scale, zp, off, qmin, qmax, mode = make_params(kind, channels, gen)
        xx = x.abs() if kind == "pact" else x
        check_against_reference(xx, scale, zp, off, qmin, qmax, axis, mode, gen=gen)


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("kind", ["affine_zp", "lsq_offset", "pact"])
def test_empty(axis, kind):
    x = torch.empty(0, 3)
    channels = 1 if axis is None else 3
    scale, zp, off, qmin, qmax, mode = make_params(kind, channels, torch.Generator().manual_seed(0))
    y = FQ(x, scale, zp, off, qmin, qmax, axis, mode, 1.0)
    assert y.shape == x.shape
    dx, dscale, dthird = FQB(x, x, scale, zp, off, qmin, qmax, axis, mode, 0.5, [True, True, True])
    c = reference.fake_quant_backward_op(x, x, scale, zp, off, qmin, qmax, axis, mode, 0.5, [True, True, True])
    assert dx.shape == x.shape
    assert_bits_equal(dscale, c[1])
    assert_bits_equal(dthird, c[2])
    # A zero-sized channel axis: parameters with no elements.
    x0 = torch.empty(2, 0)
    s0 = torch.empty(0)
    out = FQB(x0, x0, s0, None, None, -4, 3, 1, MODE_AFFINE, 1.0, [True, True, True])
    assert [t.shape for t in out] == [x0.shape, s0.shape, (0,)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on inf/NaN
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_values(dtype):
    s = 0.25
    k = torch.arange(-12, 12, dtype=torch.float32)
    ties = (k + 0.5) * s                       # exact ties on the grid: half to even
    near = (k + 0.5) * 0.1                     # near-ties through the fp32 product
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 0.0, -0.0,
                            1e-40, -1e-40, 4194304.5 * 0.25, -4194304.5 * 0.25, 3e38, -3e38])
    x = torch.cat([ties, near, special]).to(dtype)
    scales = [torch.tensor([s]), torch.tensor([0.1])]
    for scale in scales:
        for zp_val in (None, 2.5, -3.5, float("nan"), 1e30):
            zp = None if zp_val is None else torch.tensor([zp_val])
            check_against_reference(x, scale, zp, None, -8, 7, None, MODE_AFFINE,
                                    dy=torch.linspace(-1, 1, x.numel()).to(dtype))
        check_against_reference(x, scale, None, torch.tensor([0.05]), -8, 7, None, MODE_AFFINE,
                                dy=torch.linspace(-1, 1, x.numel()).to(dtype))
    # PACT with ties and specials.
    check_against_reference(x, torch.tensor([1.5]), None, None, 0, 15, None, MODE_PACT,
                            dy=torch.linspace(-1, 1, x.numel()).to(dtype))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_adversarial_parameters():
    """Scale NaN / <= 0 / tiny / inf and zero points NaN / huge / ties, per channel."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, 6, generator=gen) * 3
    scale = torch.tensor([float("nan"), 0.0, -1.0, 1e-30, float("inf"), 3e38, 0.1, 1.0, 2.5, 1e-7])
    zp = torch.tensor([float("nan"), 1e30, -1e30, 2.5, 3.5, -0.5, 0.5, 255.0, 300.0, -7.0])
    check_against_reference(x, scale, zp, None, 0, 255, 1, MODE_AFFINE, gen=gen)
    check_against_reference(x, scale, None, zp * 1e-3, -128, 127, 1, MODE_AFFINE, gen=gen)
    check_against_reference(x.abs(), scale, None, None, 0, 255, 1, MODE_PACT, gen=gen)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_rounding_ties_and_overflow(dtype):
    """Outputs that are exact ties (and overflows) of the fp32 -> bf16/fp16 conversion."""
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    x = torch.arange(-256, 257, dtype=torch.float32).to(dtype)
    dy = torch.ones(x.shape, dtype=dtype)
    for s in (1.0 + eps, 1.0 + 3 * eps, 1.0 - eps / 2):
        check_against_reference(x, torch.tensor([s]), None, None, -300, 300, None, MODE_AFFINE, dy=dy)
    check_against_reference(x, torch.tensor([1000.0]), None, None, -128, 127, None, MODE_AFFINE, dy=dy)
    check_against_reference(x, torch.tensor([3e38]), None, None, -128, 127, None, MODE_AFFINE, dy=dy)


def test_int64_offsets(monkeypatch):
    """The 64-bit offset path (taken for tensors near 2^31 elements), forced on small ones."""
    monkeypatch.setattr(tfq, "_I64_LIMIT", 0)
    gen = torch.Generator().manual_seed(8)
    for shape, axis in (((3, 70), None), ((2, 5, 30), 1), ((40, 6), 1)):
        x = torch.randn(shape, generator=gen)
        c = 1 if axis is None else shape[axis]
        scale, zp, off, qmin, qmax, mode = make_params("affine_zp", c, gen)
        check_against_reference(x, scale, zp, off, qmin, qmax, axis, mode, gen=gen)


@pytest.mark.parametrize("scale_shape,third_shape", [((), ()), ((), (1,)), ((1,), ())])
@pytest.mark.parametrize("third", ["zp", "offset"])
def test_zero_dim_parameters(scale_shape, third_shape, third):
    """0-dim parameters (mixed with [1]): each gradient has its own parameter's shape."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 9, generator=gen)
    scale = torch.tensor(0.1).reshape(scale_shape)
    t = torch.tensor(3.4 if third == "zp" else 0.02).reshape(third_shape)
    zp, off = (t, None) if third == "zp" else (None, t)
    qmin, qmax = (0, 15) if third == "zp" else (-8, 7)
    _, (_, dscale, dthird) = check_against_reference(x, scale, zp, off, qmin, qmax, None, MODE_AFFINE, gen=gen)
    assert dscale.shape == scale_shape and dthird.shape == third_shape


def test_broadcast_grad():
    """An expanded (stride-0) incoming gradient, as from y.sum().backward()."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 5, generator=gen).to(torch.bfloat16)
    dy = torch.tensor(0.75, dtype=torch.bfloat16).expand(3, 4, 5)
    scale = torch.rand(4, generator=gen) * 0.1 + 0.05
    check_against_reference(x, scale, None, None, -8, 7, 1, MODE_AFFINE, dy=dy)


def test_deterministic():
    gen = torch.Generator().manual_seed(5)
    for shape, axis in (((3, 9000), None), ((2, 3, 4100), 1), ((300, 40), 1)):
        x = torch.randn(shape, generator=gen)
        dy = torch.randn(shape, generator=gen)
        c = 1 if axis is None else shape[axis]
        scale = torch.rand(c, generator=gen) * 0.1 + 0.01
        zp = torch.rand(c, generator=gen) * 10
        a = FQB(dy, x, scale, zp, None, 0, 15, axis, MODE_AFFINE, 1.0, [True, True, True])
        b = FQB(dy, x, scale, zp, None, 0, 15, axis, MODE_AFFINE, 1.0, [True, True, True])
        for u, v in zip(a, b):
            assert_bits_equal(u, v)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [False, False, False], [True, True, True]])
@pytest.mark.parametrize("third", [None, "zp", "offset"])
def test_output_conventions(mask, third):
    """Unrequested / non-existent gradients come back exactly as the C++ op's."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, generator=gen).permute(2, 0, 1)  # dense, not contiguous
    dy = torch.randn(5, 4, 6, generator=gen)  # contiguous: differs from x's layout
    scale = torch.rand(4, generator=gen) * 0.1 + 0.05
    zp = torch.rand(4, generator=gen) * 8 if third == "zp" else None
    off = torch.randn(4, generator=gen) * 0.1 if third == "offset" else None
    args = (dy, x, scale, zp, off, 0 if zp is not None else -8, 15 if zp is not None else 7, 1, MODE_AFFINE,
            0.3, mask)
    got = FQB(*args)
    want = torch.ops.q2ext.fake_quant_backward(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        if g.numel():
            if g.shape == x.shape:
                assert_bits_equal(g, w)
            else:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_argument_checks():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        FQ(x, torch.ones(2), None, None, -4, 3, 1, MODE_AFFINE, 1.0)
    with pytest.raises(RuntimeError, match="PACT"):
        FQ(x, torch.ones(1), None, None, -4, 3, None, MODE_PACT, 1.0)
    with pytest.raises(RuntimeError, match="grad must match"):
        FQB(x.double(), x, torch.ones(1), None, None, -4, 3, None, MODE_AFFINE, 1.0, [True, True, True])


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=gen)
    dy = torch.randn(3, 4, 5, generator=gen)
    scale = torch.rand(4, generator=gen) * 0.1 + 0.05
    zp = torch.rand(4, generator=gen) * 10
    off = torch.randn(1, generator=gen) * 0.1
    cases = [
        (x.requires_grad_(), scale.clone().requires_grad_(), zp.clone().requires_grad_(), None, 0, 15, 1,
         MODE_AFFINE, 0.5),
        (x, torch.tensor([0.1]).requires_grad_(), None, off.requires_grad_(), -8, 7, None, MODE_AFFINE, 1.0),
        (x.abs(), torch.tensor([1.0]), None, None, 0, 15, None, MODE_PACT, 1.0),
    ]
    for args in cases:
        torch.library.opcheck(FQ, args)
        bargs = (dy,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(FQB, bargs + ([True, True, True],))
        torch.library.opcheck(FQB, bargs + ([True, False, False],))


def test_autograd_matches_native():
    """The registered autograd formula through the public API, triton vs native backend."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 8, 3, 3, generator=gen)
    s0 = torch.rand(8, generator=gen) * 0.1 + 0.05
    o0 = torch.randn(8, generator=gen) * 0.05
    results = {}
    try:
        for name in ("native", "triton"):
            backend.set_backend(name)
            x, s, o = (t.clone().requires_grad_() for t in (x0, s0, o0))
            y = q2ext.ops.lsq(x, s, 4, axis=1, offset=o)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            results[name] = (y.detach(), x.grad, s.grad, o.grad)
    finally:
        backend.set_backend("auto")
    (yn, xn, sn, on), (yt, xt, st, ot) = results["native"], results["triton"]
    assert_bits_equal(yt, yn)
    assert_bits_equal(xt, xn)
    torch.testing.assert_close(st, sn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ot, on, rtol=1e-5, atol=1e-6)


@pytest.fixture
def triton_backend():
    backend.set_backend("triton")
    yield
    backend.set_backend("auto")


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile(triton_backend, compile_backend):
    """torch.compile(fullgraph=True) of the public API on the Triton backend.

    Under TRITON_INTERPRET=1 the Triton ops are registered as opaque custom ops (an
    interpreted kernel cannot be traced by wrap_triton, see q2ext/triton/fake_quant.py):
    Dynamo captures the whole function, AOT autograd traces forward and backward
    through the ops' fake kernels, and ``aot_eager`` / Inductor (C++ codegen for the
    surrounding ops, the custom ops called as extern kernels) run the kernels in the
    interpreter.  Inductor's own handling of the triton_op (wrap_triton, user-defined
    kernels inlined into the graph) needs a GPU and is not exercised here.
    """
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 6, 5, 5, generator=gen)
    s0 = torch.rand(6, generator=gen) * 0.1 + 0.05

    def f(x, s):
        y = q2ext.ops.lsq(x, s, 4, axis=1)
        return y, y.square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=compile_backend)
    outs = []
    for fn in (f, cf):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        y, loss = fn(x, s)
        loss.backward()
        outs.append((y.detach(), loss.detach(), x.grad, s.grad))
    (y0, l0, gx0, gs0), (y1, l1, gx1, gs1) = outs
    assert_bits_equal(y1, y0)
    assert_bits_equal(gx1, gx0)  # dy = 2*y is exact whatever the backend fuses
    torch.testing.assert_close(l1, l0)  # Inductor may sum the squares in another order
    torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-7)
