"""Fake-quant autograd plumbing, empty tensors, output aliasing, opcheck and torch.compile.

See test_fake_quant.py for what is compared against what."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from q2ext import ops
from q2ext.reference import fake_quant as R
from q2ext._ops.fake_quant import MODE_AFFINE

from helpers import *  # noqa: F401,F403  (shared case model and checks)
from helpers import _describe  # noqa: F401


# ----------------------------------------------------------------------------- autograd plumbing

class _RecordBackwardMasks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.masks = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.q2ext.fake_quant_backward.default:
            self.masks.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_only_requested_gradients(kind):
    """Every learnable input gets a gradient; the backward is asked only for those that
    require one (output_mask), and requires_grad=False inputs work."""
    case = Case(kind, 4, kind != "pact", grad_factor=0.5)
    gen = torch.Generator().manual_seed(0)
    shape = (3, 4, 5)
    p = make_params(case, shape, gen)
    x = make_x(case, shape, p, gen, torch.float32)
    dy = make_dy(shape, gen, torch.float32)
    full = case.run(x, p, dy)
    n_in = 3 if case.third_name else 2
    for need in itertools.product([True, False], repeat=n_in):
        need3 = tuple(need) + ((False,) if n_in == 2 else ())
        with _RecordBackwardMasks() as rec:
            got = case.run(x, p, dy, need=need3)
        if any(need):
            assert rec.masks == [list(need3)], rec.masks
        else:
            assert rec.masks == []
        for want, g, n in zip(full[1:], got[1:], need3):
            if n:
                assert torch.equal(g, want)
            else:
                assert g is None
    # No input requires grad: a plain tensor comes out.
    y = case.call(x, p)
    assert not y.requires_grad


def test_every_learnable_input_receives_grad():
    x = torch.randn(2, 3, 4, requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    zp = torch.tensor([1.0], requires_grad=True)
    off = torch.tensor([0.05], requires_grad=True)
    a = torch.tensor([1.5], requires_grad=True)
    sc = torch.rand(3).add(0.05).requires_grad_()
    y = (ops.fake_quant_affine(x, s, zp, -8, 7) + ops.lsq(x, s, 3, offset=off) + ops.pact(x, a, 4)
         + ops.lsq(x, sc, 4, axis=1))
    y.square().sum().backward()
    for t in (x, s, zp, off, a, sc):
        assert t.grad is not None and t.grad.shape == t.shape and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 4), 1), ((4, 0), 0), ((3, 0), 1), ((2, 0, 3), None)])
def test_empty_tensors(kind, dtype, shape, axis):
    case = Case(kind, 4, kind != "pact", axis, grad_factor=0.5)
    c = 1 if axis is None else shape[axis]
    p = {"scale": torch.full((c,), 0.1)}
    if kind == "affine":
        p["zero_point"] = torch.full((c,), 1.0)
    if kind == "lsqp":
        p["offset"] = torch.full((c,), 0.01)
    if kind == "pact":
        p["scale"] = torch.full((c,), 2.0)
    x = torch.empty(shape, dtype=dtype)
    for isa in ISAS:
        with cpu_isa(isa):
            y, dx, ds, dt = case.run(x, p, torch.empty(shape, dtype=dtype))
        assert y.shape == shape and y.dtype == dtype
        assert dx.shape == shape and dx.dtype == dtype
        assert torch.equal(ds, torch.zeros(c))
        if dt is not None:
            assert torch.equal(dt, torch.zeros(c))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("mask", [[False, True, False], [True, False, False], [False, False, True]])
def test_backward_outputs_never_alias(impl, mask):
    """The schema returns three distinct tensors: unrequested or non-existent gradients
    come back as empty tensors, which must not be one shared tensor (aliasing outputs
    break functionalization / torch.compile; opcheck's test_schema checks the same)."""
    op = torch.ops.q2ext.fake_quant_backward if impl == "kernel" else R.fake_quant_backward_op
    x = torch.randn(3, 4)
    for zp, off in ((torch.tensor([1.0]), None), (None, torch.tensor([0.1])), (None, None)):
        outs = op(torch.ones_like(x), x, torch.tensor([0.1]), zp, off, -8, 7, None, MODE_AFFINE, 1.0, mask)
        for i, j in itertools.combinations(range(3), 2):
            a, b = outs[i], outs[j]
            assert a is not b and (a.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()), \
                f"outputs {i} and {j} alias (mask={mask}, zp={zp is not None}, offset={off is not None})"


# ----------------------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("name", list(fake_quant_opcheck_cases()))
def test_opcheck_fake_quant(name):
    opcheck_fake_quant(fake_quant_opcheck_cases()[name])


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
@pytest.mark.parametrize("name", list(fake_quant_opcheck_cases()))
def test_opcheck_fake_quant_backward(name, mask):
    opcheck_fake_quant_backward(fake_quant_opcheck_cases()[name], mask)


def _compile_fn(x, s, a, sc, zp, off):
    return (ops.lsq(x, s, 4) + ops.pact(x, a, 3) * 0.5
            + ops.fake_quant_affine(x, sc, zp, -8, 7, axis=1, grad_factor=0.5)
            + ops.lsq(x, s, 3, signed=False, offset=off))


def _compile_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 5, 4, generator=gen), torch.tensor([0.1]), torch.tensor([1.5]),
            torch.tensor([0.1, 0.2, 0.05]), torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.05]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    inputs = _compile_inputs()
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    y_e = _compile_fn(*eager_in)
    g_e = torch.autograd.grad(y_e, eager_in, dy)
    compiled = torch.compile(_compile_fn, fullgraph=True, backend=backend)
    y_c = compiled(*comp_in)
    g_c = torch.autograd.grad(y_c, comp_in, dy)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

