"""A small U-Net for ``q2ext demo`` whose decoder fusion nodes are explicit modules.

Each decoder stage upsamples the deeper feature (a transposed conv to the skip's channel
count), merges it with the encoder skip in a :class:`Concat` module - the *fusion node* -
and refines the result with a conv block.  Keeping the merge a module of its own gives
every fusion node a name: :func:`q2ext.insert_gbfusion` rewrites exactly these modules
(``decoders.<i>.fuse`` -> ``decoders.<i>.fuse.gbfusion_0``), the FP32 teacher is tapped at
the same names for Q-ADA, and the gradient-energy probe (``q2ext.demo.train``) hooks the
same branch tensors in every variant.  Both branches of a node have the same channel
count, so their gradient norms compare like for like.

The up branch has passed through the whole encoder, the bottleneck and the deeper
decoder stages; the skip branch through a few convs: the depth asymmetry that, under
low-bit quantization, makes quantization error (and gradient) pile up on the deep side.
"""
from __future__ import annotations

import torch
from torch import nn


class Concat(nn.Module):
    """Channel concat of a list of (N, C_i, H, W) maps: the fusion node of a decoder stage."""

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

    def __init__(self, c_deep, c_skip, convs):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2, bias=False), nn.BatchNorm2d(c_skip),
                                nn.ReLU(inplace=True))
        self.fuse = Concat()
        self.block = _block(2 * c_skip, c_skip, convs)

    def forward(self, deep, skip):
        return self.block(self.fuse([self.up(deep), skip]))


class TinyUNet(nn.Module):
    """U-Net with ``depth`` poolings and widths ``width * 2**level``.

    Args: in_channels, num_classes; width: channels of the first level; depth: number of
    down/up stages (= fusion nodes); convs: 3x3 convs per block.
    Input (N, in_channels, H, W) with H, W divisible by 2**depth; output logits
    (N, num_classes, H, W).
    """

    def __init__(self, in_channels=3, num_classes=5, width=8, depth=3, convs=2):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.stem = _block(in_channels, widths[0], convs)
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _block(widths[i], widths[i + 1], convs))
                                   for i in range(depth))
        self.decoders = nn.ModuleList(Decoder(widths[i + 1], widths[i], convs) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for dec in self.decoders:
            h = dec(h, skips.pop())
        return self.head(h)
