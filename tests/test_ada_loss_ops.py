"""q2ext::ada_loss (Q-ADA): kernels vs the reference (q2ext/reference/ada_loss.py).

Oracle: the reference evaluated in float64 on the same input values.  A kernel's error
must stay within 2x the reference's own error at the kernel's dtype (the reference run on
those inputs at that precision) plus a floor of a few ulps of the result.
"""
import itertools
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import q2ext  # noqa: F401  (loads the kernels)
from q2ext._ops.ada_loss import DIV_JS, DIV_KL, NORM_SIGMOID, NORM_SOFTMAX
from q2ext.reference import ada_loss as ref
from q2ext.nn import ADALoss
from q2ext.ops import ada_loss

from helpers import DEVICES

DIVS = {"js": DIV_JS, "kl": DIV_KL}
NORMS = {"sigmoid": NORM_SIGMOID, "softmax": NORM_SOFTMAX}
# (has quantized values, step kind): Delta from a 0.25 grid; step per channel, scalar, or sigma.
QSTEPS = [(False, None), (True, "C"), (True, "1"), (True, None)]
EPS = {torch.float32: 2 ** -23, torch.float64: 2 ** -52, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def make_inputs(shape, dtype=torch.float32, device="cpu", q=True, step="C", seed=0):
    """A student, a correlated teacher, both through a 0.25-step grid, and the step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    t = 0.8 * x + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64) + 0.1
    x, t = x.to(dtype), t.to(dtype)
    xq = tq = None
    if q:
        xq = (torch.round(x.double() / 0.25) * 0.25).to(dtype)
        tq = (torch.round(t.double() / 0.25) * 0.25).to(dtype)
    c = shape[1]
    s = {None: None, "1": torch.tensor([0.25]), "C": 0.1 + torch.rand(c, generator=g)}[step]
    dev = lambda v: None if v is None else v.to(device)  # noqa: E731
    return dev(x), dev(t), dev(xq), dev(tq), dev(s)


def f64(v):
    return None if v is None else v.detach().to(torch.float64)


def assert_within_oracle(kernel, at_dtype, oracle, what, ulps=4, scale=None):
    """Error of `kernel` <= 2 x the error of the reference at that precision + `ulps` ulps
    (fp32) of `scale` (default: the largest magnitude of the oracle)."""
    kernel, at_dtype, oracle = kernel.double().cpu(), at_dtype.double().cpu(), oracle.double().cpu()
    assert torch.isfinite(kernel).all() == torch.isfinite(oracle).all(), what
    err_k = (kernel - oracle).abs().max().item()
    err_r = (at_dtype - oracle).abs().max().item()
    floor = ulps * EPS[torch.float32] * (oracle.abs().max().item() if scale is None else scale)
    assert err_k <= 2 * err_r + floor, f"{what}: kernel error {err_k:.3e} > 2 x reference error {err_r:.3e} + {floor:.1e}"


def loss_rounding_scale(x, t, xq, tq, s, args):
    """How much the loss moves when P and R (float64 [N, C, L]) are perturbed by relative
    rounding errors: sum |dD/d log w| over the spatial weights.  The loss of two nearly equal
    distributions cancels heavily (KL to second order), so one ulp in every P and R, which
    any fp32 implementation incurs, shows in it as this many ulps of absolute error, far
    more than the loss's own magnitude suggests."""
    gamma, kappa, div, norm, temp = args
    dists = []
    for a, aq in ((x, xq), (t, tq)):
        rows = lambda v: None if v is None else v.reshape(v.shape[0], v.shape[1], -1)  # noqa: E731
        score, _, _ = ref._scores(rows(a), rows(aq), s, gamma, kappa)
        w, _ = ref._weights(score, norm, temp)
        dists.append(w / w.sum(-1, keepdim=True))
    lp, lr = (d.clamp_min(1e-300).log().requires_grad_() for d in dists)
    d = ref._divergence(torch.softmax(lp, -1), torch.softmax(lr, -1), div)[0].mean()
    gp, gr = torch.autograd.grad(d, (lp, lr))
    return (gp.nan_to_num().abs().sum() + gr.nan_to_num().abs().sum()).item()


def ref_grad(x, t, xq, tq, s, args, dtype=None):
    """Reference loss and d loss/d x via autograd (at the given compute dtype)."""
    cast = (lambda v: v) if dtype is None else (lambda v: None if v is None else v.to(dtype))
    xr = cast(x.detach()).requires_grad_()
    loss = ref.ada_loss(xr, cast(t), cast(xq), cast(tq), s, *args)[0]
    (g,) = torch.autograd.grad(loss * 1.5, xr)
    return loss.detach(), g


# ---------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("div,norm", list(itertools.product(DIVS, NORMS)))
@pytest.mark.parametrize("q,step", QSTEPS)
def test_reference_backward_is_autograd_of_reference(div, norm, q, step):
    x, t, xq, tq, s = make_inputs((2, 3, 5, 7), torch.float64, q=q, step=step)
    args = (1.0, 1e-6, DIVS[div], NORMS[norm], 0.7)
    loss, g = ref_grad(x, t, xq, tq, s, args)
    _, p, stats = ref.ada_loss(x, t, xq, tq, s, *args)
    dx = ref.ada_loss_backward(torch.tensor(1.5, dtype=torch.float64), x, xq, s, p, stats, *args)
    torch.testing.assert_close(dx, g, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("div,norm,q,step", [("js", "sigmoid", True, None), ("kl", "softmax", True, "C"),
                                             ("js", "softmax", False, None)])
def test_reference_gradcheck(div, norm, q, step):
    x, t, xq, tq, s = make_inputs((2, 3, 4, 5), torch.float64, q=q, step=step, seed=1)
    args = (0.5, 1e-6, DIVS[div], NORMS[norm], 0.9)
    d = None if xq is None else x - xq

    def f(xx):  # student_q = xx - d keeps Delta = |d| fixed under perturbation of xx
        return ref.ada_loss(xx, t, None if d is None else xx - d, tq, s, *args)[0]

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


# ---------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("div,norm,q,step", [("js", "sigmoid", True, None), ("kl", "softmax", True, "C"),
                                             ("js", "softmax", False, None), ("kl", "sigmoid", True, "1")])
def test_kernel_gradcheck_float64_cpu(div, norm, q, step):
    x, t, xq, tq, s = make_inputs((2, 3, 4, 5), torch.float64, q=q, step=step, seed=2)
    kw = dict(gamma=0.5, divergence=div, normalize=norm, temperature=0.9)
    d = None if xq is None else x - xq

    def f(xx):
        return ada_loss(xx, t, None if d is None else xx - d, tq, s, **kw)

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))


SHAPES = [(2, 3, 7, 9), (1, 1, 1, 1), (3, 2, 1, 97), (1, 5, 59), (2, 4, 33, 35), (1, 2, 1025)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("div,norm", list(itertools.product(DIVS, NORMS)))
@pytest.mark.parametrize("q,step", QSTEPS)
def test_forward_backward_match_reference(device, dtype, div, norm, q, step):
    shape = SHAPES[zlib.crc32(f"{dtype}{div}{norm}{q}{step}".encode()) % len(SHAPES)]  # spread shapes over cases
    for shp in {shape, (2, 3, 7, 9)}:
        x, t, xq, tq, s = make_inputs(shp, dtype, device, q=q, step=step, seed=3)
        args = (1.0, 1e-6, DIVS[div], NORMS[norm], 0.7)
        xr = x.detach().requires_grad_()
        loss, p, stats = torch.ops.q2ext.ada_loss(xr, t, xq, tq, s, *args)
        (dx,) = torch.autograd.grad(loss * 1.5, xr)
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        assert loss.dtype == p.dtype == stats.dtype == ct and dx.dtype == dtype
        assert p.shape == x.shape and stats.shape == (shp[0], shp[1], 5)
        cpu = [None if v is None else v.cpu() for v in (x, t, xq, tq, s)]
        oracle_loss, oracle_g = ref_grad(*map(f64, cpu[:4]), cpu[4], args)
        at_loss, at_g = ref_grad(*cpu, args, dtype=ct)
        if dtype in (torch.float16, torch.bfloat16):  # the reference returns dx in x's dtype
            at_g = at_g.to(dtype)
        _, oracle_p, oracle_stats = ref.ada_loss(*map(f64, cpu[:4]), cpu[4], *args)
        _, at_p, at_stats = ref.ada_loss(*[None if v is None else v.to(ct) for v in cpu[:4]], cpu[4], *args)
        what = f"{device} {dtype} {div} {norm} q={q} step={step} {shp}"
        scale = abs(oracle_loss.item()) + loss_rounding_scale(*map(f64, cpu[:4]), cpu[4], args)
        assert_within_oracle(loss, at_loss, oracle_loss, "loss " + what, scale=scale)
        assert_within_oracle(p, at_p, oracle_p, "P " + what)
        assert_within_oracle(stats, at_stats, oracle_stats, "row stats " + what)
        assert_within_oracle(dx, at_g, oracle_g, "dx " + what,
                             ulps=4 if dtype in (torch.float32, torch.float64) else EPS[dtype] / EPS[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_strides(device):
    x, t, xq, tq, s = make_inputs((2, 6, 5, 7), device=device, seed=4)
    base = ada_loss(x.clone().requires_grad_(), t, xq, tq, s)
    views = {
        "channels_last": lambda v: v.contiguous(memory_format=torch.channels_last),
        "transposed": lambda v: v.transpose(2, 3).contiguous().transpose(2, 3),
    }
    xr = x.clone().requires_grad_()
    (g0,) = torch.autograd.grad(ada_loss(xr, t, xq, tq, s), xr)
    for name, f in views.items():
        xv = f(x).requires_grad_()
        loss = ada_loss(xv, f(t), f(xq), f(tq), s)
        (g,) = torch.autograd.grad(loss, xv)
        torch.testing.assert_close(loss, base, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(g, g0, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", NORMS)
def test_constant_channel_and_underflow(device, norm):
    """sigma = 0 rows: finite, sub-gradient 0 through sigma; tiny temperatures underflow P/R."""
    x, t, xq, tq, s = make_inputs((2, 3, 6, 6), device=device, seed=5)
    x[0, 1] = 0.75
    t[1, 2] = -0.5
    temp = 0.02 if norm == "softmax" else 1.0
    xr = x.clone().requires_grad_()
    loss = ada_loss(xr, t, xq, tq, None, normalize=norm, temperature=temp)
    (g,) = torch.autograd.grad(loss * 1.5, xr)  # ref_grad's factor
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    args = (1.0, 1e-6, DIV_JS, NORMS[norm], temp)
    cpu = [v.cpu() for v in (x, t, xq, tq)]
    o_loss, o_g = ref_grad(*map(f64, cpu), None, args)
    # At fp32 the reference's autograd divides by squares of underflowed sums (NaN); its
    # analytic backward (the fallback kernel) is the reference at this precision.
    r_loss, r_p, r_stats = ref.ada_loss(*cpu, None, *args)
    r_g = ref.ada_loss_backward(torch.tensor(1.5), cpu[0], cpu[2], None, r_p, r_stats, *args)
    if norm == "softmax":
        p = ref.ada_loss(*map(f64, cpu), None, *args)[1]
        assert (p == 0).any()  # the case this test is about: underflowed probabilities
    scale = abs(o_loss.item()) + loss_rounding_scale(*map(f64, cpu), None, args)
    assert_within_oracle(loss, r_loss, o_loss, "loss", scale=scale)
    assert_within_oracle(g, r_g, o_g, "dx")


def test_deterministic_across_thread_counts():
    x, t, xq, tq, s = make_inputs((2, 16, 12, 12), seed=6)
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_()
            loss = ada_loss(xr, t, xq, tq, s)
            out.append((loss, torch.autograd.grad(loss, xr)[0]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@pytest.mark.skipif(not q2ext.has_compiled(), reason="no compiled CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_isa_paths_identical(dtype):
    """AVX-512, AVX2 and baseline loops give the same bits (no FMA contraction, fixed lanes)."""
    order = ["scalar", "avx2", "avx512"]
    paths = order[: order.index(q2ext._ext._C.best_cpu_isa()) + 1]
    x, t, xq, tq, s = make_inputs((2, 5, 13, 11), dtype, seed=10)
    results = []
    try:
        for isa in paths:
            q2ext.set_cpu_isa(isa)
            for norm in NORMS:
                xr = x.clone().requires_grad_()
                loss = ada_loss(xr, t, xq, tq, None, normalize=norm)
                results.append((isa, norm, loss, torch.autograd.grad(loss, xr)[0]))
    finally:
        q2ext.set_cpu_isa("auto")
    for isa, norm, loss, g in results:
        ref_loss, ref_g = next((r[2], r[3]) for r in results if r[1] == norm)
        assert torch.equal(loss, ref_loss) and torch.equal(g, ref_g), (isa, norm)


# ---------------------------------------------------------------- op registration
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("q,step", [(True, "C"), (False, None), (True, None)])
def test_opcheck_cpu(dtype, q, step):
    x, t, xq, tq, s = make_inputs((2, 3, 4, 5), dtype, q=q, step=step, seed=7)
    args = (1.0, 1e-6, DIV_JS, NORM_SIGMOID, 1.0)
    torch.library.opcheck(torch.ops.q2ext.ada_loss.default, (x.requires_grad_(), t, xq, tq, s, *args))
    loss, p, stats = torch.ops.q2ext.ada_loss(x.detach(), t, xq, tq, s, *args)
    torch.library.opcheck(torch.ops.q2ext.ada_loss_backward.default,
                          (torch.ones((), dtype=loss.dtype), x.detach(), xq, s, p, stats, *args))


@pytest.mark.parametrize("div,norm", [("js", "sigmoid"), ("kl", "softmax")])
def test_compile_fullgraph_matches_eager(div, norm):
    x, t, xq, tq, s = make_inputs((2, 4, 6, 6), seed=8)
    mod = ADALoss(divergence=div, normalize=norm, temperature=0.5)
    compiled = torch.compile(mod, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le, lc = mod(xe, t, xq, tq, s), compiled(xc, t, xq, tq, s)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-12)


def test_reference_kernels_fallback_subprocess():
    """Without q2ext._C the reference is registered as the kernel (q2ext._ops.register_reference)."""
    code = textwrap.dedent("""
        import warnings, torch
        warnings.simplefilter("ignore")
        import q2ext
        from q2ext import _ops
        from q2ext.reference import ada_loss as ref
        _ops.register_reference("ada_loss", ref.ada_loss_op)  # idempotent: already registered
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        loss = q2ext.ops.ada_loss(x, t, normalize="softmax")
        g, = torch.autograd.grad(loss, x)
        xr = x.detach().requires_grad_()
        l2 = ref.ada_loss(xr, t, None, None, None, 1.0, 1e-6, 0, 1, 1.0)[0]
        g2, = torch.autograd.grad(l2, xr)
        torch.testing.assert_close(loss, l2)
        torch.testing.assert_close(g, g2)
        print("ok")
    """)
    env = dict(os.environ, Q2EXT_NO_EXTENSION="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------- bad input
def _good():
    x, t, xq, tq, s = make_inputs((2, 3, 4, 5), seed=9)
    return dict(student=x, teacher=t, student_q=xq, teacher_q=tq, step=s)


@pytest.mark.parametrize("change,exc,match", [
    (dict(teacher=torch.randn(2, 3, 4, 6)), ValueError, "teacher must have the student's shape"),
    (dict(teacher=torch.randn(2, 3, 4, 5, dtype=torch.float64)), TypeError, "teacher must have the student's dtype"),
    (dict(student=torch.ones(2, 3, 4, 5, dtype=torch.int32)), TypeError, "student must be float32"),
    (dict(student=torch.randn(2, 3), teacher=torch.randn(2, 3)), ValueError, "student must be"),
    (dict(student=torch.randn(2, 3, 0, 5), teacher=torch.randn(2, 3, 0, 5)), ValueError, "non-empty spatial"),
    (dict(teacher_q=None), ValueError, "student_q and teacher_q"),
    (dict(student_q=torch.randn(2, 3, 4, 4)), ValueError, "student_q must have the student's shape"),
    (dict(teacher_q=torch.randn(2, 3, 4, 5).half()), TypeError, "teacher_q must have the student's dtype"),
    (dict(step=torch.ones(2)), ValueError, r"step must have shape \[1\] or \[3\]"),
    (dict(step=torch.ones(3, dtype=torch.int64)), TypeError, "step must be float32 or float64"),
    (dict(step="0.25"), TypeError, "step must be None, a float or a tensor"),
])
def test_bad_input_functional(change, exc, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(exc, match=match):
        ada_loss(**kw)


@pytest.mark.parametrize("kw,match", [(dict(gamma=-1.0), "gamma"), (dict(kappa=0.0), "kappa"),
                                      (dict(temperature=0.0), "temperature"), (dict(divergence="l2"), "divergence"),
                                      (dict(normalize="max"), "normalize")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ADALoss(**kw)
    with pytest.raises(ValueError, match=match):
        ada_loss(**_good(), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(teacher=torch.randn(2, 3, 4, 6)), "teacher must have the student's shape"),
    (dict(teacher=torch.randn(2, 3, 4, 5).double()), "teacher must have the student's dtype"),
    (dict(student=torch.ones(2, 3, 4, 5, dtype=torch.int32)), "student must be float32"),
    (dict(teacher_q=None), "student_q and teacher_q"),
    (dict(step=torch.ones(2)), "step must have shape"),
    (dict(student=torch.randn(2, 3, 0, 5), teacher=torch.randn(2, 3, 0, 5), student_q=None, teacher_q=None),
     "spatial size must be > 0"),
])
@pytest.mark.parametrize("fake", [False, True])
def test_bad_input_direct_op(change, match, fake):
    """The C++ kernel and the fake kernel check the same things (direct torch.ops calls)."""
    kw = _good()
    kw.update(change)
    args = (kw["student"], kw["teacher"], kw["student_q"], kw["teacher_q"], kw["step"], 1.0, 1e-6, 0, 0, 1.0)
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with pytest.raises(RuntimeError, match=match):
                torch.ops.q2ext.ada_loss(*args)
    else:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.q2ext.ada_loss(*args)
