"""Public functional API of the Q-ADA op family: attention-distribution alignment between a
quantized student and a frozen full-precision teacher (the Q² paper, Sec. 3.3).

:func:`ada_loss` is the functional form; ``q2ext.nn.ADALoss`` the module and
``q2ext.Q2Distiller`` the wiring to two models.  Numerics: q2ext/reference/ada_loss.py.  One
fused kernel per direction (C++ on CPU and CUDA), no host synchronisation, works under
``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import torch

from .. import backend
from .._ops.ada_loss import DIV_JS, DIV_KL, NORM_SIGMOID, NORM_SOFTMAX

__all__ = ["ada_loss"]

_DIVERGENCES = {"js": DIV_JS, "kl": DIV_KL}
_NORMALIZATIONS = {"sigmoid": NORM_SIGMOID, "softmax": NORM_SOFTMAX}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def ada_options(gamma, kappa, divergence, normalize, temperature, fn):
    """The op's (gamma, kappa, divergence code, normalize code, temperature); errors name `fn`'s argument."""
    if divergence not in _DIVERGENCES:
        raise ValueError(f"{fn}: divergence must be 'js' or 'kl', got {divergence!r}")
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"{fn}: normalize must be 'sigmoid' or 'softmax', got {normalize!r}")
    for name, v, ok, what in (("gamma", gamma, gamma >= 0, ">= 0"), ("kappa", kappa, kappa > 0, "> 0"),
                              ("temperature", temperature, temperature > 0, "> 0")):
        if not ok:
            raise ValueError(f"{fn}: {name} must be {what}, got {v}")
    return float(gamma), float(kappa), _DIVERGENCES[divergence], _NORMALIZATIONS[normalize], float(temperature)


def _check_feature(t, name, student, fn):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if student is None:
        if t.dim() < 3 or any(d == 0 for d in t.shape[2:]):
            raise ValueError(f"{fn}: {name} must be [N, C, *spatial] with >= 1 non-empty spatial dim, "
                             f"got {list(t.shape)}")
        return
    if t.dtype != student.dtype:
        raise TypeError(f"{fn}: {name} must have the student's dtype {student.dtype}, got {t.dtype}")
    if t.shape != student.shape:
        raise ValueError(f"{fn}: {name} must have the student's shape {list(student.shape)}, got {list(t.shape)}")
    if t.device != student.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but student is on {student.device}")


def _as_step(step, student, fn):
    if step is None:
        return None
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return torch.full((1,), float(step), dtype=torch.float32, device=student.device)
    if not isinstance(step, torch.Tensor):
        raise TypeError(f"{fn}: step must be None, a float or a tensor, got {type(step).__name__}")
    if step.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: step must be float32 or float64, got {step.dtype}")
    c = student.shape[1]
    if step.dim() > 1 or step.numel() not in (1, c):
        raise ValueError(f"{fn}: step must have shape [1] or [{c}] (per channel), got {list(step.shape)}")
    if step.device != student.device:
        raise ValueError(f"{fn}: step is on {step.device} but student is on {student.device}")
    return step.detach()


def ada_loss(student, teacher, student_q=None, teacher_q=None, step=None, *, gamma=1.0, kappa=1e-6,
             divergence="js", normalize="sigmoid", temperature=1.0):
    """Q-ADA loss between a student and a teacher feature map (Eq. 13-16).

    Per sample and channel, ``S = log(1 + z^2) + gamma log(1 + r^2)`` with
    ``z = |x - mu|/(sigma + kappa)`` (mu, sigma: spatial mean and population std) and
    ``r = |x - x_q|/(s + kappa)``; ``sigmoid(S)`` (or a spatial softmax of ``S/temperature``)
    normalised over space gives P (teacher) and R (student); the loss is the JS (or
    ``KL(P||R)``) divergence, averaged over batch and channels.

    Args:
        student: float32/float16/bfloat16/float64 ``[N, C, *spatial]`` (>= 1 spatial dim),
            any strides; the only input that receives a gradient.
        teacher: same shape and dtype; treated as a constant (detached).
        student_q, teacher_q: ``None`` (Delta = 0, only the z term) or both like ``student``:
            the student feature and the teacher feature through the student's quantizer at
            this point.  Delta = |x - x_q| is a constant of the backward.
        step: the quantizer step ``s``: ``None`` (each channel's own sigma), a float, or a
            float32/float64 tensor ``[1]`` or ``[C]``; a constant of the backward.
        gamma: weight of the quantization term (>= 0, default 1).
        kappa: stabiliser (> 0, default 1e-6).
        divergence: ``"js"`` (default) or ``"kl"`` (``KL(P||R)``).
        normalize: ``"sigmoid"`` (the paper) or ``"softmax"`` (with ``temperature`` > 0).
    Returns: 0-dim tensor, float64 for float64 inputs, else float32.
    """
    fn = "ada_loss"
    _check_feature(student, "student", None, fn)
    _check_feature(teacher, "teacher", student, fn)
    if (student_q is None) != (teacher_q is None):
        raise ValueError(f"{fn}: pass both student_q and teacher_q (the same quantizer) or neither")
    if student_q is not None:
        _check_feature(student_q, "student_q", student, fn)
        _check_feature(teacher_q, "teacher_q", student, fn)
        student_q, teacher_q = student_q.detach(), teacher_q.detach()
    codes = ada_options(gamma, kappa, divergence, normalize, temperature, fn)
    step = _as_step(step, student, fn)
    op = backend.op_for("ada_loss", student.device.type)
    return op(student, teacher.detach(), student_q, teacher_q, step, *codes)[0]
