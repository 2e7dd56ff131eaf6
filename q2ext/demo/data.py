"""Procedural segmentation data for ``q2ext demo``: textured, noisy, occluding shapes.

Every image is drawn in memory from a seeded ``torch.Generator`` (no download; the same
tensors on every machine that shares torch's CPU RNG).  Each class has its own shape and
its own kind of texture (stripes, checks, flat, rings) whose orientation, frequency, phase
and colours are random; sizes, aspect ratios and rotations are random too.  The
background is a smooth two-colour field overlaid with a fainter texture of a random kind,
so texture alone is ambiguous near the background and within a noisy patch: a pixel's
class needs the texture over a region and the outline (context: the deep, low-resolution
branch of a U-Net) while its border needs full resolution (the shallow skip branch), so
both branches of every decoder fusion node carry information.  Shapes overlap: later
shapes occlude earlier ones, and the mask keeps the class of the topmost shape.

Classes: 0 background, 1 ellipse (stripes), 2 rectangle (checks), 3 triangle (flat),
4 cross (rings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLASS_NAMES = ("background", "ellipse", "rectangle", "triangle", "cross")
NUM_CLASSES = len(CLASS_NAMES)

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "ShapesConfig", "generate", "make_splits"]


@dataclass(frozen=True)
class ShapesConfig:
    """What the generator draws.

    size: image side H = W in pixels.  min_shapes/max_shapes: shapes per image.
    min_scale/max_scale: shape half-extent as a fraction of the side (scale variety).
    noise: std of the additive Gaussian pixel noise (images live roughly in [0, 1]).
    texture: contrast of the textures inside shapes (0: flat colours).
    bg_texture: contrast of the background's texture (a random one of the four kinds).
    """

    size: int = 32
    min_shapes: int = 1
    max_shapes: int = 3
    min_scale: float = 0.18
    max_scale: float = 0.38
    noise: float = 0.08
    texture: float = 0.9
    bg_texture: float = 0.2


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


TEXTURES = ("stripes", "checks", "flat", "rings")


def _texture(g, u, v, kind):
    """A [H, W] pattern in [0, 1] of the given kind, random orientation, frequency and phase."""
    phi = _uniform(g, 0, math.pi)
    freq = _uniform(g, 3.0, 6.0)  # cycles per unit length (the image side is 1)
    phase = _uniform(g, 0, 2 * math.pi)
    a = u * math.cos(phi) + v * math.sin(phi)
    b = -u * math.sin(phi) + v * math.cos(phi)
    if kind == "stripes":
        pattern = torch.sin(2 * math.pi * freq * a + phase)
    elif kind == "checks":
        pattern = torch.sign(torch.sin(2 * math.pi * freq * a + phase) * torch.sin(2 * math.pi * freq * b))
    elif kind == "rings":
        pattern = torch.cos(2 * math.pi * 1.5 * freq * torch.sqrt(u * u + v * v))
    else:
        pattern = torch.zeros_like(u)
    return 0.5 + 0.5 * pattern


def _colours(g, contrast):
    """A random RGB colour (3, 1, 1) and a second one `contrast` away from it (the texture's)."""
    c1 = torch.rand(3, 1, 1, generator=g)
    direction = torch.randn(3, 1, 1, generator=g)
    return c1, (c1 + contrast * direction / direction.norm()).clamp(0, 1)


def _shape_mask(cls, u, v, a, b):
    """Boolean [H, W] region of class `cls` in the shape's own frame (u, v), half-extents a, b."""
    if cls == 1:  # ellipse
        return (u / a) ** 2 + (v / b) ** 2 <= 1
    if cls == 2:  # rectangle
        return (u.abs() <= a) & (v.abs() <= b)
    if cls == 3:  # triangle: apex at v = -b, base at v = +b
        return (v <= b) & (u.abs() * (2 * b) <= a * (v + b))
    # cross: two bars of a third of the extent
    return ((u.abs() <= a) & (v.abs() <= b / 3)) | ((u.abs() <= a / 3) & (v.abs() <= b))


def _background(g, cfg, x, y):
    """A coloured field: a smooth blend of two random colours plus a texture of its own."""
    c1, c2 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    low = torch.rand(1, 1, 4, 4, generator=g)
    blend = torch.nn.functional.interpolate(low, size=(cfg.size, cfg.size), mode="bilinear",
                                            align_corners=False)[0]
    base = c1 * blend + c2 * (1 - blend)
    kind = TEXTURES[int(torch.randint(len(TEXTURES), (), generator=g))]
    return base + cfg.bg_texture * (_texture(g, x - 0.5, y - 0.5, kind) - 0.5)


def _sample(g, cfg: ShapesConfig):
    s = cfg.size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    image = _background(g, cfg, x, y)
    background = image.clone()
    mask = torch.zeros(s, s, dtype=torch.long)
    n = int(torch.randint(cfg.min_shapes, cfg.max_shapes + 1, (), generator=g))
    for _ in range(n):
        cls = int(torch.randint(1, NUM_CLASSES, (), generator=g))
        cx, cy = _uniform(g, 0.15, 0.85), _uniform(g, 0.15, 0.85)
        a = _uniform(g, cfg.min_scale, cfg.max_scale)
        b = a * _uniform(g, 0.6, 1.0)  # aspect variety, classes keep their topology
        theta = _uniform(g, 0, 2 * math.pi)
        u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
        v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
        region = _shape_mask(cls, u, v, a, b)
        c1, c2 = _colours(g, 2 * cfg.texture)
        tex = _texture(g, u, v, TEXTURES[cls - 1])
        fill = c1 * tex + c2 * (1 - tex)
        image = torch.where(region, fill, image)  # occlusion: the newest shape is on top
        mask[region] = cls
    return image, mask, background


def generate(n: int, seed: int, cfg: ShapesConfig = ShapesConfig(), return_background: bool = False):
    """``n`` images and masks, a pure function of (n, seed, cfg).

    Returns images float32 (n, 3, H, W) (roughly [0, 1] plus noise), masks int64 (n, H, W)
    with values in 0..NUM_CLASSES-1, and with ``return_background`` the noise-free
    background (n, 3, H, W) each image was drawn on.  Pixel noise is drawn last from the
    same generator, so ``cfg.noise = 0`` gives exactly the drawn shapes.
    """
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    samples = [_sample(g, cfg) for _ in range(n)]
    images = torch.stack([s[0] for s in samples])
    masks = torch.stack([s[1] for s in samples])
    if cfg.noise > 0:
        images = images + cfg.noise * torch.randn(images.shape, generator=g)
    if return_background:
        return images, masks, torch.stack([s[2] for s in samples])
    return images, masks


def make_splits(n_train: int, n_val: int, seed: int, cfg: ShapesConfig = ShapesConfig()):
    """(train_images, train_masks, val_images, val_masks): disjoint draws (different generator
    streams), images standardised with the training set's per-channel mean/std."""
    xt, yt = generate(n_train, seed, cfg)
    xv, yv = generate(n_val, seed + 1_000_003, cfg)
    mean = xt.mean((0, 2, 3), keepdim=True)
    std = xt.std((0, 2, 3), keepdim=True)
    return (xt - mean) / std, yt, (xv - mean) / std, yv
