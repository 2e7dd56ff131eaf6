"""ops.lsq is LSQ (Esser et al. 2019) and LSQ+ (Bhalgat et al. 2020) exactly, and
ops.fake_quant_affine stays ATen's learnable fake quant.

The oracle here is the papers' formulas, written out in float64 (not q2ext's reference):
with v = (x - offset) / s, clip first, then round,

    y = round(clamp(v, -Q_N, Q_P)) * s + offset
    dy/dx      = 1 for -Q_N < v < Q_P, else 0
    dy/ds      = round(v) - v inside, -Q_N for v <= -Q_N, Q_P for v >= Q_P
    dy/doffset = 0 inside, 1 where clipped.

The scales are powers of two and x = v * s with v on a 1/8 grid, so v is exact in fp32 and
every gradient term is exact: the kernels must match the formulas to the bit.  ATen's rule
(the mask on the *rounded* v) differs only in the bands Q_P < v < Q_P + 1/2 and
-Q_N - 1/2 <= v < -Q_N and at v = Q_P or -Q_N exactly; both are tested there.
"""
from __future__ import annotations

import pytest
import torch

from helpers import ISAS, cpu_isa
from q2ext import ops
from q2ext._ops.fake_quant import lsq_levels


def lsq_formulas(x, dy, s, offset, q_n, q_p, axis, g):
    """(y, dx, ds, doffset) of the papers' LSQ / LSQ+, in float64, per channel along `axis`."""
    xd, dyd = x.double(), dy.double()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    sd = s.double().reshape(shape)
    od = torch.zeros_like(sd) if offset is None else offset.double().reshape(shape)
    v = (xd - od) / sd
    y = torch.round(torch.clamp(v, -q_n, q_p)) * sd + od
    inside = (v > -q_n) & (v < q_p)
    below, above = v <= -q_n, v >= q_p
    dx = torch.where(inside, dyd, 0.0)
    ds_el = torch.where(inside, dyd * (torch.round(v) - v), torch.where(below, -q_n * dyd, q_p * dyd))
    doff_el = torch.where(below | above, dyd, 0.0)
    dims = [d for d in range(x.dim()) if d != axis]
    if axis is None:
        return y, dx, g * ds_el.sum().reshape(1), g * doff_el.sum().reshape(1)
    return y, dx, g * ds_el.sum(dims), g * doff_el.sum(dims)


def _band_values(q_n, q_p):
    """v at and around both grid ends (the band where ATen's rule and LSQ differ), and inside."""
    ends = []
    for e in (q_p, -q_n):
        ends += [e - 0.5, e - 0.25, e, e + 0.25, e + 0.5, e + 0.75]
    return torch.tensor(ends + [0.0, 0.375, -1.625, q_p + 3.0, -q_n - 3.0])


def _run(x, scale, offset, bits, signed, axis, g, dy):
    xl = x.detach().requires_grad_()
    sl = scale.detach().requires_grad_()
    ol = None if offset is None else offset.detach().requires_grad_()
    y = ops.lsq(xl, sl, bits, signed, axis=axis, offset=ol, grad_scale=g)
    grads = torch.autograd.grad(y, [t for t in (xl, sl, ol) if t is not None], dy)
    return (y.detach(), *grads) if ol is not None else (y.detach(), *grads, None)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("plus", [False, True], ids=["lsq", "lsq+"])
def test_lsq_is_the_papers_formula(isa, bits, signed, granularity, plus):
    q_n, q_p = lsq_levels(bits, signed)
    gen = torch.Generator().manual_seed(bits * 4 + signed * 2 + plus)
    channels = 5
    v = torch.cat([_band_values(q_n, q_p).repeat(channels, 1),
                   torch.round((torch.rand(channels, 40, generator=gen) * (q_p + q_n + 4) - q_n - 2) * 8) / 8], 1)
    if granularity == "tensor":
        axis, s = None, torch.tensor([2.0 ** -3])
        off = torch.tensor([0.25]) if plus else None
    else:
        axis, s = 0, torch.pow(2.0, -torch.randint(1, 6, (channels,), generator=gen).float())
        off = (torch.randint(-4, 5, (channels,), generator=gen).float() / 8) if plus else None
    shape = [1] * 2
    if axis is not None:
        shape[axis] = -1
    x = v * s.reshape(shape) + (0.0 if off is None else off.reshape(shape))
    dy = torch.randint(-4, 5, x.shape, generator=gen).float() / 4
    g = 0.5
    with cpu_isa(isa):
        y, dx, ds, doff = _run(x, s, off, bits, signed, axis, g, dy)
    ry, rdx, rds, rdoff = lsq_formulas(x, dy, s, off, q_n, q_p, axis, g)
    assert torch.equal(y.double(), ry)
    assert torch.equal(dx.double(), rdx)
    assert torch.equal(ds.double(), rds), (ds, rds)
    if plus:
        assert torch.equal(doff.double(), rdoff), (doff, rdoff)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, True), (2, False), (4, False)])
def test_band_elementwise(bits, signed):
    """Each element its own channel (axis 0, g = 1): the per-element gradients, written out."""
    q_n, q_p = lsq_levels(bits, signed)
    v = _band_values(q_n, q_p)
    s = torch.full_like(v, 0.25)
    x = v * s
    _, dx, ds, _ = _run(x, s, None, bits, signed, 0, 1.0, torch.ones_like(x))
    inside = (v > -q_n) & (v < q_p)
    want_ds = torch.where(inside, torch.round(v) - v, torch.where(v <= -q_n, float(-q_n), float(q_p)))
    assert torch.equal(dx, inside.float()), (v, dx)
    assert torch.equal(ds, want_ds), (v, ds, want_ds)
    # In the band above the grid LSQ pulls s up (+Q_P); ATen's rule (next test) gives Q_P - v < 0.
    band = (v > q_p) & (v < q_p + 0.5)
    assert band.any() and (ds[band] == q_p).all() and (dx[band] == 0).all()


def test_fake_quant_affine_keeps_aten_rule_in_the_band():
    q_n, q_p = 8, 7
    v = _band_values(q_n, q_p)
    s, zp = torch.tensor([0.25]), torch.tensor([0.0])
    for vals in (v, v[(v > q_p) & (v < q_p + 0.5)]):  # everything; only the band above the grid
        x, sl = (vals * s).requires_grad_(), s.clone().requires_grad_()
        ops.fake_quant_affine(x, sl, zp, -q_n, q_p).sum().backward()
        xa, sa = (vals * s).requires_grad_(), s.clone().requires_grad_()
        torch._fake_quantize_learnable_per_tensor_affine(xa, sa, zp, -q_n, q_p, 1.0).sum().backward()
        assert torch.equal(x.grad, xa.grad) and torch.equal(sl.grad, sa.grad)
        r = torch.round(vals)
        assert torch.equal(x.grad, ((r >= -q_n) & (r <= q_p)).float())
    assert (x.grad == 1).all() and sl.grad < 0  # in the band: the opposite sign of LSQ's +Q_P


def test_papers_code_agrees():
    """The LSQ paper's own autograd code (clamp, then round with a straight-through estimator)
    gives the same forward and dx, and the same ds up to its cancellation rounding."""
    q_n, q_p = 8, 7
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4001, generator=gen) * 1.2
    s = torch.tensor(0.1234567)

    def papers(xl, sl):
        vv = torch.clamp(xl / sl, -q_n, q_p)
        return ((vv.round() - vv).detach() + vv) * sl

    xp, sp = x.clone().requires_grad_(), s.clone().requires_grad_()
    papers(xp, sp).sum().backward()
    xq, sq = x.clone().requires_grad_(), s.reshape(1).clone().requires_grad_()
    ops.lsq(xq, sq, 4, grad_scale=1.0).sum().backward()
    # x / s (the paper) and x * (1/s) (q2ext, as ATen) may round differently at near-ties.
    near_tie = (torch.round(x / s) != torch.round(x * (1 / s)))
    assert near_tie.float().mean() < 0.01
    assert torch.equal(xp.grad[~near_tie], xq.grad[~near_tie])
    torch.testing.assert_close(sq.grad, sp.grad.reshape(1), rtol=1e-4, atol=1e-3)


def test_pact_is_the_papers_formula():
    """PACT (Choi et al. 2018): dy/dx = 1 for 0 <= x < alpha, dy/dalpha = 1 for x >= alpha."""
    alpha = torch.tensor([2.0])
    x = torch.tensor([-0.5, 0.0, 0.75, 2.0 - 2 ** -10, 2.0, 2.0 + 2 ** -10, 5.0])
    xl, al = x.clone().requires_grad_(), alpha.clone().requires_grad_()
    ops.pact(xl, al, 4).sum().backward()
    assert torch.equal(xl.grad, ((x >= 0) & (x < 2.0)).float())
    assert torch.equal(al.grad, (x >= 2.0).float().sum().reshape(1))
