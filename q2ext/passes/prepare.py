"""One-call QAT preparation of an unmodified model, and a summary of what was quantized.

``prepare(model, qconfig)`` walks the module tree, picks every ``nn.Conv2d``,
``nn.ConvTranspose2d`` and ``nn.Linear`` (subclasses too, unless they override the
forward), resolves each one's :class:`~q2ext.qconfig.LayerQConfig` (defaults, first/last
layer bits, skip list, overrides) and swaps it for its ``q2ext.nn`` counterpart, which
shares the float layer's parameters.  Nothing else in the model changes, so torchvision,
timm and segmentation-models-pytorch models run as before, with quantized layers.

Preparing an already prepared model is an error (the second config would silently mix
with the first); prepare the float model again instead.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..nn.fake_quant import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, Quantizer
from ..nn.fake_quant_layers import FLOAT_TO_QUANT, QUANT_LAYERS
from ..nn.gemm_layers import INT_LAYERS, describe_int_layer
from ..qconfig import QConfig

__all__ = ["prepare", "prepared_qconfig", "summary"]

# The attribute of a prepared model's root that records its QConfig (for checkpoints).
_QCONFIG_ATTR = "_q2ext_qconfig"


def _float_base(m: nn.Module):
    for base in FLOAT_TO_QUANT:
        if isinstance(m, base):
            return base
    return None


def _unsupported_reason(m: nn.Module, base: type):
    """Why a subclass of a supported layer is left in float, or None."""
    if isinstance(m, NonDynamicallyQuantizableLinear):
        # nn.MultiheadAttention reads out_proj.weight directly, never calls its forward.
        return "an nn.MultiheadAttention projection (its weight is read directly, not through forward)"
    if type(m).forward is not base.forward:
        return f"{type(m).__name__} overrides forward()"
    if base is nn.Conv2d and type(m)._conv_forward is not nn.Conv2d._conv_forward:
        return f"{type(m).__name__} overrides _conv_forward()"
    return None


def _matches(pattern, chain) -> bool:
    """`chain`: [(name, module)] from the root down to the layer; a match anywhere counts."""
    if isinstance(pattern, str):
        return any(name and fnmatch.fnmatchcase(name, pattern) for name, _ in chain)
    return any(isinstance(mod, pattern) for _, mod in chain)


def _chain(name: str, modules: dict):
    parts = name.split(".") if name else []
    prefixes = [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [(p, modules[p]) for p in prefixes if p in modules]


def _pattern_label(p):
    return repr(p) if isinstance(p, str) else f"{p.__module__}.{p.__qualname__}"


def prepared_qconfig(model: nn.Module) -> QConfig | None:
    """The QConfig :func:`prepare` applied to `model` (None for a model it did not prepare)."""
    return getattr(model, _QCONFIG_ATTR, None)


def prepare(model: nn.Module, qconfig: QConfig | Mapping | None = None, inplace: bool = False) -> nn.Module:
    """Swap every supported layer of `model` for its q2ext QAT layer.

    Args:
        model: any ``nn.Module`` (float32/float16/bfloat16 parameters).
        qconfig: :class:`q2ext.QConfig` (default: W4A4 LSQ, first/last layer 8 bits), or
            the plain dict of ``QConfig.to_dict()`` (e.g. read back from a checkpoint).
        inplace: modify `model` itself; otherwise a deep copy is prepared.
    Returns: the prepared model (the quantized layer itself when `model` is a bare layer),
    which records `qconfig` (:func:`prepared_qconfig`, used by ``q2ext.save_checkpoint``).
    Quantizers initialise from the first training batch (or :func:`q2ext.calibrate`).
    Raises ValueError for an already prepared model and for skip/override patterns that
    match no quantizable layer; TypeError/ValueError naming the layer for layers that
    cannot be quantized (float64 weights, lazy or meta parameters).
    Warns (and returns `model` unchanged) when there is nothing to quantize.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare: model must be an nn.Module, got {type(model).__name__}")
    qconfig = QConfig() if qconfig is None else qconfig
    if isinstance(qconfig, Mapping):
        qconfig = QConfig.from_dict(qconfig)
    if not isinstance(qconfig, QConfig):
        raise TypeError(f"prepare: qconfig must be a q2ext.QConfig, got {type(qconfig).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, (*QUANT_LAYERS, Quantizer)):
            raise ValueError(f"prepare: the model is already prepared ({type(m).__name__} at "
                             f"{name or '<root>'!r}); prepare the float model instead")

    modules = dict(model.named_modules())
    candidates, left_float = [], []
    for name, m in modules.items():
        base = _float_base(m)
        if base is None:
            continue
        reason = _unsupported_reason(m, base)
        if reason:
            left_float.append(f"{name or '<root>'}: {reason}")
        else:
            candidates.append((name, m, base))
    if left_float:
        warnings.warn("prepare: left in float (not supported): " + "; ".join(left_float), UserWarning, stacklevel=2)
    if not candidates:
        warnings.warn(f"prepare: {type(model).__name__} has no layer q2ext can quantize "
                      "(nn.Conv2d, nn.ConvTranspose2d, nn.Linear); returning it unchanged", UserWarning, stacklevel=2)
        return model

    defaults = qconfig.layer_defaults()
    used = {("skip", i): False for i in range(len(qconfig.skip))}
    used.update({("overrides", i): False for i in range(len(qconfig.overrides))})
    plan = []
    for idx, (name, m, base) in enumerate(candidates):
        chain = _chain(name, modules)
        skipped = False
        for i, pat in enumerate(qconfig.skip):
            if _matches(pat, chain):
                used[("skip", i)] = skipped = True
        cfg = defaults
        if idx == 0 and qconfig.first_layer_bits is not None:
            cfg = cfg.replace(w_bits=qconfig.first_layer_bits, a_bits=qconfig.first_layer_bits)
        if idx == 0 and qconfig.freeze_network_input:
            cfg = cfg.replace(a_learnable=False)
        if idx == len(candidates) - 1 and qconfig.last_layer_bits is not None:
            cfg = cfg.replace(w_bits=qconfig.last_layer_bits, a_bits=qconfig.last_layer_bits)
        for i, (pat, changes) in enumerate(qconfig.overrides.items()):
            if _matches(pat, chain):
                used[("overrides", i)] = True
                cfg = cfg.replace(**changes)
        if not skipped:
            plan.append((name, m, base, cfg))

    dead = {"skip": [], "overrides": []}
    for (field, i), hit in used.items():
        if not hit:
            pats = qconfig.skip if field == "skip" else list(qconfig.overrides)
            dead[field].append(_pattern_label(pats[i]))
    if dead["skip"] or dead["overrides"]:
        names = [n for n, _, _ in candidates]
        listing = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        parts = [f"{k}: [{', '.join(v)}]" for k, v in dead.items() if v]
        raise ValueError(f"prepare: QConfig pattern(s) matched no quantizable layer: {'; '.join(parts)}. "
                         f"Quantizable layers: {listing}")
    if not plan:
        warnings.warn("prepare: every quantizable layer is in QConfig.skip; returning the model unchanged",
                      UserWarning, stacklevel=2)
        return model

    if not inplace:
        memo = {}
        copied = copy.deepcopy(model, memo)
        # The deep copy maps each original module to its copy (shared modules stay shared).
        plan = [(name, memo[id(m)], base, cfg) for name, m, base, cfg in plan]
        model = copied
    swaps = {id(m): FLOAT_TO_QUANT[base].from_float(m, cfg, name=name) for name, m, base, cfg in plan}
    if id(model) in swaps:
        model = swaps[id(model)]
    else:
        for parent in list(model.modules()):
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in swaps:
                    parent._modules[child_name] = swaps[id(child)]
    object.__setattr__(model, _QCONFIG_ATTR, qconfig)  # a plain attribute, not in the state dict
    return model


# ---------------------------------------------------------------------------- summary

def _stats(t: torch.Tensor) -> str:
    t = t.detach().float().reshape(-1)
    if t.numel() == 1:
        return f"{t.item():.3g}"
    return f"{t.min().item():.3g} / {t.mean().item():.3g} / {t.max().item():.3g}"


def _describe(q: nn.Module):
    """(bits, kind, granularity, step stats) of a quantizer module."""
    if not isinstance(q, Quantizer):
        return "float", type(q).__name__ if not isinstance(q, nn.Identity) else "-", "-", "-"
    gran = "per-tensor" if q.axis is None else f"per-channel({q.num_channels})"
    if isinstance(q, LSQQuantizer):
        kind = "LSQ " + ("signed" if q._signed else "unsigned")
        if q.signed == "auto" and not q.is_initialized:
            kind = "LSQ sign auto"
    elif isinstance(q, LSQPlusQuantizer):
        if q._offset_active:
            kind = f"LSQ+ b={_stats(q.offset)}"
        else:
            kind = "LSQ unsigned" if q.is_initialized else "LSQ/LSQ+ auto"
    elif isinstance(q, PACTQuantizer):
        kind = f"PACT a={_stats(q.alpha)}"
    else:
        kind = type(q).__name__
    if not any(p.requires_grad for p in q.parameters(recurse=False)):
        kind += " (frozen)"
    if not q.enabled:
        kind += " (disabled)"
    step = _stats(q.step_size()) if q.is_initialized else "uninitialised"
    return str(q.bits), kind, gran, step


def _table(headers, rows, what):
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"{len(rows)} {what}")
    return "\n".join(line.rstrip() for line in lines)


def summary(model: nn.Module) -> str:
    """A table of every quantized layer: name, type, weight and input bits, quantizer,
    granularity and step-size stats (min / mean / max over channels); for a converted
    model (``q2ext.convert``) every int layer with its grids and the engine it runs on per
    input shape seen so far (``q2ext.nn.gemm_engines``).  Returns the text;
    ``print(q2ext.summary(model))`` shows it.  Reads parameters on the host (not for the
    training loop)."""
    headers = ["layer", "type", "w bits", "w quantizer", "w granularity", "w step", "a bits", "a quantizer",
               "a granularity", "a step"]
    rows, int_rows = [], []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            wb, wk, wg, ws = _describe(m.weight_quantizer)
            ab, ak, ag, as_ = _describe(m.input_quantizer)
            rows.append([name or "<root>", type(m).__name__, wb, wk, wg, ws, ab, ak, ag, as_])
        elif isinstance(m, INT_LAYERS):
            int_rows.append([name or "<root>", *describe_int_layer(m)])
    if not rows and not int_rows:
        return "q2ext.summary: no quantized layer (run q2ext.prepare first)"
    parts = [_table(headers, rows, "quantized layers")] if rows else []
    if int_rows:
        parts.append(_table(["layer", "type", "weight", "activation", "engine (input shape: engine)"], int_rows,
                            "int layers"))
    return "\n\n".join(parts)
