"""Training pieces of ``q2ext demo``: the variants, the gradient-energy probe, the loop.

Gradient energy.  At a fusion node with branch inputs F_1..F_K, G_i = ||dL/dF_i||_2 over
the mini-batch: the gradient that reaches branch i *through the fusion node* (before
alpha under Q-GBFusion; the same quantity ``GBFusion`` feeds its controller).  The
probe measures it the same way in every variant, with or without a GBFusion module: a
forward pre-hook on the node hands it ``x.view_as(x)`` of each branch (a fresh autograd
node, so the skip tensor's other consumer - the next encoder stage - does not add to its
gradient) and a tensor hook sums grad**2.  Energies stay on the device; the host reads
them once per epoch.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import q2ext
from q2ext.nn import GBFusion

from .data import NUM_CLASSES
from .model import Concat, TinyUNet

VARIANTS = ("qat", "qat+gbf", "qat+gbf+ada", "fp32+gbf")


def fusion_nodes(model: nn.Module) -> list:
    """[(name, module)] of the fusion nodes: the GBFusion where one was inserted, else the Concat."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Concat, GBFusion))]


class EnergyProbe:
    """Per-step gradient energy of every branch of every fusion node (see the module doc)."""

    def __init__(self, model: nn.Module, device):
        self.names = [n for n, _ in fusion_nodes(model)]
        nodes = [m for _, m in fusion_nodes(model)]
        k = 2  # every demo node merges (up, skip)
        self._step = torch.zeros(len(nodes), k, dtype=torch.float64, device=device)
        self._sum = torch.zeros_like(self._step)
        self._count = 0
        self._handles = [m.register_forward_pre_hook(self._pre(i)) for i, m in enumerate(nodes)]

    def _pre(self, idx):
        def hook(module, args):
            branches = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            if not (torch.is_grad_enabled() and module.training):
                return None
            fresh = []
            for b, x in enumerate(branches):
                y = x.view_as(x)
                if y.requires_grad:
                    y.register_hook(self._tensor_hook(idx, b))
                fresh.append(y)
            return (fresh,)
        return hook

    def _tensor_hook(self, idx, b):
        def hook(grad):
            self._step[idx, b] += grad.detach().to(torch.float64).square().sum()
        return hook

    def step(self) -> None:
        """After each backward: fold this step's G_i into the epoch sums."""
        self._sum += self._step.sqrt()
        self._step.zero_()
        self._count += 1

    def epoch(self) -> list:
        """Mean G_i over the epoch's steps, [[G_up, G_skip] per node], and reset."""
        out = (self._sum / max(self._count, 1)).cpu().tolist()
        self._sum.zero_()
        self._count = 0
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def balance_ratio(energies) -> float:
    """Mean over nodes of max_i G_i / min_i G_i (1 = perfectly balanced)."""
    ratios = [max(e) / min(e) if min(e) > 0 else math.inf for e in energies]
    return sum(ratios) / len(ratios)


def mdice(model, images, masks, batch_size=128) -> float:
    """Mean foreground Dice (%) over the set: per class, Dice of all its pixels pooled
    (torchmetrics DiceScore, global aggregation), averaged over the foreground classes."""
    from torchmetrics.segmentation import DiceScore

    metric = DiceScore(num_classes=NUM_CLASSES, include_background=False, average="none",
                       aggregation_level="global", input_format="index").to(images.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            metric.update(model(images[i:i + batch_size]).argmax(1), masks[i:i + batch_size])
    model.train(was_training)
    return 100.0 * float(metric.compute().nan_to_num(0.0).mean())


def build_fp32(cfg, seed: int) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet(3, NUM_CLASSES, cfg.width, cfg.depth, cfg.convs)


def qconfig(cfg) -> q2ext.QConfig:
    """W<bits>A<bits> with the chosen activation quantizer; first/last layers 8 bit (paper)."""
    overrides = {}
    if cfg.quantizer == "pact":
        # PACT clips to [0, alpha]; under Q-GBFusion the conv after each node reads
        # LayerNorm output, which is signed, so those convs use LSQ+ in every variant.
        overrides = {"decoders.*.block.0": {"a_quantizer": "lsq+"}}
    return q2ext.QConfig(w_bits=cfg.bits, a_bits=cfg.bits, a_quantizer=cfg.quantizer, overrides=overrides)


def build_variant(variant: str, fp32: nn.Module, cfg, example, calib_batches):
    """The model of one variant, from (a deep copy of) the trained FP32 model."""
    model = copy.deepcopy(fp32).requires_grad_(True)
    if "gbf" in variant:
        # Insert into the float model first, then quantize: the quantizers then see (and
        # initialise from) the LayerNorm'd features the trained model will feed them.
        report = q2ext.insert_gbfusion(model, example_inputs=(example,), beta=cfg.gbf_beta, eta=cfg.gbf_eta)
        if len(report) != cfg.depth:
            raise RuntimeError(f"q2ext demo: expected {cfg.depth} fusion nodes, insert_gbfusion found:\n{report}")
        model = report.model
    if variant.startswith("qat"):
        model = q2ext.prepare(model, qconfig(cfg), inplace=True)
        q2ext.calibrate(model, calib_batches)
    reestimate_bn(model, calib_batches)
    return model


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches) -> None:
    """Recompute every BatchNorm's running statistics on `batches` (same for every variant).

    Model surgery changes the features the BNs see (a LayerNorm at each fusion node,
    quantized inputs); without this the first evaluations measure stale statistics,
    not the variant.  No parameter changes; GBFusion's controller runs only in backward.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    model.train(was_training)
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum


def fit(model, data, cfg, *, epochs, lr, patience, seed, teacher=None, desc="", progress=True):
    """Adam + cosine schedule, validation mDICE each epoch, early stopping; restores the best.

    data: (train_x, train_y, val_x, val_y) on the device.  teacher: the frozen FP32 model
    for Q-ADA (taps: the decoder stage outputs, see q2ext.demo docs).  Returns the history:
    steps/mdice per epoch (epoch 0 = before training), best, best_step, energies per epoch,
    alpha per epoch (GBFusion nodes), seconds.
    """
    from tqdm.auto import tqdm

    xt, yt, xv, yv = data
    device = xt.device
    gen = torch.Generator().manual_seed(seed + 7919)
    steps_per_epoch = max(1, len(xt) // cfg.batch_size)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    probe = EnergyProbe(model, device)
    distiller = None
    if teacher is not None:
        taps = [f"decoders.{i}" for i in range(cfg.depth)]
        distiller = q2ext.Q2Distiller(model, teacher, taps=taps, weight=cfg.ada_weight,
                                      divergence=cfg.ada_divergence, normalize=cfg.ada_normalize)
    hist = {"steps": [0], "mdice": [mdice(model, xv, yv)], "energy": [], "alpha": [], "ada_loss": []}
    best, best_step, best_state, bad = hist["mdice"][0], 0, copy.deepcopy(model.state_dict()), 0
    start, step = time.perf_counter(), 0
    bar = tqdm(range(1, epochs + 1), desc=desc, leave=False, disable=not progress, unit="ep")
    for ep in bar:
        model.train()
        perm = torch.randperm(len(xt), generator=gen).to(device)
        ada_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x, y = xt[idx], yt[idx]
            loss = F.cross_entropy(model(x), y)
            if distiller is not None:
                ada = distiller(x)
                ada_sum += ada.detach()
                loss = loss + ada
            opt.zero_grad(set_to_none=True)
            loss.backward()
            probe.step()
            opt.step()
            sched.step()
            step += 1
        score = mdice(model, xv, yv)
        hist["steps"].append(step)
        hist["mdice"].append(score)
        hist["energy"].append(probe.epoch())
        hist["ada_loss"].append(float(ada_sum) / steps_per_epoch)
        hist["alpha"].append([m.alpha.tolist() for _, m in fusion_nodes(model) if isinstance(m, GBFusion)])
        bar.set_postfix(mdice=f"{score:.1f}", best=f"{max(best, score):.1f}")
        if score > best:
            best, best_step, bad = score, step, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    bar.close()
    probe.remove()
    if distiller is not None:
        distiller.remove()  # hooks hold closures: the model must be hook-free to be pickled
    model.load_state_dict(best_state)
    hist.update(best=best, best_step=best_step, seconds=time.perf_counter() - start,
                steps_per_epoch=steps_per_epoch, epochs_run=len(hist["steps"]) - 1,
                balance_ratio=balance_ratio(hist["energy"][-1]) if hist["energy"] else math.nan,
                deep_over_skip=_deep_over_skip(hist["energy"][-1]) if hist["energy"] else math.nan)
    return hist


def _deep_over_skip(energies) -> float:
    """Mean over nodes of G_up / G_skip (> 1: the deep branch gets more gradient)."""
    return sum(e[0] / e[1] if e[1] > 0 else math.inf for e in energies) / len(energies)
