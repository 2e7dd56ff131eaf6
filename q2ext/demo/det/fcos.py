"""FCOS-style targets, loss and decoding over the detector's three pyramid levels.

Each object is assigned to one level by its longer box side (``LEVEL_BOUNDS`` pixels:
below the first bound stride 4, then stride 8, else stride 16).  At its level, the cells
whose centre lies inside the box and within ``CENTER_RADIUS`` strides of the box centre
are its positives (a cell claimed by two objects goes to the smaller one; the cell holding
the box centre is always positive, so tiny objects get one).

Output maps per level: ``num_classes`` class logits, 4 log-distances log(d / stride) from
the cell centre to the box sides (l, t, r, b), 1 objectness logit.  Loss, normalised by
the number of positives: sigmoid focal loss on the objectness of every cell, softmax
cross-entropy on the class logits of the positives, and GIoU on their decoded boxes.  (A
softmax over classes learns to tell the shapes apart in a few hundred steps; per-class
sigmoid focal losses, tried first, barely left chance level in the same budget, because a
positive cell's wrong classes sit at the focal prior and get almost no gradient.)
Decoding: score = sigmoid(objectness) * softmax(classes), the best ``pre_nms`` (cell,
class) candidates of an image, class-wise NMS at ``NMS_IOU``, at most ``top_k`` boxes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from .model import STRIDES

EXTRA_OUTPUTS = 5  # l, t, r, b log-distances and the objectness logit
PRIOR = 0.01  # of the objectness logit; the class logits start at 0 (uniform softmax)


def prior_channels(num_classes: int) -> slice:
    return slice(num_classes + 4, num_classes + 5)


LEVEL_BOUNDS = (14.0, 28.0)
CENTER_RADIUS = 1.5
NMS_IOU = 0.6
MAX_LOG_DIST = 6.0


def _concat_targets(targets, device):
    """All objects of a batch: boxes float32 [T, 4], labels int64 [T], image index int64 [T]."""
    boxes = torch.cat([t["boxes"].reshape(-1, 4).float().cpu() for t in targets]) if targets else torch.zeros(0, 4)
    labels = torch.cat([t["labels"].reshape(-1).long().cpu() for t in targets]) if targets else \
        torch.zeros(0, dtype=torch.long)
    img = torch.cat([torch.full((len(t["labels"]),), i, dtype=torch.long) for i, t in enumerate(targets)]) \
        if targets else torch.zeros(0, dtype=torch.long)
    return boxes.to(device), labels.to(device), img.to(device)


def _grid(h, w, stride, device):
    """Cell centres in pixels, float32 [h * w, 2] (x, y), row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).add_(0.5).mul_(stride)


def encode(targets, grid_sizes, num_classes: int, device=None) -> list:
    """Training targets of a batch.

    Args: targets (list of N dicts {"boxes" [n_i, 4] xyxy pixels, "labels" [n_i]}),
    grid_sizes [(h, w)] of the levels (strides ``STRIDES``), num_classes.
    Returns (boxes float32 [T, 4], labels int64 [T], levels): the batch's objects
    concatenated, and per level {"obj": int64 [N, h*w]}, the index of the object each cell
    learns (-1: background).
    """
    device = device or torch.device("cpu")
    boxes, labels, img = _concat_targets(targets, device)
    n = len(targets)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"targets: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-3)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    area = wh.prod(1)
    level = torch.bucketize(wh.amax(1), torch.tensor(LEVEL_BOUNDS, device=device), right=True)
    t_all = len(labels)
    out = []
    for lvl, ((h, w), s) in enumerate(zip(grid_sizes, STRIDES)):
        pts = _grid(h, w, s, device)                                                   # [P, 2]
        sel = (level == lvl).nonzero().squeeze(1)
        b = boxes[sel]
        inside = ((pts[None] > b[:, None, :2]) & (pts[None] < b[:, None, 2:])).all(-1)  # [T_l, P]
        near = ((pts[None] - centre[sel, None]).abs() <= CENTER_RADIUS * s).all(-1)
        cell = (centre[sel] / s).floor().long()
        cell_idx = cell[:, 1].clamp(0, h - 1) * w + cell[:, 0].clamp(0, w - 1)
        own = torch.zeros_like(inside)
        own[torch.arange(len(sel), device=device), cell_idx] = True
        cand = (inside & near) | own
        # Cost: the area (smaller wins), ties broken by object index; one key per pair.
        key = area[sel, None].double() * (t_all + 1) + sel[:, None].double()
        key = torch.where(cand, key, torch.full_like(key, float("inf")))
        best = torch.full((n, h * w), float("inf"), device=device, dtype=torch.float64)
        best.scatter_reduce_(0, img[sel, None].expand(-1, h * w), key, "amin")
        obj = torch.where(best.isinf(), torch.full_like(best, -1), torch.remainder(best, t_all + 1)).long()
        out.append({"obj": obj})
    return boxes, labels, out


def _decode_boxes(reg, pts, stride):
    """reg [..., 4] log-distances / stride, pts [..., 2] -> xyxy boxes [..., 4]."""
    d = reg.clamp(max=MAX_LOG_DIST).exp() * stride
    return torch.cat([pts - d[..., :2], pts + d[..., 2:]], -1)


def loss(outputs, targets, num_classes: int) -> torch.Tensor:
    """Detection loss of a batch: outputs the model's list of level maps [N, C + 5, h, w]."""
    device = outputs[0].device
    boxes, labels, enc = encode(targets, [o.shape[-2:] for o in outputs], num_classes, device)
    obj_loss = outputs[0].new_zeros((), dtype=torch.float32)
    cls_loss = obj_loss.clone()
    box_loss = obj_loss.clone()
    num_pos = 0
    for out, e, s in zip(outputs, enc, STRIDES):
        n, _, h, w = out.shape
        out = out.float().flatten(2).transpose(1, 2)                                   # [N, P, C + 5]
        pos = e["obj"] >= 0
        obj_loss = obj_loss + sigmoid_focal_loss(out[..., -1], pos.float(), reduction="sum")
        o = e["obj"][pos]
        if o.numel() == 0:
            continue
        num_pos += o.numel()
        cls_loss = cls_loss + F.cross_entropy(out[..., :num_classes][pos], labels[o], reduction="sum")
        pts = _grid(h, w, s, device)[None].expand(n, -1, -1)[pos]
        pred_box = _decode_boxes(out[..., num_classes:num_classes + 4][pos], pts, s)
        box_loss = box_loss + generalized_box_iou_loss(pred_box, boxes[o], reduction="sum")
    return (obj_loss + cls_loss + 2.0 * box_loss) / max(num_pos, 1)


@torch.no_grad()
def decode(outputs, num_classes: int, image_size, top_k: int = 50, pre_nms: int = 200,
           min_score: float = 0.02) -> list:
    """Detections per image: list of N dicts {"boxes" float32 [k, 4] xyxy pixels clipped to
    the image, "scores" float32 [k], "labels" int64 [k]} on the CPU, k <= top_k."""
    h_img, w_img = image_size
    scores, boxes = [], []
    for out, s in zip(outputs, STRIDES):
        h, w = out.shape[-2:]
        out = out.float().flatten(2).transpose(1, 2)                                   # [N, P, C + 5]
        sc = torch.softmax(out[..., :num_classes], -1) * torch.sigmoid(out[..., -1:])
        scores.append(sc)
        boxes.append(_decode_boxes(out[..., num_classes:num_classes + 4], _grid(h, w, s, out.device)[None], s))
    scores, boxes = torch.cat(scores, 1), torch.cat(boxes, 1)                           # [N, P, C], [N, P, 4]
    lim = boxes.new_tensor([w_img, h_img, w_img, h_img])
    boxes = torch.minimum(boxes.clamp_min(0), lim)
    dets = []
    for i in range(scores.shape[0]):
        flat = scores[i].reshape(-1)
        top, idx = flat.topk(min(pre_nms, flat.numel()))
        keep = top >= min_score
        top, idx = top[keep], idx[keep]
        cls, cell = idx % num_classes, idx // num_classes
        bx = boxes[i, cell]
        k = batched_nms(bx, top, cls, NMS_IOU)[:top_k]
        dets.append({"boxes": bx[k].cpu(), "scores": top[k].cpu(), "labels": cls[k].long().cpu()})
    return dets
