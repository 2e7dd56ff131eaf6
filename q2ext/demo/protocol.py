"""The ``q2ext demo`` protocol: FP32 checkpoints -> the arms -> test scores, per seed.

Per seed: train (or load from the cache) the FP32-LN checkpoint (fusion nodes as frozen
GBFusion from the start) and the FP32 checkpoint (plain fusion nodes); then run every arm
(q2ext.demo.arms) on the task's QAT schedule from the same checkpoint, with the same
mini-batches; each run keeps its best *validation* point; the kept model is scored once
on the *test* split.  The premise check probes the branch gradient energies of the
FP32-LN checkpoint and of the quantized models before training on the same fixed batches,
and the training runs record them throughout.  Statistics: q2ext.demo.summary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from . import arms as arms_mod
from .config import DemoConfig, cache_dir, get_task
from .deploy import run_deploy
from .summary import summarize
from .train import fit, probe_energy

CACHE_VERSION = 2  # bump when the FP32 training changes meaning
_RECIPE_FP = ("optimizer", "fp_lr", "momentum", "weight_decay", "batch_size", "fp_epochs")


def recipe_of(task, cfg: DemoConfig):
    """The task's recipe with cfg.recipe's replacements."""
    return dataclasses.replace(task.recipe(cfg.quick), **cfg.recipe)


def arm_list(cfg: DemoConfig) -> tuple:
    if cfg.arms is not None:
        unknown = [a for a in cfg.arms if a not in arms_mod.ARMS]
        if unknown:
            raise ValueError(f"DemoConfig.arms: unknown arm(s) {unknown}; known: {list(arms_mod.ARMS)}")
        if "D" in cfg.arms and ("B" not in cfg.arms or cfg.arms.index("B") > cfg.arms.index("D")):
            raise ValueError("DemoConfig.arms: arm D replays B's final alpha, so B must run before it")
        return tuple(cfg.arms)
    return arms_mod.FULL_ARMS if cfg.full else arms_mod.BASE_ARMS


def _pretrain_key(task, cfg, recipe, splits, seed, gbfusion, model) -> str:
    """A digest of everything the FP32 checkpoint depends on: the settings, the model's
    structure and initial weights, and the training and validation data themselves."""
    h = hashlib.sha256()
    meta = {"task": task.name, "seed": seed, "gbfusion": gbfusion, "ln_eps": cfg.ln_eps if gbfusion else None,
            "quick": cfg.quick, "data_seed": cfg.data_seed, "version": CACHE_VERSION,
            "recipe": {k: getattr(recipe, k) for k in _RECIPE_FP},
            "device": torch.device(cfg.device).type, "torch": torch.__version__.split("+")[0]}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(str(model).encode())
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for split in ("train", "val"):
        for part in splits[split]:
            if isinstance(part, torch.Tensor):
                h.update(part.detach().cpu().contiguous().numpy().tobytes())
    return f"{task.name}_{'fp32ln' if gbfusion else 'fp32'}_seed{seed}_{h.hexdigest()[:16]}"


def pretrain(task, cfg, recipe, splits, seed: int, gbfusion: bool, progress=True, log=print, memo=None):
    """(FP32 model, its history): from `memo` (a dict kept for one run, so seeds that share
    the FP seed use one model), else from the cache when a checkpoint of this exact setting
    exists, else trained and cached.  The model must not be modified (arms copy it)."""
    device = splits["train"][0].device
    model = task.build_model(seed, gbfusion, cfg.quick)
    if gbfusion:
        for _, m in task.fusion_nodes(model):
            m.eps = float(cfg.ln_eps)
        arms_mod.configure_nodes(model, task, controller=False, cfg=cfg)
    model = model.to(device)
    name = "FP32-LN" if gbfusion else "FP32"
    path = cache_dir() / "demo" / f"{_pretrain_key(task, cfg, recipe, splits, seed, gbfusion, model)}.pt"
    memo = {} if memo is None else memo
    if path not in memo:
        memo[path] = _load_or_train(task, cfg, recipe, splits, seed, gbfusion, model, path, name, progress, log)
    return memo[path]


def _load_or_train(task, cfg, recipe, splits, seed, gbfusion, model, path, name, progress, log):
    device = splits["train"][0].device
    if path.exists():
        try:
            # weights_only: the cache holds a state_dict and a history of numbers only
            saved = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(saved["state_dict"])
            log(f"seed {seed}: {name} checkpoint from the cache {path}")
            return model, dict(saved["history"], cached=True)
        except Exception as exc:  # a stale or truncated file: train again and overwrite it
            warnings.warn(f"q2ext demo: ignoring unreadable cache {path}: {exc}")
    # Pretraining from scratch runs its whole budget (an early plateau is not convergence);
    # the best validation point (one per epoch) is kept.
    hist = fit(model, task, splits, dataclasses.replace(recipe, evals_per_epoch=1), lr=recipe.fp_lr,
               epochs=recipe.fp_epochs, seed=seed,
               desc=f"seed {seed} {name}", progress=progress, early_stopping=False, qat=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": model.state_dict(), "history": hist}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    except OSError as exc:
        warnings.warn(f"q2ext demo: cannot write the FP32 cache {path}: {exc}")
    return model, dict(hist, cached=False)


def _log_offsets(energies) -> list:
    """Per node: log G_i - mean_j log G_j (the controller's error before tau)."""
    out = []
    for g in energies:
        logs = [math.log(max(v, 1e-30)) for v in g]
        mean = sum(logs) / len(logs)
        out.append([v - mean for v in logs])
    return out


def run_seed(task, cfg: DemoConfig, recipe, splits, seed: int, out_dir: Path, progress=True, log=print,
             memo=None):
    """Every arm of one seed.  Returns (runs, FP32-LN model): runs holds "FP32-LN", "FP32" and
    each arm (history + test scores), "start" (the energy probes), "grids", "tau_fp",
    "node_names"."""
    fp_seed = seed if cfg.fp_seed is None else cfg.fp_seed
    memo = {} if memo is None else memo
    fp_ln, ln_hist = pretrain(task, cfg, recipe, splits, fp_seed, True, progress, log, memo)
    arms = arm_list(cfg)
    fp_plain, plain_hist = (pretrain(task, cfg, recipe, splits, fp_seed, False, progress, log, memo) if "G" in arms
                            else (None, None))
    xt, yt = splits["train"]
    bs = recipe.batch_size
    calib = [xt[i * bs:(i + 1) * bs] for i in range(cfg.calib_batches)]
    probe = dict(images=xt, targets=yt, batch_size=bs, batches=cfg.probe_batches)

    def checkpoint_numbers(model):
        """(energy probe, test scores) of an FP32 checkpoint: deterministic, so computed
        once per run for the seeds that share it."""
        key = ("numbers", id(model))
        if key not in memo:
            memo[key] = (probe_energy(model, task, **probe), task.evaluate(model, *splits["test"]))
        return memo[key]

    ln_probe, ln_test = checkpoint_numbers(fp_ln)
    start = {"FP32-LN": ln_probe}

    def qconfig(float_model):
        return arms_mod.qconfig(task, float_model, cfg.bits, cfg.quantizer, calib[0], cfg.w_per_channel,
                                cfg.edge_bits)

    ctx = {"task": task, "cfg": cfg, "fp_ln": fp_ln, "fp_plain": fp_plain, "calib": calib,
           "qconfig_ln": qconfig(fp_ln), "tau_fp": _log_offsets(start["FP32-LN"])}
    runs = {"FP32-LN": dict(ln_hist, test=ln_test)}
    if fp_plain is not None:
        plain_probe, plain_test = checkpoint_numbers(fp_plain)
        start["FP32"] = plain_probe
        ctx["qconfig_plain"] = qconfig(fp_plain)
        runs["FP32"] = dict(plain_hist, test=plain_test)
    grids = {}
    for arm in arms:
        model, teacher = arms_mod.build_arm(arm, ctx)
        if arm in arms_mod.QUANTIZED:
            grids[arm] = arms_mod.post_fusion_grids(model, task, calib[0])
            if arm in ("A", "G"):
                start[arm] = probe_energy(model, task, **probe)
        distiller = arms_mod.make_distiller(model, teacher, task, cfg) if teacher is not None else None
        try:
            hist = fit(model, task, splits, recipe, lr=recipe.qat_lr, epochs=recipe.qat_epochs, seed=seed,
                       distiller=distiller, desc=f"seed {seed} arm {arm}", progress=progress)
        finally:
            if distiller is not None:
                distiller.remove()  # hooks hold closures: the model must be hook-free to be pickled
        hist["test"] = task.evaluate(model, *splits["test"])
        if arm == "B":
            ctx["b_lam"] = [m.lam.tolist() for _, m in task.fusion_nodes(model)]
        runs[arm] = hist
        log(f"seed {seed} arm {arm}: val best {hist['best']:.2f} at step {hist['best_step']}, "
            f"test {hist['test']['score']:.2f} ({hist['seconds']:.0f} s)")
        if cfg.save_models:
            models = out_dir / "models"
            models.mkdir(parents=True, exist_ok=True)
            # The whole module is pickled: load it with torch.load(path, weights_only=False),
            # only from a source you trust.
            torch.save(model.cpu(), models / f"arm{arm}_seed{seed}.pt")
            model.to(xt.device)
    runs["start"] = start
    runs["node_names"] = [n for n, _ in task.fusion_nodes(fp_ln)]
    runs["deep_branch"] = [task.deep_branch(n) for n in runs["node_names"]]
    runs["grids"] = grids
    runs["tau_fp"] = ctx["tau_fp"]
    return runs, fp_ln


def run(cfg: DemoConfig, out_dir, progress=True, log=print, task=None) -> dict:
    """Run the whole protocol; returns the results dict (every number report.py writes).
    `task`: a task instance to use instead of the registered ``cfg.task`` (exploration)."""
    out_dir = Path(out_dir)
    task = get_task(cfg.task) if task is None else task
    recipe = recipe_of(task, cfg)
    device = torch.device(cfg.device)
    start = time.perf_counter()
    splits = task.make_splits(cfg.data_seed, cfg.quick)
    splits = {k: (x.to(device), y.to(device) if isinstance(y, torch.Tensor) else y) for k, (x, y) in splits.items()}
    per_seed, first_fp_ln, memo = {}, None, {}
    for seed in cfg.seeds:
        per_seed[str(seed)], fp_ln = run_seed(task, cfg, recipe, splits, seed, out_dir, progress, log, memo)
        first_fp_ln = fp_ln if first_fp_ln is None else first_fp_ln
    deploy = None
    if cfg.deploy:
        deploy = run_deploy(task, cfg, recipe, first_fp_ln, splits, cfg.seeds[0], progress, log)
    config = dataclasses.asdict(cfg)
    config.update(seeds=list(cfg.seeds), arms=list(arm_list(cfg)), recipe=dataclasses.asdict(recipe),
                  score_name=task.score_name, task_repr=repr(task),
                  split_sizes={k: len(x) for k, (x, _) in splits.items()})
    results = {"config": config, "seeds": per_seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "deploy": deploy}
    results.update(summarize(task, per_seed, arm_list(cfg)))
    results["wall_seconds"] = time.perf_counter() - start
    return results
