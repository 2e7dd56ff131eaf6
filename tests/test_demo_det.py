"""The detection task of ``q2ext demo --task det``: data, model, loss, decoding and scoring."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import q2ext
from q2ext.demo.det import DetTask, fcos
from q2ext.demo.det.data import NUM_CLASSES, SceneConfig, generate, make_splits
from q2ext.demo.det.model import FUSION_NODES, STRIDES, Add, Concat
from q2ext.demo.task import Recipe, Task
from q2ext.nn import GBFusion

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocotools")

SMALL = SceneConfig(chunk=16)


def test_generator_deterministic_per_seed():
    x1, t1 = generate(20, 3, SMALL)
    x2, t2 = generate(20, 3, SMALL)
    assert torch.equal(x1, x2)
    for a, b in zip(t1, t2):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    x3, _ = generate(20, 4, SMALL)
    assert not torch.allclose(x1, x3)
    splits = make_splits(5, {"train": 6, "val": 4, "test": 4}, SMALL)
    assert not torch.allclose(splits["val"][0], splits["test"][0])
    assert torch.equal(splits["train"][0], make_splits(5, {"train": 6}, SMALL)["train"][0])


def test_generator_targets_shapes_and_ranges():
    cfg = SMALL
    x, t = generate(40, 0, cfg)
    assert x.shape == (40, 3, cfg.size, cfg.size) and x.dtype == torch.float32
    counts = [len(d["labels"]) for d in t]
    assert min(counts) >= 0 and max(counts) <= cfg.max_objects and sum(counts) >= 40
    for d in t:
        assert d["boxes"].dtype == torch.float32 and d["labels"].dtype == torch.int64
        assert d["boxes"].shape == (len(d["labels"]), 4)
        b = d["boxes"]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= cfg.size).all() and (b[:, 2:] > b[:, :2]).all()
        assert ((d["labels"] >= 0) & (d["labels"] < NUM_CLASSES)).all()


def test_boxes_match_rendered_masks():
    # Noise-free scenes without clutter: each box is the bounding box of its object's full
    # mask, enough of every object stays visible, and the visible part of an object is
    # painted in at most its two colours (the image shows the object where the box says).
    cfg = dataclasses.replace(SMALL, noise=(0.0, 0.0), rings=0, lines=0, bg_texture=0.0)
    x, t = generate(24, 1, cfg, with_masks=True)
    for img, d in zip(x, t):
        masks = d["masks"]
        above = torch.zeros(cfg.size, cfg.size, dtype=torch.bool)
        for k in reversed(range(len(masks))):
            m = masks[k]
            ys, xs = m.nonzero(as_tuple=True)
            box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.equal(box, d["boxes"][k])
            visible = m & ~above
            assert visible.sum() >= cfg.min_visible * m.sum()
            colours = img[:, visible].T.unique(dim=0)
            assert len(colours) <= 2
            above |= m


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        generate(-1, 0)
    with pytest.raises(ValueError, match="data_seed"):
        make_splits(-3, {"train": 2})
    with pytest.raises(ValueError, match="unknown split"):
        make_splits(0, {"training": 2})


def test_task_contract_and_recipes():
    task = DetTask()
    assert isinstance(task, Task) and task.name == "det" and task.score_name == "mAP50-95"
    full, quick = task.recipe(False), task.recipe(True)
    assert isinstance(full, Recipe) and full.optimizer == "sgd" and full.momentum > 0 and full.weight_decay > 0
    assert quick.fp_epochs <= full.fp_epochs and quick.qat_epochs <= full.qat_epochs
    splits = task.make_splits(0, quick=True)
    cfg = task.cfg
    assert {k: len(v[0]) for k, v in splits.items()} == {"train": cfg.quick_train, "val": cfg.quick_val,
                                                          "test": cfg.quick_test}
    y = splits["val"][1]
    sel = task.select(y, torch.tensor([3, 0]))
    assert sel[0] is y[3] and sel[1] is y[0]


@pytest.mark.parametrize("top_down", ["add", "concat"])
@pytest.mark.parametrize("gbfusion", [False, True])
def test_model_forward_shapes_and_fusion_nodes(gbfusion, top_down):
    task = DetTask(top_down=top_down)
    model = task.build_model(0, gbfusion=gbfusion, quick=True)
    x = torch.randn(2, 3, 64, 64)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, NUM_CLASSES + fcos.EXTRA_OUTPUTS, 64 // s, 64 // s)
                                             for s in STRIDES]
    nodes = task.fusion_nodes(model)
    assert [n for n, _ in nodes] == list(FUSION_NODES)
    if gbfusion:
        assert all(isinstance(m, GBFusion) and m.frozen for _, m in nodes)
        assert all(torch.allclose(m.alpha, torch.full((2,), 0.5)) for _, m in nodes)
        assert [m.mode for _, m in nodes] == [top_down, top_down, "concat", "concat"]
    else:
        td = Add if top_down == "add" else Concat
        assert [type(m) for _, m in nodes] == [td, td, Concat, Concat]
    # Same seed, same weights whether or not the nodes are GBFusion (the nodes hold none).
    other = dict(task.build_model(0, gbfusion=not gbfusion, quick=True).named_parameters())
    mine = dict(model.named_parameters())
    assert mine.keys() == other.keys() and all(torch.equal(v, other[k]) for k, v in mine.items())


def test_loss_finite_and_decreasing():
    torch.manual_seed(0)
    task = DetTask()
    x, y = generate(8, 2, SMALL)
    model = task.build_model(0, gbfusion=True, quick=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(25):
        loss = task.loss(model, x, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]


def test_loss_handles_images_without_objects():
    task = DetTask()
    model = task.build_model(0, gbfusion=False, quick=True)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    loss = task.loss(model, torch.randn(2, 3, 64, 64), [empty, empty])
    assert torch.isfinite(loss)
    loss.backward()


# A hand-made case: objects in distinct cells, one per level and class mix.
_HAND = [
    {"boxes": torch.tensor([[4.0, 6.0, 12.0, 14.0], [30.0, 8.0, 50.0, 26.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.tensor([[10.0, 20.0, 44.0, 60.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[40.0, 40.0, 49.0, 47.0], [2.0, 30.0, 12.0, 38.0], [20.0, 2.0, 31.0, 15.0]]),
     "labels": torch.tensor([3, 3, 0])},
]


class _Oracle(torch.nn.Module):
    """Returns fixed maps: what a perfect (or a deliberately wrong) detector would output."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps

    def forward(self, x):
        return [m[:len(x)] for m in self.maps]


def _perfect_maps(targets):
    """Level maps that decode to exactly `targets` (built from the head's own target encoding):
    at each positive cell its object's class, the exact box distances and objectness 1."""
    grids = [(64 // s, 64 // s) for s in STRIDES]
    n, c = len(targets), NUM_CLASSES
    maps = []
    boxes, labels, enc = fcos.encode(targets, grids, c)
    for e, s, (h, w) in zip(enc, STRIDES, grids):
        obj = e["obj"]
        gt = boxes[obj.clamp_min(0)]
        pts = fcos._grid(h, w, s, "cpu")[None]
        dist = torch.cat([pts - gt[..., :2], gt[..., 2:] - pts], -1).clamp_min(1e-3) / s
        logits = torch.nn.functional.one_hot(labels[obj.clamp_min(0)], c) * 40.0
        objectness = torch.where(obj >= 0, 20.0, -20.0)[..., None]
        o = torch.cat([logits, dist.log(), objectness], -1)
        maps.append(o.transpose(1, 2).reshape(n, -1, h, w))
    return maps


def test_evaluate_perfect_and_wrong_predictions():
    task = DetTask()
    images = torch.zeros(len(_HAND), 3, 64, 64)
    maps = _perfect_maps(_HAND)
    perfect = task.evaluate(_Oracle(maps), images, _HAND)
    assert perfect["score"] == pytest.approx(100.0) and perfect["map50"] == pytest.approx(100.0)
    dets = task.predict(_Oracle(maps), images)
    for d, t in zip(dets, _HAND):
        order = torch.argsort(d["labels"] * 1000 + d["boxes"][:, 0])
        ref = torch.argsort(t["labels"] * 1000 + t["boxes"][:, 0])
        assert torch.allclose(d["boxes"][order], t["boxes"][ref], atol=1e-3)
        assert torch.equal(d["labels"][order], t["labels"][ref])
    # Boxes shifted by 3 px: IoU drops below the strict thresholds, mAP@0.5:0.95 drops.
    shifted = [{"boxes": t["boxes"] + 3.0, "labels": t["labels"]} for t in _HAND]
    off = task.evaluate(_Oracle(_perfect_maps(shifted)), images, _HAND)
    assert off["score"] < 80.0
    # Every class wrong: nothing matches.
    relabelled = [{"boxes": t["boxes"], "labels": (t["labels"] + 1) % NUM_CLASSES} for t in _HAND]
    wrong = task.evaluate(_Oracle(_perfect_maps(relabelled)), images, _HAND)
    assert wrong["score"] == pytest.approx(0.0)


def test_prepare_w4a4_with_gbfusion_nodes_trains():
    # The FP32-LN model (GBFusion built in, no insert_gbfusion) quantized W4A4: one training
    # step with the controller running measures every node's branch energies and updates
    # the weights.  At an add node both branches get the same gradient (times alpha), so
    # its energies are equal and alpha stays uniform; the concat nodes move.
    task = DetTask()
    x, y = generate(8, 0, SMALL)
    model = task.build_model(0, gbfusion=True, quick=True)
    qmodel = q2ext.prepare(model, task.qconfig(4, "auto"))
    q2ext.calibrate(qmodel, [x])
    nodes = task.fusion_nodes(qmodel)
    for _, m in nodes:
        m.unfreeze()
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    opt = torch.optim.SGD([p for p in qmodel.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    loss = task.loss(qmodel, x, y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = qmodel.state_dict()
    for name, m in nodes:
        g = after[f"{name}.g_ema"]
        assert (g > 0).all(), name
        if m.mode == "add":
            assert torch.allclose(g[0], g[1], rtol=1e-4), name
        else:
            assert not torch.equal(before[f"{name}.lam"], after[f"{name}.lam"]), name
    assert not torch.equal(before["neck.n3.0.weight"], after["neck.n3.0.weight"])
    table = q2ext.summary(qmodel)
    assert "heads.0.pred" in table
    layers = dict(qmodel.named_modules())
    assert layers["heads.2.pred"].weight_quantizer.bits == 8 and layers["neck.n3.0"].weight_quantizer.bits == 4
    scores = task.evaluate(qmodel, x, y)
    assert 0.0 <= scores["score"] <= 100.0 and 0.0 <= scores["map50"] <= 100.0


def test_fusion_nodes_rejects_a_model_without_them():
    with pytest.raises(TypeError, match="neck.td3"):
        DetTask().fusion_nodes(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)))
