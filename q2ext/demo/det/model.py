"""A small FPN + PAN detector for ``q2ext demo --task det`` whose fusion nodes are modules.

Backbone: per-image input standardisation, then a plain conv-BN-act stack with outputs C2, C3, C4 at strides 4, 8, 16.  Neck: an
FPN top-down path (``neck.td3``: lateral(C3) + up(P4); ``neck.td2``: lateral(C2) + up(P3))
and a PAN bottom-up path (``neck.pan3``: concat(down(N2), P3); ``neck.pan4``:
concat(down(N3), P4)).  ``top_down="concat"`` makes the FPN nodes concats too (YOLOv5's
neck).  Note: at an add node both branches receive the same gradient (times alpha), so
their gradient energies are equal by construction and Q-GBFusion's controller has nothing
to balance there; only concat nodes can show the imbalance the method corrects.  Each of the four merges is a module of its own - :class:`Add` /
:class:`Concat`, or a frozen ``q2ext.nn.GBFusion`` with the same name - so the fusion nodes
are found by name in every variant.  In forward order each node consumes the previous
one's output, so that order (td3, td2, pan3, pan4) is also shallow to deep.  Both branches
of a node have the neck width, so their gradient norms compare like for like.

Head: one small head per PAN level (stride 4, 8, 16), each a conv and a 1x1 predictor with
``num_classes + 5`` channels: class logits, four log box distances and an objectness logit
(q2ext.demo.det.fcos encodes, decodes and scores these maps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from q2ext.nn import GBFusion

STRIDES = (4, 8, 16)
FUSION_NODES = ("neck.td3", "neck.td2", "neck.pan3", "neck.pan4")


class Add(nn.Module):
    """Sum of a list of equally shaped maps: an FPN top-down fusion node."""

    def forward(self, xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Concat(nn.Module):
    """Channel concat of a list of (N, C_i, H, W) maps: a PAN fusion node."""

    def forward(self, xs):
        return torch.cat(xs, 1)


class InputNorm(nn.Module):
    """Per-image standardisation: subtract each channel's spatial mean, divide by the
    image's std.  The scenes' colours and contrasts are random per image; without this a
    from-scratch network spends its first thousands of steps on that nuisance (measured:
    a shape classifier on flat-colour scenes stays at chance for 300 steps without it and
    reaches 98 % with it)."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        x = x - x.mean((2, 3), keepdim=True)
        return x / (x.std((1, 2, 3), keepdim=True) + self.eps)


_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU}


def _cba(c_in, c_out, act, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), _ACTS[act]())


def _stage(c_in, c_out, convs, act):
    """A stride-2 conv then ``convs - 1`` stride-1 convs."""
    return nn.Sequential(_cba(c_in, c_out, act, stride=2), *[_cba(c_out, c_out, act) for _ in range(convs - 1)])


def _node(kind: str, gbfusion: bool) -> nn.Module:
    if not gbfusion:
        return Add() if kind == "add" else Concat()
    # Frozen controller: alpha stays 1/K and the node is a plain fuse + channel LayerNorm
    # until a QAT arm unfreezes it.
    return GBFusion(2, mode=kind).freeze()


class Neck(nn.Module):
    """FPN top-down (adds, or YOLO-style concats) then PAN bottom-up (concats), all at
    ``width`` channels."""

    def __init__(self, c2, c3, c4, width, act, gbfusion, top_down="add"):
        super().__init__()
        if top_down not in ("add", "concat"):
            raise ValueError(f"top_down must be 'add' or 'concat', got {top_down!r}")
        c_td = width if top_down == "add" else 2 * width
        self.lat4 = _cba(c4, width, act, k=1)
        self.lat3 = _cba(c3, width, act, k=1)
        self.lat2 = _cba(c2, width, act, k=1)
        self.td3 = _node(top_down, gbfusion)
        self.out3 = _cba(c_td, width, act)
        self.td2 = _node(top_down, gbfusion)
        self.out2 = _cba(c_td, width, act)
        self.down3 = _cba(width, width, act, stride=2)
        self.pan3 = _node("concat", gbfusion)
        self.n3 = _cba(2 * width, width, act)
        self.down4 = _cba(width, width, act, stride=2)
        self.pan4 = _node("concat", gbfusion)
        self.n4 = _cba(2 * width, width, act)

    def forward(self, c2, c3, c4):
        p4 = self.lat4(c4)
        p3 = self.out3(self.td3([self.lat3(c3), F.interpolate(p4, scale_factor=2.0, mode="nearest")]))
        p2 = self.out2(self.td2([self.lat2(c2), F.interpolate(p3, scale_factor=2.0, mode="nearest")]))
        n3 = self.n3(self.pan3([self.down3(p2), p3]))
        n4 = self.n4(self.pan4([self.down4(n3), p4]))
        return p2, n3, n4


class Head(nn.Module):
    """conv-BN-act, then a 1x1 predictor of num_classes class logits + ``extra`` maps."""

    def __init__(self, width, num_classes, extra, act, prior, prior_channels):
        super().__init__()
        self.conv = _cba(width, width, act)
        self.pred = nn.Conv2d(width, num_classes + extra, 1)
        with torch.no_grad():
            # The focal-loss init: the sigmoid logits (the objectness) start at the prior
            # probability; everything else at 0.
            self.pred.bias.zero_()
            self.pred.bias[prior_channels].fill_(float(torch.logit(torch.tensor(prior))))

    def forward(self, x):
        return self.pred(self.conv(x))


class TinyDetector(nn.Module):
    """FPN + PAN CenterNet-style detector.

    Args: num_classes; widths: backbone channels at strides 2, 4, 8, 16; convs: convs per
    backbone stage (the first has stride 2); neck: neck/head width; act: "relu" or "silu";
    gbfusion: fusion nodes as frozen GBFusion (else plain Add/Concat); extra_outputs: box
    maps per cell after the class logits; prior, prior_channels: the output channels (a
    slice, default the class logits) whose bias starts at logit(prior); top_down: the FPN
    nodes' operator, "add" or "concat".
    Input (N, 3, H, W) with H, W divisible by 16; output a list of three maps
    (N, num_classes + 4, H / s, W / s) for s in STRIDES.
    """

    def __init__(self, num_classes=4, widths=(16, 24, 48, 64), convs=2, neck=32, act="relu", gbfusion=False,
                 extra_outputs=5, prior=0.01, prior_channels=None, top_down="add"):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if len(widths) != 4:
            raise ValueError(f"widths must give 4 stage widths (strides 2, 4, 8, 16), got {widths!r}")
        self.num_classes = num_classes
        self.norm = InputNorm()
        self.stem = _stage(3, widths[0], 1, act)
        self.stage2 = _stage(widths[0], widths[1], convs, act)
        self.stage3 = _stage(widths[1], widths[2], convs, act)
        self.stage4 = _stage(widths[2], widths[3], convs, act)
        self.neck = Neck(widths[1], widths[2], widths[3], neck, act, gbfusion, top_down)
        prior_channels = slice(0, num_classes) if prior_channels is None else prior_channels
        self.heads = nn.ModuleList(Head(neck, num_classes, extra_outputs, act, prior, prior_channels)
                                   for _ in STRIDES)

    def forward(self, x):
        # channels_last: about 20 % faster convs (oneDNN) at these small widths, on a CPU.
        x = self.norm(x).contiguous(memory_format=torch.channels_last)
        c2 = self.stage2(self.stem(x))
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        return [head(f) for head, f in zip(self.heads, self.neck(c2, c3, c4))]
