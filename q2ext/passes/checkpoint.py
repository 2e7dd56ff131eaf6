"""Checkpoints of prepared models that rebuild from the float model.

A prepared model's state dict alone cannot be loaded into a float model: it needs the
quantized layers first, that is ``q2ext.prepare`` with the same :class:`~q2ext.QConfig`.
Frameworks that start fresh worker processes (DDP launchers, Ultralytics' trainer, a
resumed job) build the float model on every rank; :func:`save_checkpoint` stores the
config next to the state dict, as plain data, so that on each rank::

    model = build_float_model()                    # + q2ext.insert_gbfusion(...) if it had nodes
    model, extra = q2ext.load_checkpoint("ckpt.pt", model)

rebuilds the same prepared model: same quantizers, same learned scales and data-driven
decisions (signed/unsigned grid, LSQ+ offset on/off), bit-identical outputs.  The file
holds only tensors and plain Python data, so ``torch.load(path, weights_only=True)`` reads
it (no pickled code).  The building blocks are public too:
``QConfig.to_dict`` / ``QConfig.from_dict``, and ``q2ext.prepare(model, config_dict)``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from ..nn.gb_fusion import GBFusion
from ..qconfig import QConfig
from .prepare import prepare, prepared_qconfig

__all__ = ["save_checkpoint", "load_checkpoint"]

_FORMAT = "q2ext.checkpoint/1"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (their state dicts add "module.")."""
    inner = getattr(model, "module", None)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and isinstance(inner, nn.Module):
        return inner
    return model


def save_checkpoint(model: nn.Module, f, extra: Mapping | None = None) -> None:
    """Save a prepared model's state dict with the QConfig it was prepared with.

    Args:
        model: a model returned by :func:`q2ext.prepare` (or its DDP wrapper).
        f: a path or a writable binary file object (as for ``torch.save``).
        extra: optional plain data to store alongside (optimizer state dict, epoch, ...);
            keep it to tensors and plain Python types if the file must load with
            ``weights_only=True``.
    """
    model = _unwrap(model)
    qconfig = prepared_qconfig(model)
    if qconfig is None:
        raise ValueError("save_checkpoint: `model` was not prepared by q2ext.prepare (no QConfig recorded); "
                         "save its state_dict with torch.save instead")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"save_checkpoint: extra must be a mapping or None, got {type(extra).__name__}")
    torch.save({
        "format": _FORMAT,
        "qconfig": qconfig.to_dict(),
        "gbfusion": [n for n, m in model.named_modules() if isinstance(m, GBFusion)],
        "state_dict": model.state_dict(),
        "extra": dict(extra or {}),
    }, f)


def load_checkpoint(f, float_model: nn.Module, map_location=None, inplace: bool = False):
    """Rebuild a prepared model from `float_model` and a :func:`save_checkpoint` file.

    Args:
        f: a path or a readable binary file object.
        float_model: the float model the checkpoint's model was prepared from, built the
            same way (Q-GBFusion nodes inserted again if it had them); its weights are
            replaced by the checkpoint's.
        map_location: as for ``torch.load``.
        inplace: prepare `float_model` itself instead of a copy.
    Returns: ``(model, extra)``: the prepared model with the checkpoint's state loaded
    (strict), and the ``extra`` mapping that was saved.
    The file is read with ``torch.load(weights_only=True)``.
    """
    if isinstance(f, (str, os.PathLike)) and not os.path.isfile(f):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {os.fspath(f)!r}")
    ckpt = torch.load(f, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != _FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"load_checkpoint: not a q2ext checkpoint (format {found!r}, expected {_FORMAT!r}); "
                         "a plain state dict loads with model.load_state_dict")
    have = {n for n, m in float_model.named_modules() if isinstance(m, GBFusion)}
    missing = [n for n in ckpt["gbfusion"] if n not in have]
    if missing:
        raise ValueError(f"load_checkpoint: the checkpoint's model has Q-GBFusion nodes at {missing} that "
                         "float_model lacks; run q2ext.insert_gbfusion on the float model first, as before "
                         "the original prepare")
    model = prepare(float_model, QConfig.from_dict(ckpt["qconfig"]), inplace=inplace)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model, ckpt["extra"]
