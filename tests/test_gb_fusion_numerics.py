"""Q-GBFusion statistics where they are fragile: a channel that is an outlier for its pixel,
and NaN/inf inputs.

The CPU kernel computes mean and variance in two passes over a cached tile; the CUDA kernel
(one thread per pixel, its C values spread over C planes) makes one pass of sums shifted by
the pixel's first fused value.  Done in fp32, that pass cancels catastrophically when
channel 0 is an outlier (var = s2/C - m1^2 with both terms ~ outlier^2); the kernel now
accumulates the shifted sums in double (gb_moments_* in csrc/include/q2ext/gb_fusion_math.h,
whose C++ test is tests/cpp/test_gb_fusion_math.cpp).  Here:
  * the kernels (CPU; CUDA where present) on inputs with an outlier channel 0, against the
    float64 reference with test_gbfusion_ops' tolerance;
  * the one-pass arithmetic emulated in PyTorch, with fp32 and with double sums, on the same
    inputs and on the seeded inputs of test_gbfusion_ops: fp32 sums break the tolerance (so
    these inputs do catch that bug), double sums keep it;
  * NaN and inf semantics against the reference (a NaN variance gives a NaN rstd).
"""
import pytest
import torch

from helpers import DEVICES
from q2ext._ops.gb_fusion import MODE_ADD, MODE_CONCAT
from q2ext.reference import gb_fusion as R
EPS = 1e-6
F32_EPS = torch.finfo(torch.float32).eps


def _within_tolerance(kernel, ref, truth, scale=None):
    """test_gbfusion_ops' rule for fp32: error <= 2 x the reference's own error + 8 ulps of the scale."""
    kernel, ref, truth = kernel.double().cpu(), ref.double().cpu(), truth.double().cpu()
    err_k = (kernel - truth).abs().max().item()
    err_r = (ref - truth).abs().max().item()
    bound = 2 * err_r + 8 * F32_EPS * (truth.abs().max().item() if scale is None else scale)
    return err_k, bound


def _outlier_branches(mode, channels_last, device="cpu", outlier=3000.0):
    """Two fp32 branches whose fused channel 0 is `outlier` (+ noise) at every pixel."""
    g = torch.Generator().manual_seed(7)
    shapes = [(2, 96, 7, 9), (2, 32, 7, 9)] if mode == MODE_CONCAT else [(2, 64, 7, 9)] * 2
    xs = [torch.randn(s, generator=g) for s in shapes]
    xs[0][:, 0] += outlier
    xs = [x.to(device) for x in xs]
    return [x.contiguous(memory_format=torch.channels_last) for x in xs] if channels_last else xs


def _fused(xs, alpha, mode):
    """h (N, C, P) in fp32 as the kernels form it: alpha_i * x_i, summed in branch order (add)."""
    xs = [x.cpu().float().flatten(2) for x in xs]
    if mode == MODE_CONCAT:
        return torch.cat([a * x for a, x in zip(alpha.tolist(), xs)], 1)
    h = alpha[0].item() * xs[0]
    for a, x in zip(alpha[1:].tolist(), xs[1:]):
        h = h + a * x
    return h


def _one_pass(h, acc):
    """The CUDA forward's statistics: sums shifted by channel 0, in dtype `acc` (fp32: the old
    kernel, fp64: the fix), sequential over channels; then y = (h - mean) * rstd in fp32."""
    hc = h.to(acc)
    shift = hc[:, 0]
    s1 = torch.zeros_like(shift)
    s2 = torch.zeros_like(shift)
    for c in range(hc.shape[1]):
        d = hc[:, c] - shift
        s1 = s1 + d
        s2 = s2 + d * d
    inv_c = torch.tensor(1.0, dtype=acc) / hc.shape[1]
    m1 = s1 * inv_c
    var = s2 * inv_c - m1 * m1
    var = torch.where(var < 0, torch.zeros_like(var), var)  # NaN stays NaN
    mean = (shift + m1).float()
    rstd = (1 / torch.sqrt(var + EPS)).float()
    y = (h - mean[:, None]) * rstd[:, None]
    return y, mean, rstd


def _references(xs, lam, mode):
    ref = R.gb_fusion_forward([x.cpu() for x in xs], lam, None, None, mode, EPS)
    truth = R.gb_fusion_forward([x.cpu().double() for x in xs], lam, None, None, mode, EPS)
    return ref, truth


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", [MODE_CONCAT, MODE_ADD], ids=["concat", "add"])
def test_outlier_channel_zero_within_tolerance(device, channels_last, mode):
    xs = _outlier_branches(mode, channels_last, device)
    lam = torch.tensor([0.3, -0.2])
    out, mean, rstd, alpha = torch.ops.q2ext.gb_fusion_forward(xs, lam.to(device), None, None, mode, EPS)
    ref, truth = _references(xs, lam, mode)
    scale = max(x.abs().max().item() for x in xs)
    for got, r, t, s in ((out, ref[0], truth[0], None), (mean, ref[1], truth[1], scale), (rstd, ref[2], truth[2], None)):
        err, bound = _within_tolerance(got, r, t, s)
        assert err <= bound, f"error {err:.3g} > tolerance {bound:.3g}"
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(out.shape, generator=g).to(device)
    grads = torch.ops.q2ext.gb_fusion_backward(grad, xs, alpha, None, mean, rstd, mode)[0]
    rgrads = R.gb_fusion_backward(grad.cpu(), [x.cpu() for x in xs], ref[3], None, ref[1], ref[2], mode)[0]
    tgrads = R.gb_fusion_backward(grad.cpu().double(), [x.cpu().double() for x in xs], ref[3], None, truth[1],
                                  truth[2], mode)[0]
    for gk, gr, gt in zip(grads, rgrads, tgrads):
        err, bound = _within_tolerance(gk, gr, gt)
        assert err <= bound, f"dx error {err:.3g} > tolerance {bound:.3g}"


def _seeded_cases():
    """The fp32 inputs of test_gbfusion_ops where the issue measured the old kernel's failures."""
    def branches(shapes):
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(s, generator=g, dtype=torch.float64) * (i + 1) + i).float() for i, s in enumerate(shapes)]

    lam = torch.randn(2, generator=torch.Generator().manual_seed(1))
    return [(MODE_CONCAT, branches([(2, 128, 16, 16), (2, 64, 16, 16)]), lam),
            (MODE_ADD, branches([(1, 256, 13, 19)] * 2), lam),
            (MODE_CONCAT, _outlier_branches(MODE_CONCAT, False), torch.tensor([0.3, -0.2])),
            (MODE_ADD, _outlier_branches(MODE_ADD, False), torch.tensor([0.3, -0.2]))]


@pytest.mark.parametrize("case", range(4), ids=["concat128+64", "add256", "outlier-concat", "outlier-add"])
def test_one_pass_statistics_need_double_sums(case):
    mode, xs, lam = _seeded_cases()[case]
    ref, truth = _references(xs, lam, mode)
    h = _fused(xs, ref[3], mode)
    t = truth[0].flatten(2)
    y64, mean64, rstd64 = _one_pass(h, torch.float64)
    err, bound = _within_tolerance(y64, ref[0].flatten(2), t)
    assert err <= bound, f"double sums: error {err:.3g} > tolerance {bound:.3g}"
    err, bound = _within_tolerance(rstd64, ref[2].flatten(1), truth[2].flatten(1))
    assert err <= bound, f"double sums: rstd error {err:.3g} > tolerance {bound:.3g}"
    # The old kernel's fp32 sums break the tolerance on every one of these inputs (1.7x and
    # 5.7x on test_gbfusion_ops' seeded cases, 20-50x with the strong outlier).
    y32 = _one_pass(h, torch.float32)[0]
    err32, bound = _within_tolerance(y32, ref[0].flatten(2), t)
    assert err32 > (10 if case >= 2 else 1) * bound, f"fp32 sums: {err32:.3g} vs tolerance {bound:.3g}"


def _nan_inf_branches(device, channels_last):
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g)]
    xs[1][0, 2, 1, 2] = float("nan")
    xs[0][1, 4, 3, 0] = float("inf")
    xs[0][1, 0, 0, 5] = float("-inf")
    xs = [x.to(device) for x in xs]
    return [x.contiguous(memory_format=torch.channels_last) for x in xs] if channels_last else xs


def _same_nan(a, b):
    a, b = a.cpu().double(), b.cpu().double()
    assert torch.equal(a.isnan(), b.isnan()), "NaN positions differ from the reference"
    finite = ~a.isnan()
    torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_nan_and_inf_follow_the_reference(device, channels_last):
    """A NaN or an infinity makes its pixel's variance NaN: rstd, out and dx are NaN there
    (not 1/sqrt(eps)), every other pixel is untouched."""
    xs = _nan_inf_branches(device, channels_last)
    lam = torch.tensor([0.1, 0.4])
    out, mean, rstd, alpha = torch.ops.q2ext.gb_fusion_forward(xs, lam.to(device), None, None, MODE_CONCAT, EPS)
    ref = R.gb_fusion_forward([x.cpu() for x in xs], lam, None, None, MODE_CONCAT, EPS)
    assert rstd.isnan().sum().item() == 3 and ref[2].isnan().sum().item() == 3
    for got, want in zip((out, mean, rstd), ref[:3]):
        _same_nan(got, want)
    grad = torch.ones(out.shape).to(device)
    grads = torch.ops.q2ext.gb_fusion_backward(grad, xs, alpha, None, mean, rstd, MODE_CONCAT)[0]
    rgrads = R.gb_fusion_backward(grad.cpu(), [x.cpu() for x in xs], ref[3], None, ref[1], ref[2], MODE_CONCAT)[0]
    for gk, gr in zip(grads, rgrads):
        _same_nan(gk, gr)
