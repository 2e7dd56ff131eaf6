"""Q-GBFusion ops: kernels vs the pure-PyTorch reference, gradcheck, opcheck, errors.

Oracle: q2ext/reference/gb_fusion.py evaluated in float64 ("truth").  A kernel's error at a
dtype must stay within 2x the reference's own error at that dtype (plus a few ulps of the
result for fp32, whose reductions run in another order); float64 kernels must agree with
the float64 reference to 1e-12.  CUDA tests skip without a GPU.
"""
import pytest
import torch
from torch.library import opcheck

import q2ext
from q2ext._ops.gb_fusion import MODE_ADD, MODE_CONCAT
from q2ext.reference import gb_fusion as R
from q2ext.ops import gb_fusion

from helpers import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES = [  # (mode, branch shapes, affine): odd channel counts, pixel blocks with tails, 1x1, real layers
    (MODE_CONCAT, [(2, 3, 9, 11), (2, 59, 9, 11), (2, 1, 9, 11)], True),
    (MODE_ADD, [(2, 33, 9, 11)] * 3, True),
    (MODE_CONCAT, [(1, 97, 1, 1), (1, 5, 1, 1)], False),
    (MODE_ADD, [(3, 16, 5, 13)] * 2, False),
    (MODE_CONCAT, [(2, 3, 9, 11), (2, 59, 9, 11), (2, 1, 9, 11)], False),
    (MODE_CONCAT, [(2, 128, 16, 16), (2, 64, 16, 16)], False),  # U-Net skip merge
    (MODE_ADD, [(1, 256, 13, 19)] * 2, False),                  # FPN top-down add (P4 of a 200x304 input)
]


def _branches(shapes, dtype, device, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(s, generator=g, dtype=torch.float64) * (i + 1) + i).to(dtype) for i, s in enumerate(shapes)]
    xs = [x.to(device) for x in xs]
    return [x.contiguous(memory_format=torch.channels_last) for x in xs] if channels_last else xs


def _channels(mode, shapes):
    return sum(s[1] for s in shapes) if mode == MODE_CONCAT else shapes[0][1]


def _check(kernel, ref, truth, dtype, scale=None):
    """scale: magnitude of the summands behind `truth` (default: of truth itself)."""
    kernel, ref, truth = kernel.double().cpu(), ref.double().cpu(), truth.double().cpu()
    if dtype == torch.float64:
        torch.testing.assert_close(kernel, truth, rtol=1e-12, atol=1e-12)
        return
    err_k = (kernel - truth).abs().max().item()
    err_r = (ref - truth).abs().max().item()
    ulps = 8 * torch.finfo(torch.float32).eps * (truth.abs().max().item() if scale is None else scale)
    assert err_k <= 2 * err_r + ulps, f"kernel error {err_k:.3g} > 2 x reference error {err_r:.3g} + {ulps:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_backward_match_reference(device, dtype, channels_last, case):
    _match_reference(device, dtype, channels_last, *CASES[case])


# fp32 NCHW outputs of >= 4 MB are written with non-temporal stores on the AVX-512 path
# (full, 64-byte aligned row pieces only): FPN P3 (aligned, full blocks) and a concat
# whose rows are unaligned and end in a partial block.
LARGE_CASES = [
    (MODE_ADD, [(2, 256, 64, 64)] * 2, False),
    (MODE_CONCAT, [(1, 96, 91, 91), (1, 64, 91, 91)], False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(LARGE_CASES)))
def test_large_outputs_match_reference(device, case):
    _match_reference(device, torch.float32, False, *LARGE_CASES[case])


def _match_reference(device, dtype, channels_last, mode, shapes, affine):
    xs = _branches(shapes, dtype, device, channels_last)
    k, c = len(shapes), _channels(mode, shapes)
    g = torch.Generator().manual_seed(1)
    lam = torch.randn(k, generator=g).to(device)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.randn(c, generator=g, dtype=ct).to(device) if affine else None)
    b = (torch.randn(c, generator=g, dtype=ct).to(device) if affine else None)
    out, mean, rstd, alpha = torch.ops.q2ext.gb_fusion_forward(xs, lam, w, b, mode, 1e-6)
    ref = R.gb_fusion_forward([x.cpu() for x in xs], lam.cpu(), *(t.cpu() if t is not None else None for t in (w, b)),
                              mode, 1e-6)
    x64 = [x.cpu().double() for x in xs]
    w64, b64 = (w.cpu().double(), b.cpu().double()) if affine else (None, None)
    truth = R.gb_fusion_forward(x64, lam.cpu(), w64, b64, mode, 1e-6)
    assert torch.equal(alpha.cpu(), ref[3]), "alpha must be the same correctly rounded softmax everywhere"
    assert out.dtype == dtype and out.shape == ref[0].shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _check(out, ref[0], truth[0], dtype)
    _check(mean, ref[1], truth[1], ct, scale=max(x.abs().max().item() for x in x64))

    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    grads, dw, db, g_sq = torch.ops.q2ext.gb_fusion_backward(grad, xs, alpha, w, mean, rstd, mode)
    rgrads, rdw, rdb, rg_sq = R.gb_fusion_backward(grad.cpu(), [x.cpu() for x in xs], ref[3],
                                                   w.cpu() if affine else None, ref[1], ref[2], mode)
    tgrads, tdw, tdb, tg_sq = R.gb_fusion_backward(grad.cpu().double(), x64, ref[3], w64, truth[1], truth[2], mode)
    # The forward's output as a hint changes nothing (where it is used, it is exactly y).
    hinted = torch.ops.q2ext.gb_fusion_backward(grad, xs, alpha, w, mean, rstd, mode, out)
    assert all(torch.equal(a, b) for a, b in zip(hinted[0], grads))
    assert torch.equal(hinted[3], g_sq) and torch.equal(hinted[1], dw) and torch.equal(hinted[2], db)
    for gk, gr, gt, x in zip(grads, rgrads, tgrads, xs):
        assert gk.dtype == dtype and gk.shape == x.shape
        assert gk.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        _check(gk, gr, gt, dtype)
    # g_sq is the squared norm of the gradient the kernel computed (in float64 sums).
    torch.testing.assert_close(g_sq.cpu().double(), tg_sq.double(), rtol=2e-2 if dtype in (torch.float16,
                               torch.bfloat16) else 1e-5, atol=0)
    if affine:
        _check(dw, rdw, tdw, ct)
        _check(db, rdb, tdb, ct)
    else:
        assert dw.numel() == 0 and db.numel() == 0


def test_cpu_isa_paths_are_bit_identical():
    if not q2ext.has_compiled():
        pytest.skip("q2ext._C is not built")
    from q2ext._C import best_cpu_isa
    isas = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(best_cpu_isa()) + 1]
    results = []
    try:
        for isa in isas:
            q2ext.set_cpu_isa(isa)
            r = []
            for mode, shapes, _ in CASES[:2] + LARGE_CASES[:1]:
                for cl in (False, True):
                    xs = _branches(shapes, torch.float32, "cpu", cl)
                    lam = torch.linspace(-1, 1, len(shapes))
                    out = torch.ops.q2ext.gb_fusion_forward(xs, lam, None, None, mode, 1e-6)
                    bwd = torch.ops.q2ext.gb_fusion_backward(torch.cos(out[0]), xs, out[3], None, out[1], out[2], mode)
                    r += list(out[:3]) + list(bwd[0]) + [bwd[3]]
            results.append(r)
    finally:
        q2ext.set_cpu_isa("auto")
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", [MODE_CONCAT, MODE_ADD], ids=["concat", "add"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_kernel_float64(device, mode, channels_last):
    shapes = [(2, 3, 4, 5), (2, 4, 4, 5)] if mode == MODE_CONCAT else [(2, 4, 4, 5)] * 2
    xs = [x.requires_grad_() for x in _branches(shapes, torch.float64, device, channels_last)]
    c = _channels(mode, shapes)
    w = torch.randn(c, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, device=device, requires_grad=True)
    lam = torch.tensor([0.3, -0.2], device=device)
    ge = torch.zeros(2, device=device)
    mode_s = "concat" if mode == MODE_CONCAT else "add"

    def f(x0, x1, w, b):
        return gb_fusion([x0, x1], lam, ge, weight=w, bias=b, mode=mode_s, update=False)

    assert torch.autograd.gradcheck(f, (*xs, w, b))
    assert torch.autograd.gradcheck(lambda x0, x1: gb_fusion([x0, x1], lam, ge, mode=mode_s, update=False), xs)
    assert torch.count_nonzero(ge) == 0  # update=False leaves the controller alone


class _RefFn(torch.autograd.Function):
    """The reference forward/backward formulas wired as an autograd function."""

    @staticmethod
    def forward(ctx, lam, mode, *xs):
        out, mean, rstd, alpha = R.gb_fusion_forward(list(xs), lam, None, None, mode, 1e-6)
        ctx.save_for_backward(*xs, alpha, mean, rstd)
        ctx.mode = mode
        return out

    @staticmethod
    def backward(ctx, grad):
        *xs, alpha, mean, rstd = ctx.saved_tensors
        grads, *_ = R.gb_fusion_backward(grad, xs, alpha, None, mean, rstd, ctx.mode)
        return (None, None, *grads)


@pytest.mark.parametrize("mode", [MODE_CONCAT, MODE_ADD], ids=["concat", "add"])
def test_gradcheck_reference_float64(mode):
    shapes = [(2, 3, 3, 4), (2, 5, 3, 4), (2, 2, 3, 4)] if mode == MODE_CONCAT else [(2, 4, 3, 4)] * 3
    xs = [x.requires_grad_() for x in _branches(shapes, torch.float64, "cpu", False)]
    lam = torch.tensor([0.5, -0.3, 0.1])
    assert torch.autograd.gradcheck(lambda *x: _RefFn.apply(lam, mode, *x), xs)
    # and the reference equals plain autograd through the composite formula
    alpha = R.softmax_alpha(lam)
    comp = torch.autograd.grad(R.gb_fusion_composite(xs, alpha, None, None, mode, 1e-6).sin().sum(), xs)
    mine = torch.autograd.grad(_RefFn.apply(lam, mode, *xs).sin().sum(), xs)
    for a, b in zip(comp, mine):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_opcheck(device, channels_last, affine):
    xs = _branches([(2, 3, 4, 5), (2, 6, 4, 5)], torch.float32, device, channels_last)
    lam = torch.tensor([0.2, -0.1], device=device)
    w = torch.rand(9, device=device) + 0.5 if affine else None
    b = torch.rand(9, device=device) if affine else None
    opcheck(torch.ops.q2ext.gb_fusion_forward, (xs, lam, w, b, 0, 1e-6))
    out, mean, rstd, alpha = torch.ops.q2ext.gb_fusion_forward(xs, lam, w, b, 0, 1e-6)
    opcheck(torch.ops.q2ext.gb_fusion_backward, (torch.randn_like(out), xs, alpha, w, mean, rstd, 0))
    opcheck(torch.ops.q2ext.gb_fusion_backward, (torch.randn_like(out), xs, alpha, w, mean, rstd, 0, out))
    opcheck(torch.ops.q2ext.gb_fusion_update,
            (torch.zeros(2, device=device), torch.zeros(2, device=device), torch.rand(2, device=device), None,
             0.1, 0.05, 1e-6, 4.0))
    xr = [x.clone().requires_grad_() for x in xs]
    wr = w.clone().requires_grad_() if affine else None
    br = b.clone().requires_grad_() if affine else None
    opcheck(torch.ops.q2ext.gb_fusion, (xr, lam.clone(), torch.zeros(2, device=device), None, wr, br, 0, 1e-6, 0.1,
                                        0.05, 1e-6, 4.0, True, False))


@pytest.mark.parametrize("device", DEVICES)
def test_update_matches_reference(device):
    cases = [  # (lam, g_ema, g_sq, tau)
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 100.0, 4.0], None),        # first update: g_ema = G
        ([0.5, -0.2, 0.1], [2.0, 3.0, 0.5], [9.0, 1.0, 0.25], [0.3, 0.0, -0.3]),
        ([3.99, -3.99, 0.0], [1e-3, 1e3, 1.0], [1e-6, 1e6, 1.0], None),     # clamp at +-4
    ]
    for lam, ge, gs, tau in cases:
        t = [torch.tensor(v, device=device) if v is not None else None for v in (lam, ge, gs, tau)]
        want_lam, want_ge = R.gb_fusion_update_values(*[x.cpu() if x is not None else None for x in t],
                                                      0.1, 0.5, 1e-6, 4.0)
        torch.ops.q2ext.gb_fusion_update(t[0], t[1], t[2], t[3], 0.1, 0.5, 1e-6, 4.0)
        torch.testing.assert_close(t[0].cpu(), want_lam, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(t[1].cpu(), want_ge, rtol=1e-6, atol=0)
        assert t[0].abs().max() <= 4.0
    lam, ge = torch.tensor([0.1, 0.2], device=device), torch.tensor([1.0, 2.0], device=device)
    for bad in (float("inf"), float("nan")):  # AMP overflow step: nothing changes
        torch.ops.q2ext.gb_fusion_update(lam, ge, torch.tensor([1.0, bad], device=device), None, 0.1, 0.5, 1e-6, 4.0)
        assert lam.tolist() == pytest.approx([0.1, 0.2]) and ge.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_bad_inputs_name_the_argument(device, op):
    fwd = torch.ops.q2ext.gb_fusion_forward if op == "kernel" else None
    if fwd is None:
        from q2ext._ops.gb_fusion import forward_fake as fwd  # the checks every backend's fake runs
    x = torch.randn(2, 3, 4, 5, device=device)
    lam = torch.zeros(2, device=device)
    bad = [
        (([x, torch.randn(3, 3, 4, 5, device=device)], lam, None, None, 0, 1e-6), r"branches\[1\] has N=3"),
        (([x, torch.randn(2, 3, 5, 5, device=device)], lam, None, None, 0, 1e-6), r"branches\[1\] has H=5"),
        (([x, torch.randn(2, 3, 4, 6, device=device)], lam, None, None, 0, 1e-6), r"branches\[1\] has W=6"),
        (([x], lam[:1], None, None, 0, 1e-6), r"at least 2"),
        (([x, torch.randn(2, 4, 4, 5, device=device)], lam, None, None, 1, 1e-6), r"mode add needs equal channels"),
        (([x, x.double()], lam, None, None, 0, 1e-6), r"branches\[1\] is torch.float64|branches\[1\] is Double"),
        (([x.int(), x.int()], lam, None, None, 0, 1e-6), r"branches\[0\] must be float"),
        (([x, x], lam.double(), None, None, 0, 1e-6), r"lam must be"),
        (([x, x], torch.zeros(3, device=device), None, None, 0, 1e-6), r"lam must have shape \[2\]"),
        (([x, x], lam, torch.ones(5, device=device), torch.ones(5, device=device), 0, 1e-6), r"weight must have"),
        (([x, x], lam, None, None, 2, 1e-6), r"mode must be"),
        (([x, x[0]], lam, None, None, 0, 1e-6), r"branches\[1\] must be 4-D"),
        (([x] * 17, torch.zeros(17, device=device), None, None, 0, 1e-6), r"at most 16"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            fwd(*args)


def test_bad_update_inputs():
    lam, ge = torch.zeros(2), torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"g_sq must have shape \[2\]"):
        torch.ops.q2ext.gb_fusion_update(lam, ge, torch.zeros(3), None, 0.1, 0.05, 1e-6, 4.0)
    with pytest.raises(RuntimeError, match=r"tau must be"):
        torch.ops.q2ext.gb_fusion_update(lam, ge, torch.zeros(2), torch.zeros(2, dtype=torch.float64), 0.1, 0.05,
                                         1e-6, 4.0)
    with pytest.raises(RuntimeError, match=r"lam must be fp32"):
        torch.ops.q2ext.gb_fusion_update(lam.double(), ge, torch.zeros(2), None, 0.1, 0.05, 1e-6, 4.0)


def test_empty_batch():
    xs = [torch.randn(0, 3, 4, 5), torch.randn(0, 2, 4, 5)]
    out, mean, rstd, alpha = torch.ops.q2ext.gb_fusion_forward(xs, torch.zeros(2), None, None, 0, 1e-6)
    assert out.shape == (0, 5, 4, 5) and alpha.tolist() == [0.5, 0.5]
    grads, _, _, g_sq = torch.ops.q2ext.gb_fusion_backward(out, xs, alpha, None, mean, rstd, 0)
    assert [g.shape for g in grads] == [x.shape for x in xs] and g_sq.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["kernel", "fake"])
def test_bad_backward_inputs_name_the_argument(device, op):
    from q2ext._ops.gb_fusion import backward_fake
    bwd = torch.ops.q2ext.gb_fusion_backward if op == "kernel" else backward_fake
    xs = [torch.randn(2, 3, 4, 5, device=device) for _ in range(2)]
    out, mean, rstd, alpha = torch.ops.q2ext.gb_fusion_forward(xs, torch.zeros(2, device=device), None, None, 1,
                                                               1e-6)
    bad = [
        ((out[:, :2], xs, alpha, None, mean, rstd, 1), r"grad must be"),
        ((out, xs, alpha[:1], None, mean, rstd, 1), r"alpha must have shape \[2\]"),
        ((out, xs, alpha, None, mean[:1], rstd, 1), r"mean/rstd must be|mean must be"),
        ((out, xs, alpha, None, mean, rstd, 1, out[:, :2]), r"out must be the forward's output"),
        ((out, xs, alpha, None, mean, rstd, 1, out.double()), r"out must be the forward's output"),
    ]
    for args, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            bwd(*args)
