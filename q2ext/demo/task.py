"""What the demo protocol needs from a task: the segmentation task and the detection task
both implement :class:`Task`, and ``q2ext.demo.protocol`` runs the same arms, schedule and
statistics over either.

A split is ``(images, targets)``: ``images`` a float32 tensor ``[N, C, H, W]`` (C = 3 for
detection, 1 for the ultrasound-like segmentation images); ``targets``
a ``[N, H, W]`` int64 class-index tensor (segmentation) or a list of N dicts
``{"boxes": float32 [n_i, 4] (x1, y1, x2, y2, pixels), "labels": int64 [n_i]}``
(detection).  Everything a task generates is deterministic per ``data_seed``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..qconfig import QConfig


@dataclass(frozen=True)
class Recipe:
    """The training recipe of a task (the paper's: SGD for detection, Adam for segmentation)."""

    optimizer: str = "adam"          # "adam" or "sgd"
    qat_optimizer: str = ""          # the QAT phase's, when it differs ("": the same as optimizer)
    fp_lr: float = 1e-2
    qat_lr: float = 1e-3
    momentum: float = 0.9            # SGD only
    weight_decay: float = 0.0
    batch_size: int = 32
    fp_epochs: int = 40
    qat_epochs: int = 15
    patience: int = 5                # early stopping on the validation score (in validation points)
    evals_per_epoch: int = 1         # validation points per epoch (finer curves for the convergence statistics)


class Task(ABC):
    """One demo task.  ``name`` is "seg" or "det"; ``score_name`` e.g. "mDICE" or "mAP50-95"."""

    name: str
    score_name: str

    @abstractmethod
    def recipe(self, quick: bool) -> Recipe:
        """The schedule at full size or at the ``--quick`` smoke size."""

    @abstractmethod
    def make_splits(self, data_seed: int, quick: bool) -> dict:
        """``{"train": split, "val": split, "test": split}`` (see the module doc)."""

    @abstractmethod
    def build_model(self, seed: int, gbfusion: bool, quick: bool) -> nn.Module:
        """The FP32 network, initialised from ``seed``.  With ``gbfusion`` every fusion node
        is a ``q2ext.nn.GBFusion`` (controller frozen, alpha = 1/K, LayerNorm on); without,
        the plain concat/add.  The fusion nodes are the same modules either way, so
        ``fusion_nodes`` finds them in both."""

    @abstractmethod
    def fusion_nodes(self, model: nn.Module) -> list:
        """``[(qualified name, module)]`` of the fusion nodes, in a fixed order (shallow to deep
        or the reverse, stated by the task), for the gradient-energy premise check."""

    def deep_branch(self, node_name: str) -> int:
        """Index of the deeper branch of a fusion node (the one whose input passed through more
        layers), for the premise check's G_deep / G_shallow.  Default: branch 0."""
        return 0

    @abstractmethod
    def loss(self, model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
        """The training loss of a mini-batch (model in train mode)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, images: torch.Tensor, targets) -> dict:
        """Scores of a split in percent, higher is better: ``{"score": ..., **others}``
        (detection: score = mAP@0.5:0.95, plus "map50")."""

    @abstractmethod
    def select(self, targets, index: torch.Tensor):
        """The targets of the samples at ``index`` (a mini-batch)."""

    def augment(self, images: torch.Tensor, targets, generator: torch.Generator):
        """A mini-batch's augmentation, drawn from ``generator`` only (the protocol gives every
        arm of a seed the same generator stream, hence the same batches).  Default: none."""
        return images, targets

    def class_logits(self, output) -> list:
        """The class-logit maps ``[N, classes, ...]`` in a model output, for the argmax
        agreement of the deployment check.  Default: the output itself."""
        return [output]

    def qconfig(self, bits: int, quantizer: str):
        """The QConfig of every QAT arm: W<bits>A<bits>, one activation-quantizer policy."""
        return QConfig(w_bits=bits, a_bits=bits, a_quantizer=quantizer)
