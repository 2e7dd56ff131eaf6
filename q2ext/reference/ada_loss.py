"""Pure-PyTorch semantics of ``q2ext::ada_loss`` (Q-ADA, the Q² paper, Sec. 3.3).

Three roles: the test oracle, the composite baseline of the benchmark, and the CPU/CUDA
kernel when ``q2ext._C`` is not built.  Written for clarity, not speed.  float64 inputs
are computed in float64; fp32/fp16/bf16 inputs in fp32 (the kernels do the same), and the
outputs are in that compute dtype.

For every sample and channel (one "row" of ``L = H*W`` elements, student and teacher
alike)::

    mu, sigma = spatial mean and *population* std (unbiased=False) of the row
    z     = |x - mu| * 1/(sigma + kappa)
    Delta = |x - x_q|                       (0 when no quantized value is given)
    r     = Delta * 1/(s + kappa)           s = step[c], or this row's own sigma
    S     = log1p(z^2) + gamma * log1p(r^2)
    w     = sigmoid(S)                      (normalize="sigmoid", the paper)
          | exp((S - max S) / temperature)  (normalize="softmax")
    P = w_teacher / sum(w_teacher),  R = w_student / sum(w_student)
    D     = JS(P, R) = 1/2 KL(P||M) + 1/2 KL(R||M), M = (P + R)/2     (divergence="js")
          | KL(P||R)                                                     (divergence="kl")
    loss  = mean of D over batch and channels

``0 * log(0)`` counts as 0.  Gradient: only to the student feature ``x`` (through mu,
sigma, z and, when s = sigma, r); ``Delta`` is a constant (with an STE quantizer
d(x - Q(x))/dx is 0 inside the grid), and so are the step, the teacher and its
quantized value.  A channel with sigma = 0 has z = 0 and gets the sub-gradient 0 of
sigma (no NaN).

The op also returns what its backward needs, so nothing is recomputed on the teacher:
``teacher_dist`` P (compute dtype, shape of ``student``) and ``row_stats``
``[N, C, 5]`` = (mu, sigma, sum w, max S, KL(R||M)) of the student rows.
"""
from __future__ import annotations

import torch

from .._ops import compute_dtype
from .._ops.ada_loss import DIV_JS, DIV_KL, NORM_SIGMOID

__all__ = ["ada_loss", "ada_loss_backward", "ada_loss_op", "ada_loss_backward_op"]


def _rows(t, ct):
    """[N, C, *spatial] -> [N, C, L] in the compute dtype."""
    return t.to(ct).reshape(t.shape[0], t.shape[1], -1)


def _safe_sqrt(v):
    """sqrt with derivative 0 (not inf/NaN) at 0: sigma of a constant channel."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _step_view(step, ct, channels):
    """step [1] or [C] -> broadcastable [1, C or 1, 1]."""
    return step.to(ct).reshape(1, -1, 1).expand(1, channels, 1)


def _scores(x, xq, step, gamma, kappa):
    """S, mu, sigma of [N, C, L] rows; differentiable in x, Delta detached."""
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    sigma = _safe_sqrt((d * d).mean(-1, keepdim=True))
    z = d.abs() * (1.0 / (sigma + kappa))
    score = torch.log1p(z * z)
    if xq is not None:
        delta = (x - xq).abs().detach()
        s = sigma if step is None else _step_view(step, x.dtype, x.shape[1])
        r = delta * (1.0 / (s + kappa))
        score = score + gamma * torch.log1p(r * r)
    return score, mu, sigma


def _weights(score, normalize, temperature):
    """(w, max S); softmax subtracts the row max (a constant shift, no gradient)."""
    if normalize == NORM_SIGMOID:
        return torch.sigmoid(score), torch.zeros_like(score[..., :1])
    m = score.amax(-1, keepdim=True).detach()
    return torch.exp((score - m) * (1.0 / temperature)), m


def _log1p_pair(u, y, ok):
    """log(u) with u ~ 1 + y: log1p(y) near 1 (keeps the precision of a small difference of
    two nearly equal distributions), log(u) below 1/2 (where y has rounded towards -1);
    0 where not ok.  The inner ``where``s keep gradients finite on the unused branches."""
    far = u < 0.5
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    val = torch.where(far, torch.log(torch.where(ok & far, u, one)), torch.log1p(torch.where(ok & ~far, y, zero)))
    return torch.where(ok, val, zero)


def _log_ratio(num, other):
    """log(2 num / (num + other)) (log(num/M) of the JS divergence); 0 where num = 0."""
    ok = num > 0
    s = torch.where(ok, num + other, torch.ones_like(num))
    return _log1p_pair(2 * num / s, (num - other) / s, ok)


def _divergence(p, r, divergence):
    """(per-row divergence [N, C], per-row KL(R||M) [N, C, 1] (0 for KL))."""
    if divergence == DIV_KL:
        ok = p > 0
        # r = 0 < p gives u = y = inf, hence +inf: KL(P||R) is infinite there.
        term = p * _log1p_pair(p / r, (p - r) / r, ok)
        return term.sum(-1), torch.zeros_like(p[..., :1])
    tp = p * _log_ratio(p, r)
    tr = r * _log_ratio(r, p)
    return 0.5 * (tp + tr).sum(-1), tr.sum(-1, keepdim=True)


def ada_loss(student, teacher, student_q=None, teacher_q=None, step=None, gamma=1.0, kappa=1e-6,
             divergence=DIV_JS, normalize=NORM_SIGMOID, temperature=1.0):
    """Forward of ``q2ext::ada_loss``; differentiable in ``student`` (the composite baseline).

    Args:
        student: float32/float16/bfloat16/float64 ``[N, C, *spatial]`` (>= 1 spatial dim).
        teacher: same shape and dtype as ``student``; never receives a gradient.
        student_q, teacher_q: both ``None`` (Delta = 0) or both like ``student``: the student
            and the teacher feature through the student's quantizer at this tap.
        step: ``None`` (use each row's sigma) or float32/float64 ``[1]`` or ``[C]``.
        gamma (>= 0), kappa (> 0), temperature (> 0): floats; divergence, normalize: the
            ``DIV_*`` / ``NORM_*`` ints of q2ext._ops.ada_loss.
    Returns: (loss 0-dim, teacher_dist like ``student``, row_stats ``[N, C, 5]``), all in
    the compute dtype.
    """
    ct = compute_dtype(student.dtype)
    x = _rows(student, ct)
    score_s, mu, sigma = _scores(x, None if student_q is None else _rows(student_q, ct), step, gamma, kappa)
    with torch.no_grad():
        score_t, _, _ = _scores(_rows(teacher, ct), None if teacher_q is None else _rows(teacher_q, ct),
                                step, gamma, kappa)
        w_t, _ = _weights(score_t, normalize, temperature)
        p = w_t / w_t.sum(-1, keepdim=True)
    w_s, m = _weights(score_s, normalize, temperature)
    z_s = w_s.sum(-1, keepdim=True)
    r = w_s / z_s
    rows, kl_rm = _divergence(p, r, divergence)
    loss = rows.mean()
    stats = torch.cat([mu, sigma, z_s, m, kl_rm], dim=-1).detach()
    return loss, p.reshape(student.shape), stats


def ada_loss_backward(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa, divergence,
                      normalize, temperature):
    """Analytic d loss / d student (the fallback kernel of ``q2ext::ada_loss_backward``).

    With G = dL/dS per element, Gz = G dS/dz, Gr = G dS/dr, q = 1/(sigma + kappa)::

        dx_k = q * (sign(d_k) Gz_k - mean_j sign(d_j) Gz_j
                    - d_k / (L sigma) * sum_j (Gz_j z_j + [s = sigma] Gr_j r_j))

    and dL/dS = grad/(N C) * (dD/dw projected on the simplex) * dw/dS:
    KL: (R - P); JS: R (log(R/M) - KL(R||M)) / 2; times (1 - w) (sigmoid) or 1/T (softmax).
    Returns a tensor like ``student`` (its dtype).
    """
    ct = compute_dtype(student.dtype)
    n, c = student.shape[0], student.shape[1]
    x = _rows(student, ct)
    length = x.shape[-1]
    mu, sigma, z_s, m, kl_rm = (t.to(ct) for t in row_stats.unbind(-1))
    mu, sigma, z_s, m, kl_rm = (t.unsqueeze(-1) for t in (mu, sigma, z_s, m, kl_rm))
    p = _rows(teacher_dist, ct)
    d = x - mu
    q = 1.0 / (sigma + kappa)
    z = d.abs() * q
    score = torch.log1p(z * z)
    gr_r = torch.zeros_like(x)
    if student_q is not None:
        delta = (x - _rows(student_q, ct)).abs()
        s = sigma if step is None else _step_view(step, ct, c)
        rr = delta * (1.0 / (s + kappa))
        score = score + gamma * torch.log1p(rr * rr)
    if normalize == NORM_SIGMOID:
        w = torch.sigmoid(score)
        k = 1.0 - w
    else:
        w = torch.exp((score - m) * (1.0 / temperature))
        k = torch.full_like(w, 1.0 / temperature)
    r = w / z_s
    if divergence == DIV_KL:
        t = r - p
    else:
        t = torch.where(r > 0, r * 0.5 * (_log_ratio(r, p) - kl_rm), torch.zeros_like(r))
    g = grad.to(ct) / (n * c) * t * k
    gz = g * 2.0 * z / (1.0 + z * z)
    if student_q is not None and step is None:
        gr_r = g * 2.0 * gamma * rr * rr / (1.0 + rr * rr)
    sgz = torch.sign(d) * gz
    a1 = sgz.sum(-1, keepdim=True)
    a2 = (gz * z + gr_r).sum(-1, keepdim=True)
    coef = torch.where(sigma > 0, a2 / (length * torch.where(sigma > 0, sigma, torch.ones_like(sigma))),
                       torch.zeros_like(sigma))
    dx = q * (sgz - a1 / length - coef * d)
    return dx.reshape(student.shape).to(student.dtype)


def ada_loss_op(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize, temperature):
    """``q2ext::ada_loss`` with the op's output layouts (fallback kernel; the registration checks the arguments)."""
    loss, p, stats = ada_loss(student.detach(), teacher, student_q, teacher_q, step, gamma, kappa, divergence,
                              normalize, temperature)
    return loss.detach().clone(), p.contiguous().clone(), stats.contiguous().clone()


def ada_loss_backward_op(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa, divergence,
                         normalize, temperature):
    """``q2ext::ada_loss_backward`` (fallback kernel): a contiguous tensor like ``student``."""
    return ada_loss_backward(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa, divergence,
                             normalize, temperature).contiguous()


KERNELS = {"ada_loss": ada_loss_op, "ada_loss_backward": ada_loss_backward_op}
