"""Schemas, argument checks, fake kernels and autograd of the Q-ADA ops (the Q² paper, Sec. 3.3).

``ada_loss(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence,
normalize, temperature) -> (loss, teacher_dist, row_stats)``
    ``student``/``teacher``: fp32/fp16/bf16/fp64 ``[N, C, *spatial]``, same shape and
    dtype; ``student_q``/``teacher_q``: both ``None`` or both like ``student`` (the two
    features through the student's quantizer at the tap, giving Delta = |x - x_q|);
    ``step``: ``None`` (each row's own sigma) or fp32/fp64 ``[1]`` / ``[C]``;
    ``divergence`` DIV_JS | DIV_KL, ``normalize`` NORM_SIGMOID | NORM_SOFTMAX.
    Outputs are in the compute dtype (fp64 for fp64 inputs, else fp32, since the loss of
    two nearly flat distributions is far below bf16's resolution): the 0-dim loss, the
    teacher's distribution P (contiguous, shape of ``student``) and the student's row
    statistics ``[N, C, 5]``; the last two are what the backward needs and are not
    differentiable.
``ada_loss_backward(grad, student, student_q, step, teacher_dist, row_stats, ...) -> dx``
    ``grad``: 0-dim, compute dtype; ``dx`` contiguous, like ``student``.  Only the student
    feature gets a gradient (Delta, the step and the teacher are constants).
Semantics: q2ext/reference/ada_loss.py.  Kernels: csrc/cpu/ada_loss*, csrc/cuda/ada_loss*,
or the reference when q2ext._C is not built.
"""
from __future__ import annotations

import math

import torch

from . import LIB, compute_dtype, define

DIV_JS = 0
DIV_KL = 1
NORM_SIGMOID = 0
NORM_SOFTMAX = 1
ROW_STATS = 5  # mu, sigma, sum of weights, max score, KL(R||M)

_ADA_ARGS = "float gamma, float kappa, int divergence, int normalize, float temperature"
ADA_LOSS_SCHEMA = (
    f"(Tensor student, Tensor teacher, Tensor? student_q, Tensor? teacher_q, Tensor? step, {_ADA_ARGS})"
    " -> (Tensor, Tensor, Tensor)"
)
ADA_LOSS_BACKWARD_SCHEMA = (
    f"(Tensor grad, Tensor student, Tensor? student_q, Tensor? step, Tensor teacher_dist, Tensor row_stats, "
    f"{_ADA_ARGS}) -> Tensor"
)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_ada_args(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize,
                   temperature):
    """The checks every kernel relies on; messages name the argument."""
    torch._check(student.dtype in _FLOATS,
                 lambda: f"ada_loss: student must be float32, float16, bfloat16 or float64, got {student.dtype}")
    torch._check(student.dim() >= 3,
                 lambda: f"ada_loss: student must be [N, C, *spatial] with >= 1 spatial dim, got {list(student.shape)}")
    torch._check(math.prod(student.shape[2:]) > 0,
                 lambda: f"ada_loss: student's spatial size must be > 0, got shape {list(student.shape)}")
    for name, t in (("teacher", teacher), ("student_q", student_q), ("teacher_q", teacher_q)):
        if t is None:
            continue
        torch._check(t.dtype == student.dtype,
                     lambda: f"ada_loss: {name} must have the student's dtype {student.dtype}, got {t.dtype}")
        torch._check(t.shape == student.shape,
                     lambda: f"ada_loss: {name} must have the student's shape {list(student.shape)}, "
                             f"got {list(t.shape)}")
        torch._check(t.device == student.device,
                     lambda: f"ada_loss: {name} is on {t.device} but student is on {student.device}")
    torch._check((student_q is None) == (teacher_q is None),
                 lambda: "ada_loss: pass both student_q and teacher_q (the same quantizer) or neither")
    if step is not None:
        channels = student.shape[1]
        torch._check(step.dtype in (torch.float32, torch.float64),
                     lambda: f"ada_loss: step must be float32 or float64, got {step.dtype}")
        torch._check(step.dim() <= 1 and step.numel() in (1, channels),
                     lambda: f"ada_loss: step must have shape [1] or [{channels}], got {list(step.shape)}")
        torch._check(step.device == student.device,
                     lambda: f"ada_loss: step is on {step.device} but student is on {student.device}")
    torch._check(gamma >= 0, lambda: f"ada_loss: gamma must be >= 0, got {gamma}")
    torch._check(kappa > 0, lambda: f"ada_loss: kappa must be > 0, got {kappa}")
    torch._check(temperature > 0, lambda: f"ada_loss: temperature must be > 0, got {temperature}")
    torch._check(divergence in (DIV_JS, DIV_KL), lambda: f"ada_loss: unknown divergence code {divergence}")
    torch._check(normalize in (NORM_SIGMOID, NORM_SOFTMAX), lambda: f"ada_loss: unknown normalize code {normalize}")


def check_ada_backward_args(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa, divergence,
                            normalize, temperature):
    check_ada_args(student, student, student_q, student_q, step, gamma, kappa, divergence, normalize, temperature)
    ct = compute_dtype(student.dtype)
    torch._check(grad.dim() == 0 and grad.dtype == ct, lambda: f"ada_loss_backward: grad must be a 0-dim {ct} tensor")
    torch._check(teacher_dist.shape == student.shape and teacher_dist.dtype == ct,
                 lambda: f"ada_loss_backward: teacher_dist must be {ct} of shape {list(student.shape)}")
    torch._check(row_stats.shape == (student.shape[0], student.shape[1], ROW_STATS) and row_stats.dtype == ct,
                 lambda: f"ada_loss_backward: row_stats must be {ct} of shape "
                         f"{[student.shape[0], student.shape[1], ROW_STATS]}")


define("ada_loss" + ADA_LOSS_SCHEMA, check_ada_args)
define("ada_loss_backward" + ADA_LOSS_BACKWARD_SCHEMA, check_ada_backward_args)


def ada_loss_fake(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize, temperature):
    check_ada_args(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize, temperature)
    ct = compute_dtype(student.dtype)
    return (
        student.new_empty((), dtype=ct),
        student.new_empty(student.shape, dtype=ct),
        student.new_empty((student.shape[0], student.shape[1], ROW_STATS), dtype=ct),
    )


def ada_loss_backward_fake(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa, divergence,
                           normalize, temperature):
    check_ada_backward_args(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa, divergence,
                            normalize, temperature)
    return torch.empty_like(student, memory_format=torch.contiguous_format)


torch.library.register_fake("q2ext::ada_loss", ada_loss_fake, lib=LIB)
torch.library.register_fake("q2ext::ada_loss_backward", ada_loss_backward_fake, lib=LIB)


def _setup_context(ctx, inputs, output):
    student, _teacher, student_q, _teacher_q, step, *args = inputs
    _loss, teacher_dist, row_stats = output
    # The teacher's distribution is saved instead of the teacher and its quantized value:
    # one tensor instead of two, and the backward does not redo the teacher's statistics.
    ctx.save_for_backward(student, student_q, step, teacher_dist, row_stats)
    ctx.args = args
    ctx.mark_non_differentiable(teacher_dist, row_stats)
    # Otherwise autograd materialises zero gradients for P and the statistics: a full-size
    # tensor per backward, for nothing.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_dist, _grad_stats):
    student, student_q, step, teacher_dist, row_stats = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0] and grad_loss is not None:  # None: the loss was not used
        dx = torch.ops.q2ext.ada_loss_backward(grad_loss, student, student_q, step, teacher_dist, row_stats,
                                               *ctx.args)
    return (dx,) + (None,) * 9


torch.library.register_autograd("q2ext::ada_loss", _backward, setup_context=_setup_context, lib=LIB)
