"""A YOLOv5-style detector (CSP backbone + SPPF, PAN neck, 1x1 heads) and Q-GBFusion on it.

The model is small and self-contained so the recipe runs on a CPU in seconds:

    python python/yolo_pan_neck.py

It shows the whole Q-GBFusion life cycle: insert_gbfusion finds the four PAN concats
(two top-down, two bottom-up) and leaves the backbone's C3/SPPF concats and residual adds
alone; a few training steps move the controller; gradient_energy_report prints G-bar,
alpha and the balance ratio per node; fold_gbfusion calibrates the LN constants and folds
them with alpha into the 1x1 convs that follow each concat.
"""
from __future__ import annotations

import torch
from torch import nn


class Conv(nn.Sequential):
    """Conv2d + BatchNorm2d + SiLU, "same" padding."""

    def __init__(self, c_in, c_out, k=1, s=1):
        super().__init__(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 1), Conv(c, c, 3)
        self.shortcut = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C3(nn.Module):
    """CSP block: two 1x1 paths from one input, concatenated (a backbone-style concat)."""

    def __init__(self, c_in, c_out, n=1, shortcut=True):
        super().__init__()
        h = c_out // 2
        self.cv1, self.cv2, self.cv3 = Conv(c_in, h), Conv(c_in, h), Conv(2 * h, c_out)
        self.m = nn.Sequential(*(Bottleneck(h, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        h = c_in // 2
        self.cv1, self.cv2 = Conv(c_in, h), Conv(4 * h, c_out)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class Backbone(nn.Module):
    """Returns (P3, P4, P5) at strides 8, 16, 32."""

    def __init__(self, w=16):
        super().__init__()
        self.stem = nn.Sequential(Conv(3, w, 3, 2), Conv(w, 2 * w, 3, 2), C3(2 * w, 2 * w))
        self.s3 = nn.Sequential(Conv(2 * w, 4 * w, 3, 2), C3(4 * w, 4 * w))
        self.s4 = nn.Sequential(Conv(4 * w, 8 * w, 3, 2), C3(8 * w, 8 * w))
        self.s5 = nn.Sequential(Conv(8 * w, 16 * w, 3, 2), C3(16 * w, 16 * w), SPPF(16 * w, 16 * w))

    def forward(self, x):
        p3 = self.s3(self.stem(x))
        p4 = self.s4(p3)
        return p3, p4, self.s5(p4)


class PANNeck(nn.Module):
    """YOLOv5's PAN: top-down upsample+concat, bottom-up strided conv+concat."""

    def __init__(self, w=16):
        super().__init__()
        self.lat5 = Conv(16 * w, 8 * w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C3(16 * w, 8 * w, shortcut=False)
        self.lat4 = Conv(8 * w, 4 * w)
        self.td3 = C3(8 * w, 4 * w, shortcut=False)
        self.down3 = Conv(4 * w, 4 * w, 3, 2)
        self.bu4 = C3(8 * w, 8 * w, shortcut=False)
        self.down4 = Conv(8 * w, 8 * w, 3, 2)
        self.bu5 = C3(16 * w, 16 * w, shortcut=False)

    def forward(self, feats):
        p3, p4, p5 = feats
        x5 = self.lat5(p5)
        x4 = self.lat4(self.td4(torch.cat([self.up(x5), p4], 1)))
        n3 = self.td3(torch.cat([self.up(x4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), x4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), x5], 1))
        return n3, n4, n5


class Head(nn.Module):
    def __init__(self, w=16, outputs=3 * (5 + 20)):
        super().__init__()
        self.m = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in (4 * w, 8 * w, 16 * w))

    def forward(self, feats):
        return [m(f) for m, f in zip(self.m, feats)]


class YoloPAN(nn.Module):
    def __init__(self, w=16):
        super().__init__()
        self.backbone, self.neck, self.head = Backbone(w), PANNeck(w), Head(w)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def main():
    import q2ext

    torch.manual_seed(0)
    model = YoloPAN()
    x = torch.randn(2, 3, 128, 128)
    report = q2ext.insert_gbfusion(model, example_inputs=(x,))
    print(report)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(5):
        loss = sum(o.square().mean() for o in model(torch.randn(2, 3, 128, 128)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(q2ext.gradient_energy_report(model))
    with torch.no_grad():
        reference = model.eval()(x)
    rows = q2ext.fold_gbfusion(model, [torch.randn(2, 3, 128, 128) for _ in range(4)])
    for r in rows:
        print(f"folded {r['name']}: mean {r['mean']:.4f} std {r['std']:.4f} into {r['folded_into']}")
    with torch.no_grad():
        folded = model(x)
    diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(folded, reference))
    print(f"max relative output change after folding (random weights, no fine-tune): {diff:.3g}")


if __name__ == "__main__":
    main()
