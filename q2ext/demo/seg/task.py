"""The segmentation task of ``q2ext demo``: ultrasound-like lesions, a deep narrow U-Net, mDICE."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..task import Recipe, Task
from .data import NUM_CLASSES, UltrasoundConfig, generate
from .model import UNet


@dataclass(frozen=True)
class SegSpec:
    """Sizes of the task: data, network, schedule."""

    data: UltrasoundConfig = field(default_factory=UltrasoundConfig)
    n_train: int = 2048
    n_val: int = 256
    n_test: int = 1024
    widths: tuple = (8, 12, 16, 24, 32)
    convs: int = 2
    # Pretraining: Adam.  QAT: SGD + momentum (the paper's detection recipe), which scored A
    # at least as well as Adam on validation and under which a per-branch gradient scale -
    # what Q-GBFusion's alpha sets - is the branch's step size instead of being normalised
    # away (python/efficacy, bench/RESULTS.md).
    recipe: Recipe = field(default_factory=lambda: Recipe(
        optimizer="adam", qat_optimizer="sgd", fp_lr=3e-3, qat_lr=1e-2, momentum=0.9, batch_size=32, fp_epochs=10,
        qat_epochs=4, patience=4, evals_per_epoch=2))  # sized for the 10-minute run on 2 cores


QUICK = SegSpec(data=UltrasoundConfig(size=32, chunk=64), n_train=96, n_val=48, n_test=48, widths=(4, 6, 8), convs=1,
                recipe=Recipe(optimizer="adam", fp_lr=3e-3, qat_lr=1e-3, batch_size=16, fp_epochs=2, qat_epochs=1,
                              patience=2, evals_per_epoch=2))

# Streams of the three splits: disjoint draws of the same generator.
_SPLIT_OFFSET = {"train": 0, "val": 7_919, "test": 15_485_863}


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - mean foreground soft Dice of a batch (pooled over the batch's pixels per class)."""
    prob = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(prob.dtype)
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


class SegTask(Task):
    """Lesion segmentation on procedural B-mode images (q2ext.demo.seg.data), mDICE over the
    three lesion classes.  Loss: cross-entropy + soft Dice (the usual pair for small
    foreground structures).  Fusion nodes ``decoders.<i>.fuse``, deepest first."""

    name = "seg"
    score_name = "mDICE"

    def __init__(self, spec: SegSpec = SegSpec(), quick_spec: SegSpec = QUICK):
        self.spec, self.quick_spec = spec, quick_spec

    def __repr__(self):
        return f"SegTask(spec={self.spec!r}, quick_spec={self.quick_spec!r})"

    def _spec(self, quick: bool) -> SegSpec:
        return self.quick_spec if quick else self.spec

    def recipe(self, quick: bool) -> Recipe:
        return self._spec(quick).recipe

    def make_splits(self, data_seed: int, quick: bool) -> dict:
        spec = self._spec(quick)
        sizes = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
        splits = {k: generate(n, data_seed + _SPLIT_OFFSET[k], spec.data) for k, n in sizes.items()}
        # one standardisation for all splits, from the training images
        mean, std = splits["train"][0].mean(), splits["train"][0].std()
        return {k: ((x - mean) / std, y) for k, (x, y) in splits.items()}

    def build_model(self, seed: int, gbfusion: bool, quick: bool) -> nn.Module:
        spec = self._spec(quick)
        torch.manual_seed(seed)
        return UNet(1, NUM_CLASSES, spec.widths, spec.convs, gbfusion=gbfusion)

    def fusion_nodes(self, model: nn.Module) -> list:
        nodes = [(n, m) for n, m in model.named_modules() if n.startswith("decoders.") and n.endswith(".fuse")]
        return sorted(nodes, key=lambda nm: int(nm[0].split(".")[1]))

    def loss(self, model, images, targets):
        logits = model(images)
        return F.cross_entropy(logits, targets) + soft_dice_loss(logits, targets)

    @torch.no_grad()
    def predict(self, model, images, batch_size: int = 256) -> torch.Tensor:
        """Class index per pixel [N, H, W] (model in eval mode; its mode is restored)."""
        was_training = model.training
        model.eval()
        out = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
        model.train(was_training)
        return out

    def evaluate(self, model, images, targets) -> dict:
        """mDICE (%): per lesion class, Dice of all its pixels in the split pooled (torchmetrics
        DiceScore, global aggregation), averaged over the three classes; also per class."""
        from torchmetrics.segmentation import DiceScore

        metric = DiceScore(num_classes=NUM_CLASSES, include_background=False, average="none",
                           aggregation_level="global", input_format="index").to(images.device)
        metric.update(self.predict(model, images), targets)
        per_class = (100.0 * metric.compute().nan_to_num(0.0)).tolist()
        return {"score": sum(per_class) / len(per_class), "per_class": per_class}

    def select(self, targets, index):
        return targets[index]

    def augment(self, images, targets, generator):
        """Random left-right flips (a B-mode image is laterally symmetric; depth is not)."""
        flip = torch.rand(len(images), generator=generator) < 0.5
        flip = flip.to(images.device)
        return (torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images),
                torch.where(flip.view(-1, 1, 1), targets.flip(-1), targets))


def spec_with(**changes) -> SegSpec:
    """The default spec with some fields replaced (``recipe`` fields may be given as a dict)."""
    recipe = changes.pop("recipe", None)
    spec = dataclasses.replace(SegSpec(), **changes)
    if isinstance(recipe, dict):
        spec = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, **recipe))
    return spec
