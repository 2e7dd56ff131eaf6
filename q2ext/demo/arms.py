"""The arms of the ``q2ext demo`` protocol and how each is built from the FP32 checkpoints.

Two FP32 checkpoints per seed (q2ext.demo.protocol): *FP32-LN*, trained with the Q-GBFusion
nodes in place and frozen (LayerNorm on, alpha = 1/K), and *FP32*, trained with plain
fusion nodes.  Every arm but G starts from FP32-LN, so the LayerNorm is never inserted
into a network trained without it; G starts from FP32 (the paper's baseline row).

One activation-quantizer policy in every arm: ``cfg.quantizer`` for every quantized
layer, except that a PACT quantizer (which clips to [0, alpha]) is replaced by LSQ+ on the
layers whose input goes negative (the network input, the convs after a LayerNorm node),
in every arm alike.  ``"auto"`` (the default) already picks per layer: unsigned LSQ on
non-negative (ReLU) inputs, LSQ+ with a learned offset on signed ones, so the conv after
a fusion node gets all 2^b levels on the range of what it reads, with or without LN.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

import q2ext
from q2ext.nn import GBFusion, LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, QUANT_LAYERS

from ..passes._surgery import eval_no_grad
from .train import reestimate_bn

ARMS = {
    "E": "FP32-LN continued on the QAT schedule (the true gap)",
    "A": "{q} + LN, alpha frozen uniform",
    "B": "A + closed-loop controller (Q-GBFusion)",
    "C": "B + Q-ADA from the FP32-LN teacher (Q²)",
    "G": "plain {q} from the FP32 model without LN",
    "D": "alpha frozen at B's final values (open-loop replay)",
    "F": "FP32-LN + controller (negative control)",
    "H": "B with tau = FP32-LN's own log-energy offsets",
}
BASE_ARMS = ("E", "A", "B", "C", "G")
FULL_ARMS = BASE_ARMS + ("D", "F", "H")
QUANTIZED = {"A", "B", "C", "G", "D", "H"}
CONTROLLED = {"B", "C", "F", "H"}  # arms whose fusion nodes run the closed loop


def _probe(model: nn.Module, batch, handles) -> None:
    """One eval-mode, no-grad forward of `batch` for the hooks in `handles`, then removes them."""
    try:
        with eval_no_grad(model):
            model(batch)
    finally:
        for h in handles:
            h.remove()


def _signed_input_layers(model: nn.Module, batch) -> list:
    """Names of the conv/linear layers whose input has a negative value on `batch`."""
    found, handles = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            def hook(mod, args, name=name):
                if bool((args[0] < 0).any()):
                    found.add(name)
            handles.append(m.register_forward_pre_hook(hook))
    _probe(model, batch, handles)
    return sorted(found)


def qconfig(task, float_model: nn.Module, bits: int, quantizer: str, batch, w_per_channel: bool = True,
            edge_bits: int | None = 8):
    """The task's W<bits>A<bits> QConfig (weight steps per output channel or one per layer;
    first and last layer at `edge_bits`), with LSQ+ on signed inputs when `quantizer` is PACT."""
    base = dataclasses.replace(task.qconfig(bits, quantizer), w_per_channel=w_per_channel,
                               first_layer_bits=edge_bits, last_layer_bits=edge_bits)
    if quantizer != "pact":
        return base
    overrides = {name: {"a_quantizer": "lsq+"} for name in _signed_input_layers(float_model, batch)}
    return dataclasses.replace(base, overrides=overrides)


def configure_nodes(model: nn.Module, task, *, controller: bool, cfg, tau=None, lam=None) -> None:
    """Set every GBFusion node of `model`: controller on (eta, beta from cfg) or frozen;
    tau per node (list of K floats, or None = uniform); lam per node to start from."""
    nodes = [m for _, m in task.fusion_nodes(model) if isinstance(m, GBFusion)]
    for i, m in enumerate(nodes):
        m.eta, m.beta = float(cfg.gbf_eta), float(cfg.gbf_beta)
        m.tau = None if tau is None else torch.tensor(tau[i], dtype=torch.float32, device=m.lam.device)
        if lam is not None:
            with torch.no_grad():
                m.lam.copy_(torch.tensor(lam[i], dtype=torch.float32))
        m.unfreeze() if controller else m.freeze()


def build_arm(arm: str, ctx: dict):
    """(model, teacher or None) of `arm`.

    ctx: task, cfg, fp_ln, fp_plain (FP32 checkpoints), calib (list of input batches),
    qconfig_ln / qconfig_plain, and for D "b_lam" (B's final lam per node), for H "tau_fp"
    (FP32-LN's log-energy offsets per node).
    """
    task, cfg = ctx["task"], ctx["cfg"]
    src = ctx["fp_plain"] if arm == "G" else ctx["fp_ln"]
    model = copy.deepcopy(src).requires_grad_(True)
    if arm != "G":
        configure_nodes(model, task, controller=arm in CONTROLLED, cfg=cfg,
                        tau=ctx.get("tau_fp") if arm == "H" else None,
                        lam=ctx.get("b_lam") if arm == "D" else None)
    if arm in QUANTIZED:
        model = q2ext.prepare(model, ctx["qconfig_plain" if arm == "G" else "qconfig_ln"], inplace=True)
        q2ext.calibrate(model, ctx["calib"])
    reestimate_bn(model, ctx["calib"])
    teacher = copy.deepcopy(ctx["fp_ln"]) if arm == "C" else None
    return model, teacher


def make_distiller(model, teacher, task, cfg):
    """Q-ADA for arm C: taps at the fusion nodes' outputs (the paper's default) unless
    cfg.ada_taps names other modules."""
    taps = [n for n, _ in task.fusion_nodes(model)] if cfg.ada_taps == "nodes" else list(cfg.ada_taps)
    return q2ext.Q2Distiller(model, teacher, taps=taps, weight=cfg.ada_weight, divergence=cfg.ada_divergence,
                             normalize=cfg.ada_normalize, temperature=cfg.ada_temperature)


def _grid(q) -> str:
    """The grid an input quantizer puts on its layer's input, in words."""
    if isinstance(q, LSQPlusQuantizer):
        if bool(q.offset_active):
            return f"LSQ+ {2 ** q.bits} levels from offset {float(q.offset.detach().min()):+.2f}"
        return f"unsigned LSQ {2 ** q.bits} levels"
    if isinstance(q, LSQQuantizer):
        if bool(q.is_signed):
            return f"signed LSQ ({2 ** (q.bits - 1) - 1} positive levels)"
        return f"unsigned LSQ {2 ** q.bits} levels"
    if isinstance(q, PACTQuantizer):
        return f"PACT {2 ** q.bits} levels on [0, alpha]"
    return "float" if q is None else type(q).__name__


def post_fusion_grids(model: nn.Module, task, batch) -> dict:
    """{node name: grid of the quantized layer that reads the node's output directly}."""
    outputs, consumers, handles = {}, {}, []
    for name, m in task.fusion_nodes(model):
        handles.append(m.register_forward_hook(lambda mod, a, out, name=name: outputs.__setitem__(name, out)))
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS):
            def pre(mod, args):
                for node, out in outputs.items():
                    if args and args[0] is out:
                        consumers.setdefault(node, mod)
            handles.append(m.register_forward_pre_hook(pre))
    _probe(model, batch, handles)
    return {node: _grid(getattr(consumers[node], "input_quantizer", None)) if node in consumers else "float"
            for node, _ in task.fusion_nodes(model)}
