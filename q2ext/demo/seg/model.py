"""A deep, narrow U-Net for the segmentation task, with its decoder fusion nodes as modules.

Each decoder stage upsamples the deeper feature (transposed conv to the skip's channel
count), merges it with the encoder skip in the stage's ``fuse`` module - the *fusion
node* - and refines the result with a conv block.  ``fuse`` is either a plain channel
:class:`Concat` or a :class:`q2ext.nn.GBFusion` built in from the start (the FP32 model is
trained with it: LayerNorm on, alpha = 1/K, controller frozen), so every model of the demo
has its fusion nodes at the same names, ``decoders.<i>.fuse``, deepest first.

Branch order at every node: ``[up (deep), skip (shallow)]``.  At the shallowest node the up
branch has passed through the whole encoder, the bottleneck and every decoder stage (some
20 convs), the skip branch through two: the depth asymmetry along which, the Q² paper
argues, quantization error and gradient pile up.  Both branches have the same channel
count, so their gradient norms compare like for like.
"""
from __future__ import annotations

import torch
from torch import nn

from q2ext.nn import GBFusion


class Concat(nn.Module):
    """Channel concat of a list of (N, C_i, H, W) maps: a plain fusion node."""

    def forward(self, xs):
        return torch.cat(xs, 1)


def _block(c_in, c_out, convs):
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    """up(deep) -> fuse([up, skip]) -> conv block."""

    def __init__(self, c_deep, c_skip, convs, fuse: nn.Module):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2, bias=False), nn.BatchNorm2d(c_skip),
                                nn.ReLU(inplace=True))
        self.fuse = fuse
        self.block = _block(2 * c_skip, c_skip, convs)

    def forward(self, deep, skip):
        return self.block(self.fuse([self.up(deep), skip]))


class UNet(nn.Module):
    """U-Net with ``len(widths) - 1`` poolings.

    Args: in_channels, num_classes; widths: channels per level, shallow to deep (the last
    is the bottleneck); convs: 3x3 convs per stage; gbfusion: fusion nodes are GBFusion
    (frozen, alpha = 1/K) with LayerNorm epsilon ``ln_eps``, else plain concats.
    Input (N, in_channels, H, W) with H, W divisible by 2**(len(widths) - 1); output
    logits (N, num_classes, H, W).
    """

    def __init__(self, in_channels=1, num_classes=4, widths=(8, 12, 16, 24, 32), convs=2, gbfusion=True,
                 ln_eps=1e-5):
        super().__init__()
        widths = tuple(widths)
        depth = len(widths) - 1
        self.stem = _block(in_channels, widths[0], convs)
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _block(widths[i], widths[i + 1], convs))
                                   for i in range(depth))

        def fuse():
            return GBFusion(2, "concat", eps=ln_eps).freeze() if gbfusion else Concat()

        self.decoders = nn.ModuleList(Decoder(widths[i + 1], widths[i], convs, fuse())
                                      for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for dec in self.decoders:
            h = dec(h, skips.pop())
        return self.head(h)
