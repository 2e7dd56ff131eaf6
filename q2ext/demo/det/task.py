"""The detection task of ``q2ext demo --task det`` (the :class:`q2ext.demo.task.Task` contract).

Data: q2ext.demo.det.data (procedural scenes); model: q2ext.demo.det.model (FPN + PAN,
fusion nodes ``neck.td3, neck.td2, neck.pan3, neck.pan4``, shallow to deep); targets, loss
and decoding: q2ext.demo.det.fcos; score: COCO mAP@0.5:0.95 in percent
(torchmetrics ``MeanAveragePrecision``, pycocotools backend), plus mAP@0.5.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from q2ext.nn import GBFusion
from q2ext.qconfig import QConfig

from ..task import Recipe, Task
from . import fcos
from .data import NUM_CLASSES, SceneConfig, make_splits
from .model import FUSION_NODES, Add, Concat, TinyDetector


@dataclass(frozen=True)
class DetConfig:
    """Sizes of the detection task (full and --quick share the model; quick has less data).

    The recipe is the paper's detection recipe (SGD with momentum and weight decay) with
    the learning rates scaled for training from scratch: the FP32 pretrain at 0.1 (the
    paper fine-tunes at 0.00334), QAT at a tenth of it; momentum 0.9 rather than the
    paper's 0.748 (its fine-tuning value), weight decay the paper's 2.5e-4 order.
    """

    scene: SceneConfig = field(default_factory=SceneConfig)
    train: int = 4096
    val: int = 256
    test: int = 512
    quick_train: int = 256
    quick_val: int = 64
    quick_test: int = 64
    widths: tuple = (16, 24, 48, 64)
    convs: int = 2
    neck: int = 32
    act: str = "relu"
    top_down: str = "add"
    eval_batch: int = 256
    recipe: Recipe = field(default_factory=lambda: Recipe(
        optimizer="sgd", fp_lr=0.1, qat_lr=0.01, momentum=0.9, weight_decay=2.5e-4, batch_size=64,
        fp_epochs=8, qat_epochs=3, patience=3))
    quick_recipe: Recipe = field(default_factory=lambda: Recipe(
        optimizer="sgd", fp_lr=0.1, qat_lr=0.01, momentum=0.9, weight_decay=2.5e-4, batch_size=64,
        fp_epochs=3, qat_epochs=1, patience=1))


class DetTask(Task):
    """FPN + PAN FCOS-style detection of four shape classes on 64 px procedural scenes.

    ``changes`` override DetConfig fields (e.g. ``DetTask(neck=24, act="silu")``).
    """

    name = "det"
    score_name = "mAP50-95"

    def __init__(self, cfg: DetConfig | None = None, **changes):
        cfg = cfg or DetConfig()
        self.cfg = dataclasses.replace(cfg, **changes) if changes else cfg

    def recipe(self, quick: bool) -> Recipe:
        return self.cfg.quick_recipe if quick else self.cfg.recipe

    def make_splits(self, data_seed: int, quick: bool) -> dict:
        c = self.cfg
        sizes = ({"train": c.quick_train, "val": c.quick_val, "test": c.quick_test} if quick
                 else {"train": c.train, "val": c.val, "test": c.test})
        return make_splits(data_seed, sizes, c.scene)

    def build_model(self, seed: int, gbfusion: bool, quick: bool) -> nn.Module:
        torch.manual_seed(seed)
        c = self.cfg
        model = TinyDetector(NUM_CLASSES, c.widths, c.convs, c.neck, c.act, gbfusion,
                             fcos.EXTRA_OUTPUTS, fcos.PRIOR, fcos.prior_channels(NUM_CLASSES), c.top_down)
        return model.to(memory_format=torch.channels_last)

    def fusion_nodes(self, model: nn.Module) -> list:
        """The four neck fusion nodes in forward order, which is shallow to deep."""
        modules = dict(model.named_modules())
        nodes = []
        for name in FUSION_NODES:
            m = modules.get(name)
            if not isinstance(m, (Add, Concat, GBFusion)):
                raise TypeError(f"DetTask.fusion_nodes: {name!r} is not a fusion node in this model "
                                 f"(found {type(m).__name__})")
            nodes.append((name, m))
        return nodes

    def loss(self, model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
        return fcos.loss(model(images), targets, NUM_CLASSES)

    def predict(self, model: nn.Module, images: torch.Tensor) -> list:
        """Detections of ``images`` (model in eval mode): list of {"boxes", "scores", "labels"} on the CPU."""
        was_training = model.training
        model.eval()
        dets = []
        with torch.no_grad():
            for i in range(0, len(images), self.cfg.eval_batch):
                x = images[i:i + self.cfg.eval_batch]
                dets += fcos.decode(model(x), NUM_CLASSES, x.shape[-2:])
        model.train(was_training)
        return dets

    def evaluate(self, model: nn.Module, images: torch.Tensor, targets) -> dict:
        return score_detections(self.predict(model, images), targets)

    def select(self, targets, index: torch.Tensor):
        return [targets[i] for i in index.tolist()]

    def class_logits(self, output) -> list:
        return [level[:, :NUM_CLASSES] for level in output]

    def qconfig(self, bits: int, quantizer: str):
        """W<bits>A<bits>; the stem conv (first layer, by QConfig's rule) and all three
        heads' predictors stay 8 bit - the last-layer rule of the paper, per level."""
        return QConfig(w_bits=bits, a_bits=bits, a_quantizer=quantizer,
                       overrides={"heads.*.pred": {"w_bits": 8, "a_bits": 8}})


def score_detections(dets: list, targets: list) -> dict:
    """COCO box mAP in percent: {"score": mAP@0.5:0.95, "map50": mAP@0.5, "map75": mAP@0.75}."""
    from torchmetrics.detection import MeanAveragePrecision

    if len(dets) != len(targets):
        raise ValueError(f"score_detections: {len(dets)} predictions for {len(targets)} targets")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.update(dets, [{"boxes": t["boxes"].cpu().float(), "labels": t["labels"].cpu().long()} for t in targets])
    r = metric.compute()
    return {"score": 100.0 * max(float(r["map"]), 0.0), "map50": 100.0 * max(float(r["map_50"]), 0.0),
            "map75": 100.0 * max(float(r["map_75"]), 0.0)}
