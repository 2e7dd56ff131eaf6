"""Q-ADA kernels on NaN inputs: the row maximum of the scores propagates NaN, as the
reference's amax does.

With softmax normalisation the forward saves max S per student row (row_stats[..., 3]).
A NaN quantized value makes one element's score NaN without touching the row's mean and
std; the reference's max is then NaN, and the kernels' maxima (the CPU row_max, the CUDA
per-thread loop and block_max) used to skip the NaN and save a finite value.  Every other
row must be unaffected.
"""
import pytest
import torch

from helpers import DEVICES
from q2ext._ops.ada_loss import DIV_JS as JS
from q2ext._ops.ada_loss import DIV_KL as KL
from q2ext._ops.ada_loss import NORM_SIGMOID as SIGMOID
from q2ext._ops.ada_loss import NORM_SOFTMAX as SOFTMAX
from q2ext.reference import ada_loss as R


def _inputs(dtype, device, nan_in_student=True):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    sq, tq = (s * 2).round() / 2, (t * 2).round() / 2
    if nan_in_student:
        sq[0, 1, 2, 3] = float("nan")  # one element of one student row
    tq[1, 2, 4, 0] = float("nan")      # one element of one teacher row
    return [x.to(dtype).to(device) for x in (s, t, sq, tq)]


def _assert_same_with_nan(got, want, rtol):
    got, want = got.cpu().double(), want.cpu().double()
    assert torch.equal(got.isnan(), want.isnan()), f"NaN positions differ:\n{got}\nvs\n{want}"
    ok = ~want.isnan()
    torch.testing.assert_close(got[ok], want[ok], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("div", [JS, KL], ids=["js", "kl"])
def test_softmax_row_max_propagates_nan(device, dtype, div):
    s, t, sq, tq = _inputs(dtype, device)
    args = (None, 1.0, 1e-6, div, SOFTMAX, 0.5)
    loss, p, stats = torch.ops.q2ext.ada_loss(s, t, sq, tq, *args)
    r_loss, r_p, r_stats = R.ada_loss_op(s.cpu(), t.cpu(), sq.cpu(), tq.cpu(), *args)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert stats[0, 1, 3].isnan() and r_stats[0, 1, 3].isnan(), "the NaN row's max score must be NaN"
    assert stats[..., 3].isnan().sum().item() == 1, "only that row's max score is NaN"
    _assert_same_with_nan(stats, r_stats, rtol)
    _assert_same_with_nan(p, r_p, rtol)
    assert loss.isnan() and r_loss.isnan()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_free_rows_match_reference_when_another_row_is_nan(device):
    """A NaN in the teacher only: the student's mean, std, weight sum and max score stay finite
    (the teacher's NaN reaches only P and, for JS, KL(R||M) of its row), as in the reference."""
    s, t, sq, tq = _inputs(torch.float32, device, nan_in_student=False)
    for norm in (SIGMOID, SOFTMAX):
        args = (None, 1.0, 1e-6, JS, norm, 1.0)
        _, p, stats = torch.ops.q2ext.ada_loss(s, t, sq, tq, *args)
        _, r_p, r_stats = R.ada_loss_op(s.cpu(), t.cpu(), sq.cpu(), tq.cpu(), *args)
        assert not stats[..., :4].isnan().any()
        _assert_same_with_nan(stats, r_stats, 1e-5)
        _assert_same_with_nan(p, r_p, 1e-5)
