"""Q² QAT of an Ultralytics YOLO detector: Q-GBFusion at the PAN concats, W4A4, a training
step with YOLO's own loss, then the int8 model (q2ext.convert) and the ONNX Q/DQ graph
(q2ext.export_onnx).

    pip install ultralytics==8.4.190        # a recipe/test dependency, not one of q2ext's
    python python/recipes/ultralytics_yolo.py [--cfg yolov8n.yaml] [--imgsz 64] [--steps 2] [--out yolo.onnx]

The model is built from its yaml with no weights (load yours with ``model.load(ckpt)``),
and the batch is synthetic; with your data, the step is the same: ``model.loss(batch)``
on Ultralytics' batch dict (``img``, ``batch_idx``, ``cls``, ``bboxes`` normalised xywh).

Two things are specific to Ultralytics' model class:

* Its forward routes each layer's input by the attributes ``f`` (from which layers), ``i``
  (index), ``type`` and ``np`` that the yaml parser sets on every layer.  insert_gbfusion
  rewrites each ``Concat`` layer into an fx GraphModule, which has no such attributes (and
  a deep copy, which q2ext.prepare/convert/export make, would drop them again), so every
  rewritten layer is wrapped in :class:`Routed`, which carries them.
* The ``DFL`` layer of the Detect head is a fixed 1x1 conv (an expectation over the box
  bins, not learned, used only at inference): it is left in float (``QConfig.skip``).

For multi-process training (Ultralytics' DDP launcher starts fresh workers) rebuild the
prepared model on each rank from the float model with ``q2ext.load_checkpoint``.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("YOLO_OFFLINE", "1")  # no network lookups from Ultralytics' helpers

import torch  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.modules import Concat  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

import q2ext  # noqa: E402

QCONFIG = q2ext.QConfig(w_bits=4, a_bits=4, skip=("model.*.dfl",))


class Routed(nn.Module):
    """An Ultralytics layer replaced by `inner`, keeping the routing attributes the model's
    forward reads (``f``, ``i``, ``type``, ``np``)."""

    def __init__(self, inner: nn.Module, layer: nn.Module):
        super().__init__()
        self.inner = inner
        self.f, self.i, self.type, self.np = layer.f, layer.i, layer.type, layer.np

    def forward(self, x):
        return self.inner(x)


def build_yolo(cfg: str = "yolov8n.yaml", nc: int = 3) -> DetectionModel:
    """An Ultralytics detection model from its yaml (no weights), with the default loss
    hyper-parameters (``model.args``) that ``model.loss`` needs."""
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg()
    return model


def insert_pan_gbfusion(model: DetectionModel, imgsz: int = 64):
    """Q-GBFusion at every ``Concat`` layer (the PAN/FPN concats of the neck; the
    backbone's concats live inside its C2f/C3 blocks and are left alone).  Returns the
    InsertReport; the model is modified in place."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Concat)}
    if not layers:
        raise ValueError("insert_pan_gbfusion: the model has no Ultralytics Concat layer")
    # The example input lets fx trace Concat.forward over its list of feature maps.
    report = q2ext.insert_gbfusion(model, example_inputs=(torch.rand(1, 3, imgsz, imgsz),), names=list(layers))
    for name, layer in layers.items():
        model.model[layer.i] = Routed(model.get_submodule(name), layer)
    return report


def synthetic_batch(n: int = 2, imgsz: int = 64, nc: int = 3, boxes_per_image: int = 2, seed: int = 0) -> dict:
    """Ultralytics' training batch dict: images in [0, 1], one row per box."""
    g = torch.Generator().manual_seed(seed)
    m = n * boxes_per_image
    centre = 0.25 + 0.5 * torch.rand(m, 2, generator=g)
    size = 0.1 + 0.3 * torch.rand(m, 2, generator=g)
    return {
        "img": torch.rand(n, 3, imgsz, imgsz, generator=g),
        "batch_idx": torch.arange(n).repeat_interleave(boxes_per_image).float(),
        "cls": torch.randint(0, nc, (m, 1), generator=g).float(),
        "bboxes": torch.cat([centre, size], 1),
    }


def train_step(model: DetectionModel, batch: dict, opt: torch.optim.Optimizer) -> torch.Tensor:
    """One step with YOLO's own loss (box, cls, dfl); returns the loss items."""
    model.train()
    loss, items = model.loss(batch)
    opt.zero_grad(set_to_none=True)
    loss.sum().backward()
    opt.step()
    return items


def prepare_qat(cfg: str = "yolov8n.yaml", nc: int = 3, imgsz: int = 64, qconfig: q2ext.QConfig = QCONFIG,
                seed: int = 0):
    """Float YOLO -> Q-GBFusion at the PAN concats -> q2ext.prepare; returns (model, report)."""
    torch.manual_seed(seed)
    model = build_yolo(cfg, nc)
    report = insert_pan_gbfusion(model, imgsz)
    return q2ext.prepare(model, qconfig).train(), report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", default="yolov8n.yaml")
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default="yolo_w4a4.onnx")
    a = p.parse_args(argv)
    model, report = prepare_qat(a.cfg, imgsz=a.imgsz)
    print(report)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for step in range(a.steps):
        batch = synthetic_batch(imgsz=a.imgsz, seed=step)
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in train_step(model, batch, opt).items()))
    print(q2ext.gradient_energy_report(model).table())
    calib = [synthetic_batch(imgsz=a.imgsz, seed=100 + i)["img"] for i in range(2)]
    model.eval()
    try:
        int_model = q2ext.convert(model, calib_batches=calib)
        print(f"q2ext.convert: {sum(type(m).__name__.startswith('Int') for m in int_model.modules())} int layers")
    except ValueError as exc:  # e.g. LSQ+ activations (SiLU goes negative) before asymmetric int8 lands
        print(f"q2ext.convert: not possible for this config: {exc}")
    q2ext.calibrate_gbfusion(model, calib)
    q2ext.export_onnx(model, calib[0][:1], a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
