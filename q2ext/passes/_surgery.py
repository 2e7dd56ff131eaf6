"""Model surgery shared by every pass: replace a submodule by its dotted path, run a model
in eval mode without autograd and restore every module's train flag afterwards, and an fx
tracer that keeps q2ext's layers and fusion nodes as single call_module nodes."""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from ..nn.gb_fusion import FixedFusion, GBFusion

# Conv/Linear subclasses (q2ext's QuantConv2d, ...) live outside torch.nn, so fx would
# trace into them by default; kept whole, a pass reads stride/groups off the module and finds
# a layer's consumers.  A GBFusion's forward (list inputs, dtype promotion) does not trace.
LEAF_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear, GBFusion, FixedFusion)


class Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, qualname)


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """``model.<path> = new`` for a dotted path ("" is not allowed: the root has no parent)."""
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)


@contextlib.contextmanager
def eval_no_grad(model: nn.Module):
    """Eval mode and no autograd for the block; every module's own train flag comes back
    afterwards (also when the block raises), not just the root's."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, t in modes.items():
            m.training = t
