"""CenterNet-style targets, loss and decoding over the detector's three pyramid levels.

Each object is assigned to one level by its longer box side (``LEVEL_BOUNDS`` pixels:
below the first bound stride 4, then stride 8, else stride 16), so every level sees
objects a few cells wide.  At its level an object is a Gaussian peak of height 1 on the
heatmap of its class at the cell holding its box centre (sigma = ``GAUSS_ALPHA`` * box side
/ 6 in cells, at least ``MIN_SIGMA``; overlapping peaks of one class keep the maximum),
and at that cell the box maps regress the sub-cell centre offset (dx, dy) in [0, 1) and the
log size log(w / stride), log(h / stride).

Loss: CenterNet's penalty-reduced focal loss on the heatmaps plus L1 on the four box maps
at the centre cells, each normalised by the number of objects in the batch.
Decoding: sigmoid heatmaps, a 3x3 max-pool keeps the local peaks, the ``top_k`` best peaks
over all levels and classes of an image become boxes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import STRIDES

EXTRA_OUTPUTS = 4  # dx, dy, log w/s, log h/s
PRIOR = 0.1  # of the class heatmap logits


def prior_channels(num_classes: int) -> slice:
    return slice(0, num_classes)


LEVEL_BOUNDS = (14.0, 28.0)
GAUSS_ALPHA = 0.54
MIN_SIGMA = 0.35
MAX_LOG_SIZE = 6.0  # exp() of the decoded log size is clamped here (pixels / stride)


def _concat_targets(targets, device):
    """All objects of a batch: boxes [T, 4], labels [T], image index [T] on `device`."""
    boxes = [t["boxes"].reshape(-1, 4) for t in targets]
    img = torch.cat([torch.full((len(b),), i, dtype=torch.long) for i, b in enumerate(boxes)]) if boxes else \
        torch.zeros(0, dtype=torch.long)
    labels = torch.cat([t["labels"].reshape(-1).long() for t in targets]) if targets else torch.zeros(0, dtype=torch.long)
    boxes = torch.cat(boxes).float() if boxes else torch.zeros(0, 4)
    return boxes.to(device), labels.to(device), img.to(device)


def encode(targets, grid_sizes, num_classes: int, device=None):
    """Training targets of a batch.

    Args:
        targets: list of N dicts {"boxes": float [n_i, 4] xyxy pixels, "labels": int64 [n_i]}.
        grid_sizes: [(h, w)] of the three levels (strides ``STRIDES``).
        num_classes: heatmap channels.
    Returns: one dict per level: "heat" float32 [N, C, h, w]; "index" (img, y, x) long [T_l]
    each, the centre cells of the level's objects; "reg" float32 [T_l, 4] (dx, dy, log w/s,
    log h/s).
    """
    boxes, labels, img = _concat_targets(targets, device or torch.device("cpu"))
    n = len(targets)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"targets: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-3)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    level = torch.bucketize(wh.amax(1), torch.tensor(LEVEL_BOUNDS, device=boxes.device), right=True)
    level = _resolve_collisions(level, centre, img, grid_sizes)
    out = []
    for lvl, ((h, w), s) in enumerate(zip(grid_sizes, STRIDES)):
        sel = (level == lvl).nonzero().squeeze(1)
        heat = torch.zeros(n * num_classes, h, w, device=boxes.device)
        c = centre[sel] / s
        cell = c.floor()
        cx = cell[:, 0].clamp(0, w - 1)
        cy = cell[:, 1].clamp(0, h - 1)
        sigma = (GAUSS_ALPHA * wh[sel] / s / 6).clamp_min(MIN_SIGMA)
        xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
        ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
        gx = torch.exp(-(xs[None] - cx[:, None]) ** 2 / (2 * sigma[:, :1] ** 2))          # [T, w]
        gy = torch.exp(-(ys[None] - cy[:, None]) ** 2 / (2 * sigma[:, 1:] ** 2))          # [T, h]
        gauss = gy[:, :, None] * gx[:, None, :]
        rows = (img[sel] * num_classes + labels[sel])[:, None].expand(-1, h * w)
        heat.view(n * num_classes, h * w).scatter_reduce_(0, rows, gauss.view(-1, h * w), "amax")
        reg = torch.cat([c - cell, torch.log(wh[sel] / s)], 1)
        out.append({"heat": heat.view(n, num_classes, h, w), "index": (img[sel], cy.long(), cx.long()), "reg": reg})
    return out


def _cells(level, centre, grid_sizes):
    """Centre cell (x, y) of every object at its level, long [T, 2]."""
    strides = torch.tensor(STRIDES, device=centre.device, dtype=centre.dtype)[level]
    limit = torch.tensor([[w - 1, h - 1] for h, w in grid_sizes], device=centre.device)[level]
    return torch.minimum((centre / strides[:, None]).floor().long().clamp_min(0), limit)


def _resolve_collisions(level, centre, img, grid_sizes):
    """Move an object whose (image, level, centre cell) repeats an earlier object's one level
    finer (at most twice): the box maps of a cell are shared by all classes, so a cell can
    regress one box only."""
    for _ in range(len(STRIDES) - 1):
        cell = _cells(level, centre, grid_sizes)
        key = torch.stack([img, level, cell[:, 0], cell[:, 1]], 1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1 if len(inverse) else 0,), len(inverse), device=level.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(inverse), device=level.device), "amin")
        repeat = (first[inverse] != torch.arange(len(inverse), device=level.device)) & (level > 0)
        if not repeat.any():
            break
        level = level - repeat.long()
    return level


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Penalty-reduced focal loss (CenterNet, alpha 2, beta 4), summed (not normalised)."""
    logits = logits.float()
    pos = heat == 1
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_loss = (1 - p) ** 2 * log_p
    neg_loss = (1 - heat) ** 4 * p ** 2 * log_1mp
    return -torch.where(pos, pos_loss, neg_loss).sum()


def loss(outputs, targets, num_classes: int, reg_weight: float = 1.0) -> torch.Tensor:
    """Detection loss of a batch: outputs the model's list of level maps [N, C + 4, h, w]."""
    enc = encode(targets, [o.shape[-2:] for o in outputs], num_classes, outputs[0].device)
    num_obj = sum(len(e["reg"]) for e in enc)
    heat_loss = outputs[0].new_zeros(())
    reg_loss = outputs[0].new_zeros(())
    for out, e in zip(outputs, enc):
        heat_loss = heat_loss + focal_loss(out[:, :num_classes], e["heat"])
        if len(e["reg"]):
            b, y, x = e["index"]
            pred = out[b, num_classes:, y, x].float()                               # [T_l, 4]
            reg_loss = reg_loss + F.l1_loss(pred, e["reg"], reduction="sum")
    return (heat_loss + reg_weight * reg_loss) / max(num_obj, 1)


@torch.no_grad()
def decode(outputs, num_classes: int, image_size, top_k: int = 50, min_score: float = 0.01) -> list:
    """Detections per image: list of N dicts {"boxes" float32 [k, 4] xyxy pixels clipped to
    the image, "scores" float32 [k], "labels" int64 [k]}, k <= top_k, scores >= min_score."""
    h_img, w_img = image_size
    scores, labels, boxes = [], [], []
    for out, s in zip(outputs, STRIDES):
        out = out.float()
        n, _, h, w = out.shape
        heat = torch.sigmoid(out[:, :num_classes])
        peak = heat == F.max_pool2d(heat, 3, 1, 1)
        sc = (heat * peak).view(n, -1)                                                # [N, C*h*w]
        cls = torch.arange(num_classes, device=out.device).repeat_interleave(h * w).expand(n, -1)
        ys = torch.arange(h, device=out.device, dtype=torch.float32).repeat_interleave(w)
        xs = torch.arange(w, device=out.device, dtype=torch.float32).repeat(h)
        reg = out[:, num_classes:].reshape(n, 4, -1)
        cx = (xs + reg[:, 0]) * s
        cy = (ys + reg[:, 1]) * s
        bw = reg[:, 2].clamp(max=MAX_LOG_SIZE).exp() * s
        bh = reg[:, 3].clamp(max=MAX_LOG_SIZE).exp() * s
        bx = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)     # [N, h*w, 4]
        bx = bx[:, None].expand(-1, num_classes, -1, -1).reshape(n, -1, 4)              # per class
        scores.append(sc)
        labels.append(cls)
        boxes.append(bx)
    scores, labels, boxes = torch.cat(scores, 1), torch.cat(labels, 1), torch.cat(boxes, 1)
    k = min(top_k, scores.shape[1])
    top, idx = scores.topk(k, 1)
    lim = boxes.new_tensor([w_img, h_img, w_img, h_img])
    dets = []
    for i in range(scores.shape[0]):
        keep = top[i] >= min_score
        j = idx[i][keep]
        dets.append({"boxes": torch.minimum(boxes[i, j].clamp_min(0), lim).cpu(), "scores": top[i][keep].cpu(),
                     "labels": labels[i, j].long().cpu()})
    return dets
