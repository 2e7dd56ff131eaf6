"""Fake-quant ops on adversarial inputs, documented parameter edge cases and LSQ specifics.

See test_fake_quant.py for what is compared against what."""
from __future__ import annotations

import math

import pytest
import torch

from q2ext.reference import fake_quant as R
from q2ext._ops.fake_quant import MODE_PACT

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
    lo = ((case.qmin - zp) * s + off).to(dtype) if case.mode != MODE_PACT else torch.zeros((), dtype=dtype)
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
