"""Whole-model quantizer control: calibration, enable/disable, freeze.

``calibrate`` is the alternative to first-batch initialisation: every quantizer passes
its input through (the model computes in float) while it accumulates statistics over the
given batches, then initialises from all of them at once.  Under torch.distributed every
rank must calibrate on the same number of batches (the statistics are all-reduced per
batch); run it before wrapping the model in DDP or on the DDP-wrapped model, both work.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn

from .quantizers import Quantizer

__all__ = ["quantizers", "calibrate", "set_enabled", "freeze", "unfreeze"]


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
