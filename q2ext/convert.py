"""QAT model -> real int8 inference model (issue #6).

``convert(model)`` replaces every trained ``QuantLinear`` / ``QuantConv2d`` by
``Int8Linear`` / ``Int8Conv2d`` (or ``Int4Linear`` for weight-only), folding a following
``BatchNorm2d`` (eval statistics) into the int8 conv's per-channel epilogue scale and
bias - exact, no weight re-rounding: ``bn(s_x s_W acc + b) = s_x (s_W g) acc + (b - mu) g + beta``
with ``g = gamma / sqrt(var + eps)``.  Conv -> BN edges are found with torch.fx; a model
that does not trace keeps its BatchNorms as float modules (still correct, just unfused).
Q-GBFusion folding (#4) and ONNX Q/DQ export are not implemented here yet.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .nn.int_layers import Int4Linear, Int8Conv2d, Int8Linear
from .nn.layers import QuantConv2d, QuantLinear

__all__ = ["convert"]


class _Tracer(torch.fx.Tracer):
    # The QAT layers live outside torch.nn, so fx would trace into them by default.
    def is_leaf_module(self, m, qualname):
        return isinstance(m, (QuantConv2d, QuantLinear)) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(model):
    """{conv qualified name: bn qualified name} for BNs that consume only a QuantConv2d output."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable control flow: keep BNs unfused
        return {}
    mods = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), QuantConv2d) and len(src.users) == 1):
            pairs[src.target] = node.target
    return pairs


def _fold_bn(int_conv: Int8Conv2d, bn: nn.BatchNorm2d):
    g = (bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias.detach() if bn.affine else torch.zeros_like(g)
    cout_g = int_conv.out_channels // int_conv.groups
    for i, lin in enumerate(int_conv.linears):
        sl = slice(i * cout_g, (i + 1) * cout_g)
        b = lin.bias if lin.bias is not None else torch.zeros(cout_g)
        lin.w_scale = (lin.w_scale * g[sl].float()).contiguous()
        lin.bias = ((b - bn.running_mean[sl]) * g[sl] + beta[sl]).float().contiguous()


def _set(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def convert(model: nn.Module, *, int4_weight_only: bool = False, group_size: int = 128,
            inplace: bool = False) -> nn.Module:
    """Int inference copy of a trained QAT model (call ``model.eval()`` first).

    Args:
        int4_weight_only: convert QuantLinear layers to Int4Linear (W4A16) instead of
            Int8Linear; convs stay W8A8.
        group_size: Int4Linear group size (in_features must be a multiple of it).
        inplace: modify ``model`` instead of a deep copy.
    """
    if model.training:
        raise ValueError("convert: call model.eval() first (BatchNorm folding uses running statistics)")
    model = model if inplace else copy.deepcopy(model)
    pairs = _conv_bn_pairs(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantConv2d):
            new = Int8Conv2d.from_qat(mod)
            if name in pairs:
                _fold_bn(new, model.get_submodule(pairs[name]))
                _set(model, pairs[name], nn.Identity())
            _set(model, name, new)
        elif isinstance(mod, QuantLinear):
            _set(model, name, Int4Linear.from_qat(mod, group_size) if int4_weight_only else Int8Linear.from_qat(mod))
    return model
