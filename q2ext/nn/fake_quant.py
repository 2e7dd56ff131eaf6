"""Learnable quantizers as modules (LSQ, LSQ+ and PACT over :mod:`q2ext.ops`) and the
whole-model controls (calibration, enable/disable, freeze).

Every quantizer maps a float32/float16/bfloat16 tensor ``x`` of any shape to a tensor of
the same shape, dtype and memory format.  Its learnable values are float32 parameters
of shape ``[C]`` (``C = 1`` per-tensor, ``axis=None``; ``C = x.shape[axis]`` per-channel).

State lives in parameters and buffers only (``scale``/``offset``/``alpha``, and the
``initialized`` / decision flags), so ``state_dict``, ``torch.save``, ``copy.deepcopy``,
pickling and DDP need nothing special.  Python attributes mirror the boolean buffers so
that the training step never reads a tensor on the host; ``_load_from_state_dict``
refreshes the mirrors after a load.

Initialisation (LSQ: ``s = 2 * mean|v| / sqrt(Q_P)``) comes from data: from the first
``init_batches`` forward passes (default 1; during the first ``init_batches - 1`` the
quantizer passes ``x`` through and only observes), or from :func:`q2ext.calibrate`.
Initialisation runs eagerly, once: it reads a few statistics on the host (the sign
decisions are Python choices of the quantization grid) and, when ``torch.distributed``
is initialised with more than one rank, all-reduces its per-batch statistics so every
rank computes identical scales (every rank must then initialise the same quantizers on the
same number of batches; set ``Quantizer.sync_init = False`` where ranks do not).
Initialise (one eager forward or ``q2ext.calibrate``) before
``torch.compile(fullgraph=True)``; after that the forward is a single q2ext op with no
host synchronisation.
"""
from __future__ import annotations

import functools
import itertools
import math
import weakref
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from .._ops.fake_quant import lsq_levels

__all__ = ["Quantizer", "LSQQuantizer", "LSQPlusQuantizer", "PACTQuantizer",
           "quantizers", "calibrate", "set_enabled", "freeze", "unfreeze"]

_KINDS = ("activation", "weight")
_INIT_REASON = ("q2ext quantizers initialise from data eagerly, once: run one eager forward "
                "or q2ext.calibrate(model, batches) before torch.compile(fullgraph=True)")

# Row indices of the per-channel statistics buffer ([4, C]).
_ABSMEAN, _MEAN, _MIN, _MAX = range(4)


def _positive(t: torch.Tensor, fallback: float = 1.0) -> torch.Tensor:
    """t where finite and > 0, else `fallback` (all-zero or NaN calibration data)."""
    return torch.where(torch.isfinite(t) & (t > 0), t, torch.full_like(t, fallback))


def _sync_stats(stats: torch.Tensor) -> torch.Tensor:
    """Average the means and take the global min/max of a [4, C] batch statistic over ranks.

    Runs only during initialisation; every rank calls it for the same quantizers in the
    same order because every rank runs the same model on the same number of batches.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    means = stats[:_MIN].contiguous()
    dist.all_reduce(means, op=dist.ReduceOp.SUM)
    means /= dist.get_world_size()
    extremes = torch.stack([-stats[_MIN], stats[_MAX]])  # one MAX reduction for both ends
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return torch.cat([means, -extremes[:1], extremes[1:]])


class Quantizer(nn.Module):
    """Shared machinery: enable switch, lazy data-driven init, calibration, freeze.

    Subclasses define ``_init_from_stats(absmean, mean, minimum, maximum)`` (float32 ``[C]``
    each, set the learnable values) and ``_quant_fn(x)`` (the fake quantization, as a
    function of x with the learnable tensors bound).

    Args:
        bits: int 2..8.
        axis: ``None`` (per-tensor) or the channel dimension of ``x`` (may be negative).
        num_channels: ``C``, the length of the learnable parameters (1 when ``axis`` is None).
        kind: ``"activation"`` (LSQ grad scale N = features per sample per scale value) or
            ``"weight"`` (N = elements per scale value).
        init_batches: forward passes whose statistics initialise the quantizer (>= 1).
        grad_scale: fixed LSQ gradient scale g for the learnable values; ``None`` = the
            paper's ``1/sqrt(N * Q_P)`` with N as given by ``kind``.
        enabled: ``False`` makes the quantizer an identity (no observation either).
    """

    sync_init = True  # all-reduce init statistics across ranks when torch.distributed is up

    def __init__(self, bits: int, *, axis: int | None = None, num_channels: int = 1, kind: str = "activation",
                 init_batches: int = 1, grad_scale: float | None = None, enabled: bool = True):
        super().__init__()
        name = type(self).__name__
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"{name}: bits must be an int in 2..8, got {bits!r}")
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(f"{name}: axis must be an int or None, got {axis!r}")
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"{name}: num_channels must be a positive int, got {num_channels!r}")
        if axis is None and num_channels != 1:
            raise ValueError(f"{name}: num_channels must be 1 for a per-tensor quantizer (axis=None), "
                             f"got {num_channels}")
        if kind not in _KINDS:
            raise ValueError(f"{name}: kind must be one of {_KINDS}, got {kind!r}")
        if isinstance(init_batches, bool) or not isinstance(init_batches, int) or init_batches < 1:
            raise ValueError(f"{name}: init_batches must be an int >= 1, got {init_batches!r}")
        if grad_scale is not None and not (isinstance(grad_scale, (int, float)) and grad_scale > 0):
            raise ValueError(f"{name}: grad_scale must be a positive float or None, got {grad_scale!r}")
        self.bits, self.axis, self.num_channels, self.kind = bits, axis, num_channels, kind
        self.init_batches = init_batches
        self.grad_scale = None if grad_scale is None else float(grad_scale)
        self.enabled = bool(enabled)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Statistics live only while initialising: not part of the state dict.
        self.register_buffer("_stats", self._empty_stats(), persistent=False)
        self._observed = 0  # batches accumulated into _stats
        self._ready = False  # mirror of `initialized`
        self._calibrating = False

    # ------------------------------------------------------------------ public switches
    def freeze(self) -> "Quantizer":
        """Stop learning: the quantizer's parameters no longer require grad (init still runs)."""
        for p in self.parameters(recurse=False):
            p.requires_grad_(False)
        return self

    def unfreeze(self) -> "Quantizer":
        for p in self.parameters(recurse=False):
            p.requires_grad_(True)
        return self

    @property
    def is_initialized(self) -> bool:
        return self._ready

    def step_size(self) -> torch.Tensor:
        """The quantization step s per channel (float32 ``[C]``, detached)."""
        return self.scale.detach().float()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32/float16/bfloat16, any shape; returns the fake-quantized x (same shape/dtype)."""
        if not self.enabled:
            return x
        if self._calibrating or not self._ready:
            return self._observe(x)
        return self._quantize(x)

    @torch.compiler.disable(reason=_INIT_REASON)
    def _observe(self, x: torch.Tensor) -> torch.Tensor:
        """Accumulate init statistics; pass x through until init_batches have been seen."""
        if x.numel() == 0:  # nothing to learn a range from (e.g. an empty detection batch)
            return x if self._calibrating or not self._ready else self._quantize(x)
        self._accumulate(x)
        if self._calibrating or self._observed < self.init_batches:
            return x
        self.finish_init()
        return self._quantize(x)

    # ------------------------------------------------------------------ initialisation
    def _empty_stats(self) -> torch.Tensor:
        stats = torch.zeros(4, self.num_channels, device=self.initialized.device)
        stats[_MIN].fill_(math.inf)
        stats[_MAX].fill_(-math.inf)
        return stats

    def reset_stats(self) -> None:
        """Forget accumulated statistics (start a new calibration)."""
        # In place: DDP keeps references to the module's buffers.
        with torch.no_grad():
            self._stats.copy_(self._empty_stats())
        self._observed = 0

    def _batch_stats(self, x: torch.Tensor) -> torch.Tensor:
        """[4, C] float32 statistics (mean|x|, mean x, min, max) of one batch, per channel."""
        xf = x.detach().float()
        if self.axis is None:
            dims = list(range(xf.dim()))
        else:
            axis = self.axis % xf.dim()
            if xf.shape[axis] != self.num_channels:
                raise ValueError(f"{type(self).__name__}: x has {xf.shape[axis]} channels along axis {axis}, "
                                 f"the quantizer {self.num_channels}")
            dims = [d for d in range(xf.dim()) if d != axis]
        if not dims:  # a 1-D per-channel input (or a 0-d one): every element is its own channel
            return torch.stack([xf.abs(), xf, xf, xf]).reshape(4, self.num_channels)
        stats = [xf.abs().mean(dim=dims), xf.mean(dim=dims), xf.amin(dim=dims), xf.amax(dim=dims)]
        return torch.stack(stats).reshape(4, self.num_channels)

    def _accumulate(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            stats = self._batch_stats(x)
            if self.sync_init:
                stats = _sync_stats(stats)
            acc = self._stats
            stats = stats.to(acc.device, acc.dtype)
            acc[:_MIN] += stats[:_MIN]
            acc[_MIN] = torch.minimum(acc[_MIN], stats[_MIN])
            acc[_MAX] = torch.maximum(acc[_MAX], stats[_MAX])
        self._observed += 1

    def finish_init(self) -> None:
        """Set the learnable values from the accumulated statistics (one-time, eager)."""
        if self._observed == 0:
            return
        with torch.no_grad():
            n = float(self._observed)
            s = self._stats
            self._init_from_stats(absmean=s[_ABSMEAN] / n, mean=s[_MEAN] / n, minimum=s[_MIN], maximum=s[_MAX])
            self.initialized.fill_(True)
        self._ready = True
        self.reset_stats()

    # ------------------------------------------------------------------ quantization
    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._quant_fn(x)
        y = fn(x)
        if isinstance(y, torch.Tensor) and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # How to compute y again from x (same op, same parameter tensors): a quantized
            # layer then saves x, which the op's backward keeps anyway, instead of y for
            # the float op's backward (see q2ext.nn.fake_quant_layers).  A weak reference,
            # so that y never extends x's life.
            y._q2ext_recompute = (weakref.ref(x), fn)
        return y

    def _quant_fn(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fn`` with ``fn(x)`` the fake quantization of x; the learnable tensors it uses are
        bound in it (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _lsq_grad_scale(self, x: torch.Tensor, q_p: int) -> float:
        if self.grad_scale is not None:
            return self.grad_scale
        n = x.numel() // self.num_channels
        if self.kind == "activation" and x.dim() > 1:
            n //= max(x.shape[0], 1)  # features per sample
        return 1.0 / math.sqrt(max(n, 1) * q_p)

    @staticmethod
    def _fp32(p: torch.Tensor) -> torch.Tensor:
        # model.half() converts every parameter; the kernels take float32 parameters.
        return p if p.dtype == torch.float32 else p.float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.initialized.device.type != "meta":
            self._sync_mirrors()
            self.reset_stats()

    def _sync_mirrors(self) -> None:
        self._ready = bool(self.initialized)

    def extra_repr(self) -> str:
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis}, C={self.num_channels})"
        flags = "" if self.enabled else ", disabled"
        return f"bits={self.bits}, {gran}, kind={self.kind}, initialized={self._ready}{flags}"


class LSQQuantizer(Quantizer):
    """LSQ (Esser et al. 2019): ``round(clamp(x/s, -Q_N, Q_P)) * s`` with learnable step s.

    Args (besides :class:`Quantizer`'s):
        signed: ``True`` (grid ``[-2^(b-1), 2^(b-1)-1]``), ``False`` (``[0, 2^b-1]``) or
            ``"auto"``: decided at init, unsigned when the observed data is non-negative.
    Parameters: ``scale`` float32 ``[C]``.  Buffers: ``initialized``, ``is_signed`` (bool).
    Init: ``s = 2 * mean|v| / sqrt(Q_P)`` (per channel when per-channel).
    """

    def __init__(self, bits: int, signed: bool | str = True, **kwargs):
        super().__init__(bits, **kwargs)
        if signed not in (True, False, "auto"):
            raise ValueError(f"LSQQuantizer: signed must be True, False or 'auto', got {signed!r}")
        self.signed = signed
        self.scale = nn.Parameter(torch.ones(self.num_channels))
        self.register_buffer("is_signed", torch.tensor(signed is not False))
        self._signed = signed is not False  # mirror of is_signed

    def _sync_mirrors(self) -> None:
        super()._sync_mirrors()
        self._signed = bool(self.is_signed)

    def _init_from_stats(self, absmean, mean, minimum, maximum):
        if self.signed == "auto":
            self._signed = bool(minimum.min() < 0)
            self.is_signed.fill_(self._signed)
        _, q_p = lsq_levels(self.bits, self._signed)
        self.scale.copy_(_positive(2 * absmean / math.sqrt(q_p)))

    def _quant_fn(self, x):
        _, q_p = lsq_levels(self.bits, self._signed)
        return functools.partial(ops.lsq, scale=self._fp32(self.scale), bits=self.bits, signed=self._signed,
                                 axis=self.axis, grad_scale=self._lsq_grad_scale(x, q_p))

    def extra_repr(self):
        sign = "signed" if self._signed else "unsigned"
        if self.signed == "auto":
            sign = f"{sign} (auto)" if self._ready else "sign auto"
        return f"{super().extra_repr()}, {sign}"


class LSQPlusQuantizer(Quantizer):
    """LSQ+ (Bhalgat et al. 2020): ``round(clamp((x-b)/s, 0, 2^b-1)) * s + b``, learnable s and b.

    Args (besides :class:`Quantizer`'s):
        offset: ``"learn"`` (always LSQ+) or ``"auto"``: decided at init, LSQ+ when the
            observed data goes negative, else exactly unsigned LSQ with the offset held at 0.
    Parameters: ``scale``, ``offset`` float32 ``[C]``.  Buffers: ``initialized``,
    ``offset_active`` (bool).
    Init (documented choice): ``b = min v``; ``s = min((max v - b) / Q_P, 2 * mean|v - b| / sqrt(Q_P))``
    - the min-max step of the LSQ+ paper, tightened by LSQ's rule for heavy-tailed data.
    With the offset inactive: LSQ's ``s = 2 * mean|v| / sqrt(Q_P)`` on the unsigned grid.
    """

    def __init__(self, bits: int, offset: str = "learn", **kwargs):
        super().__init__(bits, **kwargs)
        if offset not in ("learn", "auto"):
            raise ValueError(f"LSQPlusQuantizer: offset must be 'learn' or 'auto', got {offset!r}")
        self.offset_mode = offset
        self.scale = nn.Parameter(torch.ones(self.num_channels))
        self.offset = nn.Parameter(torch.zeros(self.num_channels))
        self.register_buffer("offset_active", torch.tensor(offset == "learn"))
        self._offset_active = offset == "learn"

    def _sync_mirrors(self):
        super()._sync_mirrors()
        self._offset_active = bool(self.offset_active)

    def _init_from_stats(self, absmean, mean, minimum, maximum):
        _, q_p = lsq_levels(self.bits, False)
        if self.offset_mode == "auto":
            self._offset_active = bool(minimum.min() < 0)
            self.offset_active.fill_(self._offset_active)
        if not self._offset_active:
            self.offset.zero_()
            self.scale.copy_(_positive(2 * absmean / math.sqrt(q_p)))
            return
        minimum = torch.where(torch.isfinite(minimum), minimum, torch.zeros_like(minimum))
        # Every observed v >= the running min, so mean|v - b| = mean(v) - b exactly.
        lsq_step = 2 * (mean - minimum) / math.sqrt(q_p)
        minmax_step = (maximum - minimum) / q_p
        self.offset.copy_(minimum)
        self.scale.copy_(_positive(torch.minimum(lsq_step, minmax_step)))

    def _quant_fn(self, x):
        _, q_p = lsq_levels(self.bits, False)
        g = self._lsq_grad_scale(x, q_p)
        scale = self._fp32(self.scale)
        offset = self._fp32(self.offset) if self._offset_active else None
        if not self._offset_active and self.offset.requires_grad and torch.is_grad_enabled():
            # The inactive offset still gets an (exactly zero) gradient so that DDP, built
            # before the data decided, sees every parameter used; the kernel keeps its
            # cheaper offset-free path.
            scale = torch.add(scale, self._fp32(self.offset), alpha=0.0)
        return functools.partial(ops.lsq, scale=scale, bits=self.bits, signed=False, axis=self.axis,
                                 offset=offset, grad_scale=g)

    def extra_repr(self):
        mode = "offset learned" if self._offset_active else "offset inactive (unsigned LSQ)"
        if self.offset_mode == "auto" and not self._ready:
            mode = "offset auto"
        return f"{super().extra_repr()}, {mode}"


class PACTQuantizer(Quantizer):
    """PACT (Choi et al. 2018): clip to ``[0, alpha]``, ``2^b - 1`` uniform levels, learnable alpha.

    Parameters: ``alpha`` float32 ``[C]``.  Init (documented choice): the clip at which the
    step ``alpha / Q_P`` equals LSQ's unsigned init, ``alpha = 2 * mean|v| * sqrt(Q_P)``,
    capped at ``max v`` so the grid is not wider than the data.
    """

    def __init__(self, bits: int, **kwargs):
        super().__init__(bits, **kwargs)
        self.alpha = nn.Parameter(torch.ones(self.num_channels))

    def _init_from_stats(self, absmean, mean, minimum, maximum):
        q_p = 2 ** self.bits - 1
        alpha = 2 * absmean * math.sqrt(q_p)
        alpha = torch.where(maximum > 0, torch.minimum(alpha, maximum), alpha)
        self.alpha.copy_(_positive(alpha))

    def step_size(self):
        return self.alpha.detach().float() / (2 ** self.bits - 1)

    def _quant_fn(self, x):
        return functools.partial(ops.pact, alpha=self._fp32(self.alpha), bits=self.bits, axis=self.axis)


# ---------------------------------------------------------------- whole-model control
# Whole-model quantizer control: calibration, enable/disable, freeze.
#
# ``calibrate`` is the alternative to first-batch initialisation: every quantizer passes
# its input through (the model computes in float) while it accumulates statistics over the
# given batches, then initialises from all of them at once.  Under torch.distributed every
# rank must calibrate on the same number of batches (the statistics are all-reduced per
# batch); run it before wrapping the model in DDP or on the DDP-wrapped model, both work.


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """(name, quantizer) for every q2ext quantizer in `model`, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


def _default_forward(model, batch):
    return model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None,
              forward_fn: Callable | None = None, eval_mode: bool = True) -> nn.Module:
    """Initialise every enabled quantizer of `model` from statistics over `batches`.

    Args:
        model: a prepared model (or any module containing q2ext quantizers).
        batches: iterable of model inputs (e.g. float ``[N, C, H, W]`` tensors, or a list
            of ``[C, H, W]`` images for torchvision detectors).
        num_batches: use at most this many batches (None: all of `batches`).
        forward_fn: ``forward_fn(model, batch)`` runs one batch (default ``model(batch)``);
            use it for models that take several arguments or targets.
        eval_mode: run in eval mode (BatchNorm statistics untouched); the previous
            train/eval mode is restored afterwards.
    Returns: `model`.  Quantizers already initialised are re-initialised; quantizers that
    saw no data keep their state.  Runs eagerly (not under torch.compile).
    """
    qs = [q for _, q in quantizers(model) if q.enabled]
    if not qs:
        raise ValueError("calibrate: the model has no enabled q2ext quantizer (run q2ext.prepare first)")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"calibrate: num_batches must be a positive int or None, got {num_batches!r}")
    forward_fn = forward_fn or _default_forward
    was_training = model.training
    if eval_mode:
        model.eval()
    for q in qs:
        q.reset_stats()
        q._calibrating = True
    seen = 0
    try:
        it = batches if num_batches is None else itertools.islice(batches, num_batches)
        for batch in it:
            forward_fn(model, batch)
            seen += 1
    finally:
        for q in qs:
            q._calibrating = False
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate: `batches` yielded no batch")
    for q in qs:
        q.finish_init()
    return model


def set_enabled(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn every quantizer into an identity (``enabled=False``) or back."""
    for _, q in quantizers(model):
        q.enabled = bool(enabled)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Stop learning every quantizer's scale/offset/alpha (requires_grad=False)."""
    for _, q in quantizers(model):
        q.freeze()
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    for _, q in quantizers(model):
        q.unfreeze()
    return model
