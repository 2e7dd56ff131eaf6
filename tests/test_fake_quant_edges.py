"""Fake-quant ops on adversarial inputs, documented parameter edge cases and LSQ specifics.

See test_fake_quant.py for what is compared against what."""
from __future__ import annotations

import math

import pytest
import torch

from q2ext import ops
from q2ext.reference import fake_quant as R
from q2ext._ops.fake_quant import MODE_AFFINE, MODE_PACT

from helpers import *  # noqa: F401,F403  (shared case model and checks)
from helpers import _describe  # noqa: F401


# ----------------------------------------------------------------------------- adversarial

def _neighbours(t):
    """t and its two fp neighbours (by bit pattern +-1; t must be finite and nonzero)."""
    i = int_view(t)
    return torch.cat([t, (i + 1).view(t.dtype), (i - 1).view(t.dtype)])


def adversarial_x(case, p, dtype):
    """Ties, grid ends and rounding boundaries (+-1 ulp in x's dtype), specials."""
    s, inv, zp, off, clip = R._params(torch.empty(1), p["scale"], p.get("zero_point"), p.get("offset"),
                                      case.qmin, case.qmax, None, case.mode)
    ks = torch.arange(case.qmin - 2, case.qmax + 3).float()
    if case.mode == MODE_PACT:
        grid = lambda v: v * s  # noqa: E731
        ends = torch.cat([grid(torch.tensor([0.0, -0.5, 0.5, case.qmax, case.qmax - 0.5, case.qmax + 0.5])),
                          clip.reshape(1)])
    else:
        grid = lambda v: (v - zp) * s + off  # noqa: E731
        ends = grid(torch.tensor([case.qmin, case.qmax, case.qmin - 0.5, case.qmax + 0.5,
                                  case.qmin + 0.5, case.qmax - 0.5]))
    ends = ends.to(dtype)
    ends = ends[ends != 0]
    fi = torch.finfo(dtype)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e30, -1e30,
                             1e-40, -1e-40, 2.0 ** -24, -(2.0 ** -24), 2.0 ** -20, fi.max, -fi.max,
                             fi.tiny, -fi.tiny, fi.smallest_normal / 4]).to(dtype)
    ties = grid(ks + 0.5).to(dtype)
    exact = grid(ks).to(dtype)
    return torch.cat([ties, exact, _neighbours(ends), specials])


def _adversarial_params(kind, bits, signed, c=1):
    case = Case(kind, bits, signed, axis=None if c == 1 else 0, grad_factor=0.75)
    p = {"scale": torch.full((c,), 0.0625)}  # power of two: the ties above are exact
    if kind == "affine":
        p["zero_point"] = torch.full((c,), float(case.qmin + 1 if signed else 3))
    if kind == "lsqp":
        p["offset"] = torch.full((c,), -0.09375)
    if kind == "pact":
        p["scale"] = torch.full((c,), 0.0625 * case.qmax)
    return case, p


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,bits,signed", [(k, b, sg) for k in KINDS for b, sg in
                                              ((2, True), (4, False), (8, True), (8, False))
                                              if not (k == "pact" and sg)])  # PACT: unsigned grid only
def test_adversarial_values(kind, bits, signed, dtype):
    case, p = _adversarial_params(kind, bits, signed)
    x = adversarial_x(case, p, dtype)
    gen = torch.Generator().manual_seed(bits)
    dy = make_dy(x.shape, gen, dtype)
    y, dx, ds, dt = check_against_reference(case, x, p, dy)

    # Documented behaviour: NaN -> NaN and no gradient; +-inf saturate to the grid ends.
    nan = x.isnan()
    assert torch.equal(y.isnan() & nan, nan)
    assert (dx[nan] == 0).all()
    s, inv, zp, off, clip = R._params(x, p["scale"], p.get("zero_point"), p.get("offset"),
                                      case.qmin, case.qmax, None, case.mode)
    hi = ((case.qmax - zp) * s + off).to(dtype)
    lo = ((case.qmin - zp) * s + off).to(dtype) if case.mode == MODE_AFFINE else torch.zeros((), dtype=dtype)
    pos, neg = x == float("inf"), x == float("-inf")
    assert torch.equal(y[pos], hi.expand(int(pos.sum()))), (y[pos], hi)
    assert torch.equal(y[neg], lo.expand(int(neg.sum()))), (y[neg], lo)
    assert (dx[x.isinf()] == 0).all()
    # Finite x gives finite y unless the grid end itself overflows x's dtype.
    finite_grid = torch.isfinite(hi) and torch.isfinite(lo)
    if finite_grid:
        assert torch.isfinite(y[~nan]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_adversarial_per_channel(kind):
    """The special values in a per-channel tensor, channel axis inner and outer."""
    case, p = _adversarial_params(kind, 4, True, c=3)
    p["scale"] = p["scale"] * torch.tensor([1.0, 0.5, 4.0])
    row = adversarial_x(case, {k: v[:1] for k, v in p.items()}, torch.float32)
    x = torch.stack([row, row * 0.5, row * 4.0])
    gen = torch.Generator().manual_seed(0)
    dy = make_dy(x.shape, gen, torch.float32)
    check_against_reference(case, x, p, dy)
    case.axis = 1
    check_against_reference(case, x.t().contiguous(), p, dy.t().contiguous())
    check_against_reference(case, x.t(), p, dy.t())


@pytest.mark.parametrize("kind", KINDS)
def test_nan_contributes_no_gradient(kind):
    """Inserting NaNs changes nothing for the other elements: y, dx and the parameter
    gradients (exact dyadic data, so the sums can be compared exactly)."""
    case = Case(kind, 4, kind != "pact", grad_factor=0.5)
    gen = torch.Generator().manual_seed(2)
    p = make_params(case, (500,), gen, dyadic=True)
    x = make_x(case, (500,), p, gen, torch.float32, dyadic=True)
    dy = make_dy((500,), gen, torch.float32, dyadic=True)
    nan_at = torch.zeros(500, dtype=torch.bool)
    nan_at[::7] = True
    x_nan = torch.where(nan_at, float("nan"), x)
    for isa in ISAS:
        with cpu_isa(isa):
            y, dx, ds, dt = case.run(x_nan, p, dy)
            y0, dx0, ds0, dt0 = case.run(x[~nan_at], p, dy[~nan_at])
        assert y[nan_at].isnan().all() and (dx[nan_at] == 0).all()
        assert torch.equal(y[~nan_at], y0) and torch.equal(dx[~nan_at], dx0)
        # Case.factor depends on numel for LSQ's default g; compare at equal g.
        if case.kind in ("lsq", "lsqp"):
            g_nan, g0 = case.factor(x_nan, p["scale"]), case.factor(x[~nan_at], p["scale"])
            ds0, dt0 = ds0 / g0 * g_nan, (None if dt0 is None else dt0 / g0 * g_nan)
            torch.testing.assert_close(ds, ds0, rtol=1e-6, atol=0)
        else:
            assert torch.equal(ds, ds0)
            if dt is not None:
                assert torch.equal(dt, dt0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [2.0 ** -23, 3e-7, 1e-6, 2.0 ** -14, 515.9, 65520.0 / 127, 1000.0, 3.3e38])
def test_low_precision_rounding_edges(dtype, scale):
    """fp16/bf16 outputs in the subnormal range, at the overflow threshold (65504/65520
    for fp16) and near FLT_MAX: the kernels' own fp32->fp16/bf16 conversion must round
    exactly like PyTorch's."""
    case = Case("lsq", 8, True)
    p = {"scale": torch.tensor([scale], dtype=torch.float32)}
    n = torch.arange(-130, 131).float()
    x32 = torch.cat([n * scale, (n + 0.5) * scale, n * scale * 1.0001,
                     2.0 ** -24 * torch.arange(-40, 40).float()])  # fp16 subnormal inputs
    x = torch.cat([x32.to(dtype), _neighbours(x32[x32 != 0].to(dtype)[:50])])
    gen = torch.Generator().manual_seed(0)
    check_against_reference(case, x, p, make_dy(x.shape, gen, dtype))


def test_wide_grid_large_values():
    """quant_min/quant_max at the supported limits and |x/s| around 2^22..2^24, where the
    kernels' rounding trick is no longer exact (the value must stay clipped)."""
    gen = torch.Generator().manual_seed(0)
    mags = torch.tensor([2.0 ** 16, 2.0 ** 16 + 0.5, 2.0 ** 21 + 0.5, 2.0 ** 22 - 0.5, 2.0 ** 22, 2.0 ** 22 + 1,
                         2.0 ** 23 - 1, 2.0 ** 23 + 0.5 * 3, 2.0 ** 24 + 2, 3e9])
    v = torch.cat([mags, -mags, torch.linspace(-70000, 70000, 301)])
    for zp in (0.0, 65535.0, -65536.0, -7.5):
        p = {"scale": torch.tensor([0.5]), "zero_point": torch.tensor([zp])}
        case = Case("affine", grad_factor=1.0)
        case.qmin, case.qmax = -65536, 65535
        x = (v * 0.5).float()
        check_against_reference(case, x, p, make_dy(x.shape, gen, torch.float32))


# ----------------------------------------------------------------------------- parameter edge cases

def _effective(v):
    if math.isnan(v) or v < FLT_EPS:
        return FLT_EPS
    return min(v, FLT_MAX)


BAD_SCALES = [0.0, -0.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e-40, 1e-45, FLT_EPS / 2,
              float(torch.nextafter(torch.tensor(FLT_EPS), torch.tensor(0.0))), FLT_EPS, FLT_MAX]


@pytest.mark.parametrize("bad", BAD_SCALES, ids=repr)
@pytest.mark.parametrize("kind", KINDS)
def test_scale_edge_cases(kind, bad):
    """A scale (or alpha) that is NaN, <= 0 or below FLT_EPSILON acts as FLT_EPSILON,
    +inf as FLT_MAX; gradients are those taken at that effective value; no crash."""
    case = Case(kind, 4, kind != "pact", grad_factor=0.75)
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(50, generator=gen) * 1e-6, torch.randn(50, generator=gen),
                   torch.tensor([0.0, 1e30, -1e30, float("inf"), -float("inf"), float("nan")])])
    dy = make_dy(x.shape, gen, torch.float32)
    p = {"scale": torch.tensor([bad])}
    if kind == "affine":
        p["zero_point"] = torch.tensor([1.0])
    if kind == "lsqp":
        p["offset"] = torch.tensor([1e-7])
    eff = {**p, "scale": torch.tensor([_effective(bad)])}
    for isa in ISAS:
        with cpu_isa(isa):
            got = case.run(x, p, dy)
            want = case.run(x, eff, dy)
        for name, a, b in zip(("y", "dx", "dscale", "dthird"), got, want):
            if a is not None:
                assert_bits_equal(a, b, x, f"{case} scale={bad!r} {name}", nan_payload=True)
    check_against_reference(case, x, p, dy)


def test_per_channel_scale_edge_cases():
    bad = [0.1, 0.0, float("nan"), float("inf"), -2.0, 1e-40]
    eff = [_effective(v) for v in bad]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, len(bad), 5, generator=gen)
    dy = torch.randn(3, len(bad), 5, generator=gen)
    for kind in KINDS:
        case, p = _adversarial_params(kind, 4, kind != "pact", c=len(bad))
        case.axis = 1
        p["scale"] = torch.tensor(bad)
        got = case.run(x, p, dy)
        want = case.run(x, {**p, "scale": torch.tensor(eff)}, dy)
        for a, b in zip(got, want):
            if a is not None:
                assert_bits_equal(a, b, nan_payload=True)
        check_against_reference(case, x, p, dy)


@pytest.mark.parametrize("zp,acts_as", [(float("nan"), 0.0), (float("inf"), 7.0), (float("-inf"), -8.0),
                                        (1e10, 7.0), (-0.0, 0.0), (0.5, 0.0), (1.5, 2.0), (-2.5, -2.0)],
                         ids=repr)
def test_zero_point_edge_cases(zp, acts_as):
    """NaN zero point acts as 0; others are rounded half-to-even and clamped."""
    case = Case("affine", 4, True, grad_factor=0.75)
    gen = torch.Generator().manual_seed(8)
    x = torch.cat([torch.randn(200, generator=gen), torch.tensor([float("inf"), float("-inf"), float("nan")])])
    dy = make_dy(x.shape, gen, torch.float32)
    p = {"scale": torch.tensor([0.125]), "zero_point": torch.tensor([zp])}
    for isa in ISAS:
        with cpu_isa(isa):
            got = case.run(x, p, dy)
            want = case.run(x, {**p, "zero_point": torch.tensor([acts_as])}, dy)
        for name, a, b in zip(("y", "dx", "dscale", "dzp"), got, want):
            assert_bits_equal(a, b, x, f"zp={zp!r} {name}", nan_payload=True)
    check_against_reference(case, x, p, dy)


# ----------------------------------------------------------------------------- LSQ specifics

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,axis", [((7, 13), None), ((7, 13), 0), ((7, 13), 1), ((4, 3, 5, 5), 1)])
def test_lsq_default_grad_scale(shape, axis, signed):
    """grad_scale=None means g = 1/sqrt(N * Q_P), N = numel / scale.numel()."""
    bits = 3
    q_p = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    case = Case("lsqp", bits, signed, axis)
    gen = torch.Generator().manual_seed(0)
    p = make_params(case, shape, gen)
    x = make_x(case, shape, p, gen, torch.float32)
    dy = make_dy(shape, gen, torch.float32)
    n = math.prod(shape) // p["scale"].numel()
    g = 1.0 / math.sqrt(n * q_p)
    assert R.lsq_grad_scale(math.prod(shape), p["scale"].numel(), q_p) == g
    assert case.factor(x, p["scale"]) == g
    default = case.run(x, p, dy)
    explicit = Case("lsqp", bits, signed, axis, grad_scale=g).run(x, p, dy)
    unit = Case("lsqp", bits, signed, axis, grad_scale=1.0).run(x, p, dy)
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)
    # g multiplies the scale and offset gradients (in double, before rounding to fp32).
    assert torch.equal(default[1], unit[1])
    torch.testing.assert_close(default[2], (unit[2].double() * g).float(), rtol=4 * U32, atol=0)
    torch.testing.assert_close(default[3], (unit[3].double() * g).float(), rtol=4 * U32, atol=0)
    check_against_reference(case, x, p, dy)


def _per_element_scale_grad(fn, x, s):
    """d(sum y)/d s_i for a scale that is a separate leaf per element."""
    se = s.expand(x.shape).clone().requires_grad_()
    xl = x.clone().requires_grad_()
    y = fn(xl, se)
    dx, ds = torch.autograd.grad(y.sum(), [xl, se])
    return dx, ds


def test_classic_ste_formulations_vs_lsq_gradient():
    """Why the reference does not use an autograd STE formulation of LSQ.

    The reference takes the clip mask on the *rounded* grid index r = round(x/s)
    (ATen's learnable fake quant; LSQ with zero_point = 0):
        Q_N <= r <= Q_P: dx = dy, ds = r - x/s;   else: dx = 0, ds = -Q_N or Q_P.
    torch.clamp with scalar bounds passes no gradient *at* a bound, so:
    * the classic `v = (v.round() - v).detach() + v` then `clamp(v, -Q_N, Q_P)` treats
      every element that rounds onto a grid end (|r| at the bound) as clipped: dx = 0 and
      ds = Q_P / -Q_N instead of dx = dy and ds = r - v;
    * the LSQ paper's code (clamp x/s first, then round with the STE) does the same for
      elements on the outer side of a grid end that still round onto it, x/s in
      [Q_P, Q_P + 1/2) and (-Q_N - 1/2, -Q_N] (ties per half-to-even).
    Elsewhere both agree with the reference (up to rounding: autograd forms ds as
    r + s * d(x/s)/ds, a cancellation, where the reference computes r - x/s directly).
    """
    bits, q_n, q_p = 4, 8, 7
    s = torch.tensor(0.25)  # power of two: x/s is exact
    v = torch.tensor([q_p + 0.25, q_p + 0.5, q_p + 0.75, -q_n - 0.25, -q_n - 0.5, -q_n - 0.75,
                      q_p - 0.25, -q_n + 0.25, 0.3, q_p + 3.0, -q_n - 3.0, q_p, -q_n, q_p - 0.5, -q_n + 0.5])
    x = v * s
    r = torch.round(v)
    at_end = (r == q_p) | (r == -q_n)
    outer = (v >= q_p) | (v <= -q_n)
    end_value = torch.where(v > 0, float(q_p), float(-q_n))

    # The kernel's per-element gradients: each element its own channel; = reference.
    case = Case("lsq", bits, True, axis=0, grad_scale=1.0)
    _, dx_ref, ds_ref, _ = case.run(x, {"scale": s.expand(x.shape).clone()}, torch.ones_like(x))
    assert torch.equal(ds_ref, R.fake_quant_backward(torch.ones_like(x)[:, None], x[:, None], s.expand(x.shape),
                                                     None, None, -q_n, q_p, 0, MODE_AFFINE)[1])
    assert torch.equal(dx_ref, ((r >= -q_n) & (r <= q_p)).float())
    assert torch.equal(ds_ref[at_end], r[at_end] - v[at_end])

    def round_then_clamp(xl, se):
        vv = xl / se
        vv = (vv.round() - vv).detach() + vv
        return torch.clamp(vv, -q_n, q_p) * se

    def clamp_then_round(xl, se):  # the LSQ paper's code
        vv = torch.clamp(xl / se, -q_n, q_p)
        return ((vv.round() - vv).detach() + vv) * se

    y_ref = ops.lsq(x, s.reshape(1), bits)
    for fn, differs in ((round_then_clamp, at_end), (clamp_then_round, at_end & outer)):
        assert torch.equal(fn(x, s), y_ref)  # the forwards are identical
        dx, ds = _per_element_scale_grad(fn, x, s)
        assert torch.equal((ds != ds_ref) | (dx != dx_ref), differs), (fn.__name__, v, ds, ds_ref, dx, dx_ref)
        assert torch.equal(ds[differs], end_value[differs]) and (dx[differs] == 0).all()
        assert (dx_ref[differs] == 1).all()

    # With a generic scale, away from the grid ends, round-then-clamp agrees up to rounding.
    s2 = torch.tensor(0.1234567)
    x2 = torch.linspace(-3, 3, 4001)
    _, ds_b2 = _per_element_scale_grad(round_then_clamp, x2, s2)
    _, _, ds_ref2, _ = case.run(x2, {"scale": s2.expand(x2.shape).clone()}, torch.ones_like(x2))
    r_div, r_mul = torch.round(x2 / s2), torch.round(x2 * (1 / s2))
    keep = (r_div == r_mul) & (r_div != q_p) & (r_div != -q_n)  # division vs reciprocal at near-ties
    assert keep.float().mean() > 0.95
    torch.testing.assert_close(ds_b2[keep], ds_ref2[keep], rtol=0, atol=1e-5)


