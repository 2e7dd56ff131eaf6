"""Anchors of the fake-quant ops against PyTorch's own fake-quant ops (fp32).

See test_fake_quant.py for what is compared against what."""
from __future__ import annotations


import pytest
import torch

from q2ext import ops

from helpers import *  # noqa: F401,F403  (shared case model and checks)
from helpers import _describe  # noqa: F401


# ----------------------------------------------------------------------------- ATen anchors

def _aten_data(shape, scale, zp, qmin, qmax, axis, seed, dyadic, ties=True):
    """x over the grid and 30% beyond, with exact grid points and (if `ties`) exact
    ties k + 1/2 in units of the scale; dy dyadic or normal."""
    gen = torch.Generator().manual_seed(seed)
    span = qmax - qmin
    v = (qmin - 0.3 * span) + 1.6 * span * torch.rand(shape, generator=gen)
    s = scale if axis is None else bcast(scale, torch.empty(shape), axis)
    z = zp if axis is None else bcast(zp, torch.empty(shape), axis)
    k = torch.randint(qmin - 3, qmax + 3, shape, generator=gen).float()
    u = torch.rand(shape, generator=gen)
    if dyadic:
        v = torch.round(v * 8) / 8
    if ties:
        v = torch.where(u < 0.2, k + 0.5, v)
    else:
        v = torch.where(torch.frac(v).abs() == 0.5, v + 0.125, v)
    v = torch.where((u >= 0.2) & (u < 0.3), k, v)  # exact grid points
    x = ((v - z) * s).float()
    dy = make_dy(shape, gen, torch.float32, dyadic)
    return x, dy


ATEN_GRIDS = [(-8, 7), (0, 15), (-128, 127), (0, 255), (-2, 1), (0, 3)]


@pytest.mark.parametrize("qmin,qmax", ATEN_GRIDS)
def test_aten_forward_per_tensor(qmin, qmax):
    for scale, zp in ((0.0625, 0), (0.1, 1), (0.037, qmax), (0.25, qmin), (3.3, (qmin + qmax) // 2)):
        x, _ = _aten_data((500,), torch.tensor(scale), torch.tensor(float(zp)), qmin, qmax, None, zp + 5, False)
        want = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        for isa in ISAS:
            with cpu_isa(isa):
                got = ops.fake_quant_affine(x, torch.tensor([scale]), torch.tensor([float(zp)]), qmin, qmax)
            assert torch.equal(got, want), f"scale={scale} zp={zp} {isa}: " + _describe(got, want, got != want, x)


@pytest.mark.parametrize("qmin,qmax", ATEN_GRIDS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_aten_forward_per_channel(qmin, qmax, axis):
    shape = (6, 5, 7)
    c = shape[axis]
    gen = torch.Generator().manual_seed(axis)
    scale = (0.01 + torch.rand(c, generator=gen) * 0.2).float()
    scale[0] = 0.125
    zp = torch.randint(qmin, qmax + 1, (c,), generator=gen, dtype=torch.int32)
    x, _ = _aten_data(shape, scale, zp.float(), qmin, qmax, axis, 3, False)
    want = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    for isa in ISAS:
        with cpu_isa(isa):
            got = ops.fake_quant_affine(x, scale, zp.float(), qmin, qmax, axis=axis)
        assert torch.equal(got, want), f"{isa}: " + _describe(got, want, got != want, x)


def _aten_learnable(x, scale, zp, qmin, qmax, axis, gf, dy):
    xl, sl, zl = (t.clone().requires_grad_() for t in (x, scale, zp))
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xl, sl, zl, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xl, sl, zl, axis, qmin, qmax, gf)
    return (y.detach(), *torch.autograd.grad(y, [xl, sl, zl], dy))


def _q2_affine(x, scale, zp, qmin, qmax, axis, gf, dy):
    case = Case("affine", axis=axis, grad_factor=gf)
    case.qmin, case.qmax = qmin, qmax
    return case.run(x, {"scale": scale, "zero_point": zp}, dy)


def _aten_zero_points(qmin, qmax, c, gen, per_tensor, even):
    """Integer zero points on which ATen's learnable backward is exact (see the two
    documenting tests below): per-tensor ones >= 0, and even ones where x has ties."""
    lo = max(qmin, 0) if per_tensor else qmin
    zp = torch.randint(lo, qmax + 1, (c,), generator=gen).float()
    if even:
        zp = torch.where(zp.remainder(2) == 1, zp - 1, zp).clamp(min=lo)
    return zp


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("qmin,qmax", ATEN_GRIDS)
@pytest.mark.parametrize("gf", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("ties", [False, True])
def test_aten_learnable_exact(axis, qmin, qmax, gf, ties):
    """Dyadic data: ATen's learnable fake quant and q2ext agree exactly, forward and all
    three gradients (integer zero points; grad_factor a power of two)."""
    shape = (12, 9)
    c = 1 if axis is None else shape[axis]
    gen = torch.Generator().manual_seed(qmax)
    scale = torch.pow(2.0, -torch.randint(1, 6, (c,), generator=gen).float())
    zp = _aten_zero_points(qmin, qmax, c, gen, axis is None, even=ties)
    x, dy = _aten_data(shape, scale, zp, qmin, qmax, axis, 7, True, ties)
    want = _aten_learnable(x, scale, zp, qmin, qmax, axis, gf, dy)
    for isa in ISAS:
        with cpu_isa(isa):
            got = _q2_affine(x, scale, zp, qmin, qmax, axis, gf, dy)
        for name, a, b in zip(("y", "dx", "dscale", "dzero_point"), got, want):
            assert torch.equal(a, b), f"{name} {isa}: " + _describe(a, b, a != b, x)


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("qmin,qmax", [(-8, 7), (0, 255), (-128, 127)])
def test_aten_learnable_generic(axis, qmin, qmax):
    """Generic data, grad_factor 0.37: forward and grad_x exact; scale/zero-point grads
    within the summation bound of both implementations (ATen sums fp32 per-element
    terms that differ from ours by a few roundings each)."""
    shape = (40, 30)
    c = 1 if axis is None else shape[axis]
    gen = torch.Generator().manual_seed(1)
    scale = (0.01 + 0.3 * torch.rand(c, generator=gen)).float()
    zp = _aten_zero_points(qmin, qmax, c, gen, axis is None, even=False)
    x, dy = _aten_data(shape, scale, zp, qmin, qmax, axis, 9, False, ties=False)
    gf = 0.37
    wy, wdx, wds, wdz = _aten_learnable(x, scale, zp, qmin, qmax, axis, gf, dy)
    y, dx, ds, dz = _q2_affine(x, scale, zp, qmin, qmax, axis, gf, dy)
    assert torch.equal(y, wy)
    assert torch.equal(dx, wdx)
    case = Case("affine", axis=axis, grad_factor=gf)
    case.qmin, case.qmax = qmin, qmax
    s_abs, c_abs, s_eff = case.abs_term_sums(x, {"scale": scale, "zero_point": zp}, dy)
    n = x.numel() // c
    # chain bound of both sums plus a few roundings of difference per term
    for got, want, a in ((ds, wds, s_abs), (dz, wdz, c_abs * s_eff)):
        tol = (min(n, 1056) + n + 8) * U32 * gf * a + 2 * U32 * want.double().abs()
        assert ((got.double() - want.double()).abs() <= tol).all(), (got, want, tol)


@pytest.mark.parametrize("zp_value,half_even,aten_trunc", [(2.5, 2.0, 3.0), (-1.5, -2.0, -1.0), (0.5, 0.0, 1.0)])
def test_zero_point_rounding_in_backward_differs_from_aten_per_tensor(zp_value, half_even, aten_trunc):
    """q2ext rounds a learnable zero point half-to-even in forward *and* backward.
    ATen's per-tensor learnable backward uses trunc(zp + 0.5) instead (its forward and
    its per-channel op round half-to-even), so at .5 zero points ATen's per-tensor
    gradients are those of a different zero point.  Documented in ops.fake_quant_affine."""
    qmin, qmax = -8, 7
    scale = torch.tensor([0.25])
    x, dy = _aten_data((300,), scale, torch.tensor([half_even]), qmin, qmax, None, 4, True, ties=False)
    zp = torch.tensor([zp_value])
    got = _q2_affine(x, scale, zp, qmin, qmax, None, 1.0, dy)
    aten = _aten_learnable(x, scale, zp, qmin, qmax, None, 1.0, dy)
    # The forwards agree (both round half to even).
    assert torch.equal(got[0], aten[0])
    # q2ext's gradients are those of the half-to-even integer zero point, in both ops ...
    for a, b in zip(got, _q2_affine(x, scale, torch.tensor([half_even]), qmin, qmax, None, 1.0, dy)):
        assert torch.equal(a, b)
    aten_c = _aten_learnable(x[None], scale, zp, qmin, qmax, 0, 1.0, dy[None])  # per-channel: half-even
    for a, b in zip(got, aten_c):
        assert torch.equal(a, b.reshape(a.shape))
    # ... while ATen's per-tensor backward uses trunc(zp + 0.5), i.e. another zero point:
    trunc_c = _aten_learnable(x[None], scale, torch.tensor([aten_trunc]), qmin, qmax, 0, 1.0, dy[None])
    for a, b in zip(aten[1:], trunc_c[1:]):
        assert torch.equal(a, b.reshape(a.shape))
    assert not (torch.equal(got[2], aten[2]) and torch.equal(got[3], aten[3]))


def test_aten_per_tensor_backward_negative_integer_zero_point():
    """Documents an ATen quirk the exact anchors avoid: for a *negative integer* zero
    point ATen's per-tensor learnable backward uses trunc(zp + 0.5) = zp + 1 (its
    per-channel op and q2ext use zp itself)."""
    qmin, qmax = -8, 7
    scale, zp = torch.tensor([0.25]), torch.tensor([-4.0])
    x, dy = _aten_data((300,), scale, zp, qmin, qmax, None, 5, True, ties=False)
    got = _q2_affine(x, scale, zp, qmin, qmax, None, 1.0, dy)
    per_channel = _aten_learnable(x[None], scale, zp, qmin, qmax, 0, 1.0, dy[None])
    for a, b in zip(got, per_channel):
        assert torch.equal(a, b.reshape(a.shape))
    per_tensor = _aten_learnable(x, scale, zp, qmin, qmax, None, 1.0, dy)
    shifted = _aten_learnable(x[None], scale, zp + 1, qmin, qmax, 0, 1.0, dy[None])
    for a, b in zip(per_tensor[1:], shifted[1:]):
        assert torch.equal(a, b.reshape(a.shape))
    assert not torch.equal(got[2], per_tensor[2])


@pytest.mark.parametrize("axis", [None, 0])
def test_aten_backward_mask_at_ties_with_odd_zero_point(axis):
    """Documents where ATen's learnable backward is inconsistent with its own forward:
    it masks on round(x/s + zp) while the forward uses round(x/s) + zp, which differ at
    exact ties when zp is odd.  q2ext masks on the forward's value (gradient flows to x
    exactly where the forward did not saturate) and so differs from ATen there."""
    qmin, qmax, zp = -8, 7, 1.0
    v = torch.tensor([-9.5, -8.5, 5.5, 6.5, -3.5, 2.5, 0.25])  # x / s
    scale = torch.tensor([0.25])
    x, dy = v * 0.25, torch.ones(7)
    if axis is not None:
        x, dy = x[None], dy[None]
    got = _q2_affine(x, scale, torch.tensor([zp]), qmin, qmax, axis, 1.0, dy)
    aten = _aten_learnable(x, scale, torch.tensor([zp]), qmin, qmax, axis, 1.0, dy)
    assert torch.equal(got[0], aten[0])  # forwards agree
    q_fwd = torch.round(v) + zp
    q_aten = torch.round(v + zp)
    want_q2 = ((q_fwd >= qmin) & (q_fwd <= qmax)).float()
    want_aten = ((q_aten >= qmin) & (q_aten <= qmax)).float()
    assert torch.equal(got[1].reshape(-1), want_q2)
    assert torch.equal(aten[1].reshape(-1), want_aten)
    assert torch.equal(want_q2 != want_aten, torch.tensor([1, 0, 0, 1, 0, 0, 0], dtype=torch.bool))


