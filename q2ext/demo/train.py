"""The training loop of ``q2ext demo`` (any :class:`~q2ext.demo.task.Task`) and its gradient probe.

Gradient energy.  At a fusion node with branch inputs F_1..F_K, G_i = ||dL/dF_i||_2 over
the mini-batch: the gradient that reaches branch i *through the fusion node* (before
alpha under Q-GBFusion; the quantity ``GBFusion`` feeds its controller).  The probe
measures it the same way in every arm, plain concat or GBFusion, frozen or not: a forward
pre-hook on the node hands it ``x.view_as(x)`` of each branch (a fresh autograd node, so
the branch's other consumers - the next encoder stage - do not add to it) and a tensor
hook sums grad**2.  Energies stay on the device until a validation point reads them.

Same data per seed.  Every run of a seed draws its batch order and augmentation from
one generator seeded by the seed alone, and nothing else draws from it, so every arm of
a seed sees the same mini-batches in the same order.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from q2ext.nn import GBFusion

MAX_BRANCHES = 16


def data_generator(seed: int) -> torch.Generator:
    """The batch-order/augmentation stream of a seed (the same in every arm)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)


class EnergyProbe:
    """Per-step gradient energy of every branch of every fusion node (see the module doc)."""

    def __init__(self, model: nn.Module, task, device):
        nodes = task.fusion_nodes(model)
        self.names = [n for n, _ in nodes]
        self.k = [None] * len(nodes)
        self._step = torch.zeros(len(nodes), MAX_BRANCHES, dtype=torch.float64, device=device)
        self._sum = torch.zeros_like(self._step)
        self._count = 0
        self._handles = [m.register_forward_pre_hook(self._pre(i)) for i, (_, m) in enumerate(nodes)]

    def _pre(self, idx):
        def hook(module, args):
            as_list = len(args) == 1 and isinstance(args[0], (list, tuple))
            branches = list(args[0]) if as_list else list(args)
            self.k[idx] = len(branches)
            if not (torch.is_grad_enabled() and module.training):
                return None
            fresh = []
            for b, x in enumerate(branches):
                y = x.view_as(x)
                if y.requires_grad:
                    y.register_hook(self._tensor_hook(idx, b))
                fresh.append(y)
            return (fresh,) if as_list else tuple(fresh)
        return hook

    def _tensor_hook(self, idx, b):
        def hook(grad):
            self._step[idx, b] += grad.detach().to(torch.float64).square().sum()
        return hook

    def step(self) -> None:
        """After each backward: fold this step's G_i into the running sums."""
        self._sum += self._step.sqrt()
        self._step.zero_()
        self._count += 1

    def take(self) -> list:
        """Mean G_i over the steps since the last call, ``[[G_1..G_K] per node]``; resets."""
        means = (self._sum / max(self._count, 1)).cpu().tolist()
        self._sum.zero_()
        self._count = 0
        return [row[:k] for row, k in zip(means, self.k) if k is not None]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def probe_energy(model: nn.Module, task, images, targets, batch_size: int, batches: int) -> list:
    """Mean G_i per node over `batches` forward/backward passes of a copy of `model` in train
    mode (fixed leading training batches, no optimizer step, every controller frozen): the
    branch energies of a checkpoint as it stands."""
    probe_model = copy.deepcopy(model)
    for _, m in task.fusion_nodes(probe_model):
        if isinstance(m, GBFusion):
            m.freeze()
    probe_model.train()
    probe = EnergyProbe(probe_model, task, images.device)
    for i in range(batches):
        idx = torch.arange(i * batch_size, (i + 1) * batch_size)
        task.loss(probe_model, images[idx.to(images.device)], task.select(targets, idx)).backward()
        probe.step()
        probe_model.zero_grad(set_to_none=True)
    probe.remove()
    return probe.take()


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches) -> None:
    """Recompute every BatchNorm's running statistics on `batches` (the same in every arm).

    Quantizers change the features the BNs see; without this the first validation points
    measure stale statistics, not the arm.  No parameter changes; GBFusion's controller runs
    only in backward.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    model.train(was_training)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum


def make_optimizer(model: nn.Module, recipe, lr: float, name: str) -> torch.optim.Optimizer:
    """Adam or SGD (momentum) over the trainable parameters; weight decay on weight tensors
    only (ndim > 1), not on biases, norms or quantizer steps/offsets."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum)
    raise ValueError(f"Recipe optimizer must be 'adam' or 'sgd', got {name!r}")


def _alphas(task, model) -> list:
    return [m.alpha.tolist() for _, m in task.fusion_nodes(model) if isinstance(m, GBFusion)]


def fit(model, task, splits, recipe, *, lr: float, epochs: int, seed: int, distiller=None, desc: str = "",
        progress: bool = True, early_stopping: bool = True, qat: bool = True) -> dict:
    """Train `model` on splits["train"] with `recipe` (cosine schedule from `lr` over `epochs`),
    score splits["val"] every 1/evals_per_epoch epoch, stop early after ``recipe.patience``
    points without improvement (with `early_stopping`), and restore the best point's state.

    distiller: a :class:`q2ext.Q2Distiller` whose term is added to the task loss.  qat: the
    QAT phase (its optimizer is ``recipe.qat_optimizer`` when set), else pretraining.
    Returns the history: "steps" and "val" per validation point (point 0 before training),
    "energy" per point ([[G_i] per node], mean over the steps since the previous point),
    "alpha" per point (GBFusion nodes), "aux" (mean distillation term per point), and best,
    best_step, steps_run, seconds.
    """
    from tqdm.auto import tqdm

    xt, yt = splits["train"]
    xv, yv = splits["val"]
    device = xt.device
    steps_per_epoch = max(1, len(xt) // recipe.batch_size)
    eval_every = max(1, steps_per_epoch // recipe.evals_per_epoch)
    total = epochs * steps_per_epoch
    opt = make_optimizer(model, recipe, lr, (recipe.qat_optimizer or recipe.optimizer) if qat else recipe.optimizer)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    gen = data_generator(seed)
    probe = EnergyProbe(model, task, device)
    score = task.evaluate(model, xv, yv)["score"]
    hist = {"steps": [0], "val": [score], "energy": [], "alpha": [_alphas(task, model)], "aux": []}
    best, best_step, best_state, bad = score, 0, copy.deepcopy(model.state_dict()), 0
    aux_sum = torch.zeros((), device=device)
    start, step, stop = time.perf_counter(), 0, False
    bar = tqdm(total=total, desc=desc, leave=False, disable=not progress, unit="step")
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            x, y = task.augment(xt[idx.to(device)], task.select(yt, idx), gen)
            model.train()
            loss = task.loss(model, x, y)
            if distiller is not None:
                aux = distiller(x)
                aux_sum += aux.detach()
                loss = loss + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            probe.step()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % eval_every and step != total:
                continue
            score = task.evaluate(model, xv, yv)["score"]
            points = step - hist["steps"][-1]
            hist["steps"].append(step)
            hist["val"].append(score)
            hist["energy"].append(probe.take())
            hist["alpha"].append(_alphas(task, model))
            hist["aux"].append(float(aux_sum) / points)
            aux_sum.zero_()
            bar.set_postfix(val=f"{score:.1f}", best=f"{max(best, score):.1f}")
            if score > best:
                best, best_step, bad = score, step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if early_stopping and bad >= recipe.patience:
                    stop = True
                    break
        if stop:
            break
    bar.close()
    probe.remove()
    model.load_state_dict(best_state)
    hist.update(best=best, best_step=best_step, steps_run=step, total_steps=total, steps_per_epoch=steps_per_epoch,
                seconds=time.perf_counter() - start, early_stopped=stop)
    return hist


def balance_ratio(energies) -> float:
    """Mean over nodes of max_i G_i / min_i G_i (1 = perfectly balanced)."""
    ratios = [max(e) / min(e) if min(e) > 0 else math.inf for e in energies]
    return sum(ratios) / len(ratios) if ratios else math.nan
