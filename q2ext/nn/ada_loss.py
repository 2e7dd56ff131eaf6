"""Q-ADA modules: :class:`ADALoss` (the loss of one feature pair) and :class:`Q2Distiller`
(the loss wired to a quantized student and its frozen full-precision teacher; the Q² paper,
Sec. 3.3).  Functional form and numerics: :func:`q2ext.ops.ada_loss`.

Typical training step::

    distiller = q2ext.Q2Distiller(student, teacher)          # taps: the GBFusion outputs
    out = student(images)                                    # hooks keep the tap features
    loss = task_loss(out, targets) + distiller(images)       # runs the teacher, returns the term
    loss.backward()

The returned term is ``weight * sum over taps of ADA(student tap, teacher tap)`` (mean over
batch and channels within a tap, sum over taps; paper weight 0.01).  Only the student
receives gradients.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ops._ada_loss import ada_loss, ada_options
from .gb_fusion import GBFusion

__all__ = ["ADALoss", "Q2Distiller"]


class ADALoss(nn.Module):
    """Module form of :func:`ada_loss` (no parameters, no state).

    ``forward(student, teacher, student_q=None, teacher_q=None, step=None) -> loss``
    with the shapes and dtypes of :func:`ada_loss`; returns a 0-dim float32 (float64)
    tensor.  Defaults follow the paper: gamma 1, kappa 1e-6, JS, sigmoid.
    """

    def __init__(self, gamma: float = 1.0, kappa: float = 1e-6, divergence: str = "js",
                 normalize: str = "sigmoid", temperature: float = 1.0):
        super().__init__()
        ada_options(gamma, kappa, divergence, normalize, temperature, "ADALoss")  # fail at construction
        self.gamma, self.kappa, self.temperature = float(gamma), float(kappa), float(temperature)
        self.divergence, self.normalize = divergence, normalize

    def forward(self, student, teacher, student_q=None, teacher_q=None, step=None):
        return ada_loss(student, teacher, student_q, teacher_q, step, gamma=self.gamma, kappa=self.kappa,
                        divergence=self.divergence, normalize=self.normalize, temperature=self.temperature)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, kappa={self.kappa}, divergence={self.divergence!r}, "
                f"normalize={self.normalize!r}, temperature={self.temperature}")


def _is_gbfusion(module: nn.Module) -> bool:
    return isinstance(module, GBFusion)


def _resolve(model: nn.Module, names, what: str) -> dict:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"Q2Distiller: {what} has no module named {missing} (taps must be module names "
                         f"as in {what}.named_modules())")
    return {n: modules[n] for n in names}


def _split_quantized(out, name):
    """A quantizer's result: x_q, or (x_q, step)."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"Q2Distiller: the quantizer of tap {name!r} must return x_q or (x_q, step)")
        return out[0], out[1]
    return out, None


class Q2Distiller(nn.Module):
    """Q-ADA between the tap features of a quantized student and a full-precision teacher.

    Args:
        student: the model being trained (quantized, e.g. by :func:`q2ext.prepare`).
        teacher: its frozen full-precision copy.  Put in eval mode with
            ``requires_grad=False`` here, kept in eval mode at every call, and always run
            under ``torch.no_grad()``: it never updates.  Not registered as a submodule
            (neither is the student), so the distiller owns no parameters or state.
        taps: ``"gbfusion"`` (every :class:`q2ext.nn.GBFusion` of the student, the paper's
            default: neck/decoder features) or a list of module names of the student.  The
            teacher is tapped at the same names unless ``teacher_taps`` lists its own.
            Each tap's output must be a float tensor ``[N, C, *spatial]`` and the module must
            run once per forward.
        weight: multiplies the sum over taps (default 0.01, the paper's).
        quantizers: where Delta = |x - Q(x)| of Eq. 13 comes from; the same quantizer (same
            step) is applied to the student and to the teacher feature, under no_grad.
            ``"auto"`` (default): the ``input_quantizer`` of the layer that consumes the tap
            output directly (found during the first student forward; q2ext quantized layers
            have one); its ``step_size()`` gives the step.  ``None``: no quantizer, Delta = 0
            (only the z term of Eq. 15).  A callable, or a dict from tap name to callable:
            ``q(x) -> x_q`` or ``-> (x_q, step)``; ``q.step_size()`` is used when present,
            else each channel's sigma.  A quantizer that is not yet initialised
            (``is_initialized`` False) is skipped for that step, so the teacher's features
            never enter its initialisation statistics.
        teacher_taps: ``None`` or a list of teacher module names, one per student tap.
        gamma, kappa, divergence, normalize, temperature: :class:`q2ext.nn.ADALoss` options.

    Call ``distiller(*inputs, **kwargs)`` after the student's forward: it runs the teacher
    on the inputs and returns the loss term (0-dim float32, float64 for float64 features).
    ``distiller.loss()`` does the same from a teacher forward the caller ran.  Features are
    released after each call.  ``remove()`` (or leaving a ``with`` block) removes the hooks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, taps="gbfusion", weight: float = 0.01, *,
                 quantizers="auto", teacher_taps=None, gamma: float = 1.0, kappa: float = 1e-6,
                 divergence: str = "js", normalize: str = "sigmoid", temperature: float = 1.0):
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("Q2Distiller: student and teacher must be nn.Module instances")
        if student is teacher:
            raise ValueError("Q2Distiller: teacher must be a separate (full-precision) copy of the student")
        self.ada = ADALoss(gamma, kappa, divergence, normalize, temperature)
        self.weight = float(weight)
        # Plain references, not submodules: the distiller must not own (or move, or save)
        # either model.
        object.__setattr__(self, "student", student)
        object.__setattr__(self, "teacher", teacher)
        self._freeze_teacher()

        if isinstance(taps, str):
            if taps != "gbfusion":
                raise ValueError(f"Q2Distiller: taps must be 'gbfusion' or a list of module names, got {taps!r}")
            names = [n for n, m in student.named_modules() if _is_gbfusion(m)]
            if not names:
                raise ValueError("Q2Distiller: taps='gbfusion' but the student has no GBFusion module; "
                                 "pass taps=[module names]")
        else:
            names = list(taps)
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"Q2Distiller: taps must be a non-empty list of module names, got {taps!r}")
        t_names = names if teacher_taps is None else list(teacher_taps)
        if len(t_names) != len(names):
            raise ValueError(f"Q2Distiller: teacher_taps has {len(t_names)} names for {len(names)} student taps")
        self.taps = names
        self._teacher_name = dict(zip(names, t_names))
        s_mods = _resolve(student, names, "student")
        t_mods = _resolve(teacher, t_names, "teacher")

        self._quantizer = {}  # tap -> callable or None (Delta = 0)
        self._pending = set()  # taps whose quantizer "auto" still has to find
        if quantizers == "auto":
            self._pending = set(names)
        elif quantizers is None or callable(quantizers):
            self._quantizer = {n: quantizers for n in names}
        elif isinstance(quantizers, dict):
            unknown = set(quantizers) - set(names)
            if unknown:
                raise ValueError(f"Q2Distiller: quantizers names {sorted(unknown)} that are not taps")
            self._quantizer = {n: quantizers.get(n) for n in names}
        else:
            raise TypeError("Q2Distiller: quantizers must be 'auto', None, a callable or a dict of callables")

        self._student_feats, self._teacher_feats, self._calls = {}, {}, {}
        # Tap calls are counted per student forward (a tap module running twice in one
        # forward is ambiguous); the root's pre-hook starts each count afresh.
        self._handles = [student.register_forward_pre_hook(lambda module, args: self._calls.clear())]
        for n in names:
            self._handles.append(s_mods[n].register_forward_hook(self._make_hook(n, self._student_feats, True)))
            self._handles.append(t_mods[self._teacher_name[n]].register_forward_hook(
                self._make_hook(n, self._teacher_feats, False)))
        self._discovery = []
        if self._pending:
            for m in student.modules():
                if isinstance(getattr(m, "input_quantizer", None), nn.Module):
                    self._discovery.append(m.register_forward_pre_hook(self._discover))

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, name, store, is_student):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 3:
                raise TypeError(f"Q2Distiller: tap {name!r} must output a float tensor [N, C, *spatial], got "
                                f"{type(output).__name__}"
                                + (f" of shape {list(output.shape)}" if isinstance(output, torch.Tensor) else ""))
            if is_student:
                self._calls[name] = self._calls.get(name, 0) + 1
            store[name] = output
        return hook

    def _discover(self, module, args):
        if not args:
            return
        for name in list(self._pending):
            if args[0] is self._student_feats.get(name):
                self._quantizer[name] = module.input_quantizer
                self._pending.discard(name)

    def _finish_discovery(self):
        """After the first student forward: taps without a consumer quantizer get Delta = 0."""
        for h in self._discovery:
            h.remove()
        self._discovery = []
        if self._pending:
            warnings.warn(f"Q2Distiller: no quantized layer consumes the output of taps {sorted(self._pending)} "
                          "directly; Q-ADA uses Delta = 0 there (pass quantizers= to set one)", stacklevel=3)
            for n in self._pending:
                self._quantizer[n] = None
            self._pending = set()

    def _freeze_teacher(self):
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_teacher()  # whatever the caller toggles, the teacher stays in eval mode
        return self

    def remove(self) -> None:
        """Remove every hook from both models."""
        for h in self._handles + self._discovery:
            h.remove()
        self._handles, self._discovery = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    # ------------------------------------------------------------------ loss
    def _quantized(self, name, xs, xt):
        q = self._quantizer.get(name)
        if q is None or not getattr(q, "is_initialized", True):
            return None, None, None
        with torch.no_grad():
            xs_q, step = _split_quantized(q(xs.detach()), name)
            xt_q, _ = _split_quantized(q(xt), name)
            if step is None and callable(getattr(q, "step_size", None)):
                step = q.step_size()
        return xs_q, xt_q, step

    def loss(self) -> torch.Tensor:
        """The weighted Q-ADA term from the latest student and teacher forwards."""
        missing = [n for n in self.taps if n not in self._student_feats]
        if missing:
            raise RuntimeError(f"Q2Distiller: no student feature for taps {missing}: run the student forward "
                               "before calling the distiller")
        missing = [n for n in self.taps if n not in self._teacher_feats]
        if missing:
            raise RuntimeError(f"Q2Distiller: no teacher feature for taps {missing}: call distiller(*inputs) "
                               "(it runs the teacher) or run the teacher forward first")
        repeated = [n for n in self.taps if self._calls.get(n, 0) > 1]
        if repeated:
            self._release()
            raise RuntimeError(f"Q2Distiller: taps {repeated} ran more than once in one student forward; "
                               "tap modules that run once")
        if self._discovery or self._pending:
            self._finish_discovery()
        total = None
        for name in self.taps:
            xs, xt = self._student_feats[name], self._teacher_feats[name]
            if xt.shape != xs.shape:
                self._release()
                raise ValueError(f"Q2Distiller: tap {name!r}: teacher feature {list(xt.shape)} does not match "
                                 f"the student's {list(xs.shape)}")
            xt = xt.detach().to(xs.dtype)  # e.g. a bf16 autocast student and an fp32 teacher
            xs_q, xt_q, step = self._quantized(name, xs, xt)
            term = self.ada(xs, xt, xs_q, xt_q, step)
            total = term if total is None else total + term
        self._release()
        return self.weight * total

    def _release(self):
        for d in (self._student_feats, self._teacher_feats, self._calls):  # in place: the hooks hold them
            d.clear()

    def forward(self, *inputs, **kwargs) -> torch.Tensor:
        """Run the frozen teacher on ``inputs`` (no_grad, eval) and return :meth:`loss`."""
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            self.teacher(*inputs, **kwargs)
        return self.loss()

    def extra_repr(self) -> str:
        return f"taps={self.taps}, weight={self.weight}"
