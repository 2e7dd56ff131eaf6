"""Procedural detection scenes for ``q2ext demo --task det``: shapes among clutter and noise.

Every scene is drawn in memory from a seeded ``torch.Generator`` in batches (vectorised
over images and object slots), so thousands of training images take seconds and the same
``data_seed`` gives the same tensors on every machine sharing torch's CPU RNG.

A scene: a background colour with a faint texture (stripes or checks, sometimes none),
clutter (thin line segments in random colours, and rings - a fifth shape that is *not* a
class), then 1..``max_objects`` objects of four classes (ellipse, rectangle, triangle,
cross), each with a random size (log-uniform over ``min_size..max_size`` pixels), aspect
ratio, colour (a random direction and distance from the background under it) and, for a
third of them, a stripe or check texture of random frequency and phase.  Objects are
painted in order, so later ones occlude earlier ones; an object left with less than
``min_visible`` of its area visible is not painted at all, nor is one smaller than
``min_area`` pixels.  Gaussian pixel noise of a random level comes last.

Defaults chosen so that a small network learns the classes within the demo's budget:
with a spatially varying colour field behind the shapes (``bg_grid`` > 1) or random
rotations (``max_rotation``), a from-scratch shape classifier stayed at chance after 300
steps of 64 images (it memorised the training scenes instead), and so did the detector's
classification branch.

Boxes are amodal: the bounding box (x1, y1, x2, y2) of the object's full rendered mask,
in pixels, pixel (i, j) covering [j, j+1) x [i, i+1) - so the box of a mask is
``[xmin, ymin, xmax + 1, ymax + 1]`` of its pixel indices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "cross")
NUM_CLASSES = len(CLASS_NAMES)
_RING = NUM_CLASSES  # shape id of the distractor ring (not a class)

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "SceneConfig", "generate", "make_splits"]


@dataclass(frozen=True)
class SceneConfig:
    """What the generator draws.

    size: image side in pixels.  max_objects: objects per image are uniform in 1..max_objects.
    min_size/max_size: an object's longer side before rotation, pixels (log-uniform).
    max_aspect: aspect ratios are log-uniform in [1 / max_aspect, max_aspect].
    max_rotation: rotations are uniform in [-max_rotation, max_rotation] radians.
    min_visible: fraction of an object's area that must stay visible, else it is dropped.
    min_area: objects with fewer mask pixels are dropped.
    rings, lines: distractors per image, each uniform in 0..the value.
    noise: (lo, hi) of the per-image Gaussian noise std (images live roughly in [0, 1]).
    min_contrast: the colour distance between an object (or ring) and the background at its
        centre is uniform in [min_contrast, min_contrast + 0.5] (0 allows invisible objects).
    textured: probability that a shape (object or ring) is striped or checked, not flat.
    bg_grid: control points per side of the background's colour field (1: one flat colour).
    bg_texture: contrast of the background texture.  chunk: images rendered per batch.
    """

    size: int = 64
    max_objects: int = 8
    min_size: float = 8.0
    max_size: float = 36.0
    max_aspect: float = 1.6
    max_rotation: float = 0.0
    min_visible: float = 0.45
    min_area: int = 12
    rings: int = 2
    lines: int = 4
    noise: tuple = (0.02, 0.10)
    min_contrast: float = 0.15
    textured: float = 1 / 3
    bg_grid: int = 1
    bg_texture: float = 0.15
    chunk: int = 256


def _rand(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _shape_masks(shape_id, u, v):
    """Masks [P, H, W] of P shapes (``shape_id`` [P]) from local coords u, v [P, H, W]
    normalised by the half-extents; each shape is evaluated only on its own slots."""
    out = torch.zeros(u.shape, dtype=torch.bool)
    for k in range(NUM_CLASSES + 1):
        sel = (shape_id == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        a, c = u[sel], v[sel]
        if k == 0:
            m = a * a + c * c <= 1.0
        elif k == 1:
            m = (a.abs() <= 1.0) & (c.abs() <= 1.0)
        elif k == 2:
            m = (c.abs() <= 1.0) & (a.abs() <= (c + 1.0) * 0.5)       # apex at v = -1, base at v = +1
        elif k == 3:
            a, c = a.abs(), c.abs()
            t = 0.36                                                   # arm half-width
            m = ((a <= 1.0) & (c <= t)) | ((a <= t) & (c <= 1.0))
        else:
            r2 = a * a + c * c
            m = (r2 <= 1.0) & (r2 >= 0.25)
        out[sel] = m
    return out


def _pattern(g, p, xs, ys, textured=2 / 3):
    """Per-slot texture in {0, 1}, [P, H, W]: flat, or with probability ``textured`` stripes
    or checks (equally likely) of random frequency, angle and phase."""
    kind = torch.where(torch.rand(p, generator=g) < textured, torch.randint(1, 3, (p,), generator=g), 0)
    theta = _rand(g, p, 1, 1, hi=math.pi)
    freq = _rand(g, p, 1, 1, lo=0.35, hi=1.2)             # radians per pixel
    phase = _rand(g, p, 1, 1, hi=2 * math.pi)
    out = torch.ones(p, *xs.shape, dtype=torch.bool)
    tex = (kind > 0).nonzero().squeeze(1)
    if tex.numel():
        th, f, ph = theta[tex], freq[tex], phase[tex]
        pat = torch.sin(f * (xs * torch.cos(th) + ys * torch.sin(th)) + ph) > 0
        chk = (kind[tex] == 2).nonzero().squeeze(1)
        if chk.numel():
            th, f, ph = th[chk], f[chk], ph[chk]
            pat[chk] ^= torch.sin(f * (-xs * torch.sin(th) + ys * torch.cos(th)) + ph) > 0
        out[tex] = pat
    return out


def _background(g, b, s, cfg):
    """A colour (or, with bg_grid > 1, a smooth colour field) plus a faint texture, [B, 3, S, S]."""
    coarse = _rand(g, b, 3, cfg.bg_grid, cfg.bg_grid, lo=0.1, hi=0.9)
    bg = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bicubic", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    tex = _pattern(g, b, xs, ys)[:, None].float() - 0.5                # [B, 1, S, S]
    return (bg + cfg.bg_texture * tex * _rand(g, b, 1, 1, 1)).clamp(0, 1)


def _colours(g, bg_local, min_contrast):
    """Object colour [P, 3] between min_contrast and min_contrast + 0.5 (L2) away from the
    background colour under the object (``bg_local`` [P, 3]), in a random direction (flipped
    when it would leave the colour cube), and a second colour for textures."""
    p = bg_local.shape[0]
    d = torch.randn(p, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-6) * _rand(g, p, 1, lo=min_contrast, hi=min_contrast + 0.5)
    up = bg_local + d
    c1 = torch.where(((up < 0) | (up > 1)).any(1, keepdim=True), bg_local - d, up).clamp(0, 1)
    mix = _rand(g, p, 1, lo=0.3, hi=0.8)
    c2 = (1 - mix) * c1 + mix * _rand(g, p, 3)
    return c1, c2


def _shapes(g, present, shape_id, bg, cfg, xs, ys):
    """Render the shapes of the (image, slot) pairs where ``present`` [B, M] is True.

    shape_id: [B, M] long; bg: the background [B, 3, S, S]; sizes and contrast from cfg (a
    SceneConfig).  Returns the masks [B, M, S, S] (False where absent) and the colour of
    every pixel of every slot as (pattern [B, M, S, S], c1 [B, M, 3], c2 [B, M, 3]).
    Only the present slots are drawn, so the cost follows the number of objects.
    """
    b, m = present.shape
    s = xs.shape[-1]
    img_idx, slot_idx = present.nonzero(as_tuple=True)
    p = img_idx.numel()
    side = torch.exp(_rand(g, p, 1, 1, lo=math.log(cfg.min_size), hi=math.log(cfg.max_size)))
    aspect = torch.exp(_rand(g, p, 1, 1, lo=-math.log(cfg.max_aspect), hi=math.log(cfg.max_aspect)))
    half_w, half_h = side / 2 * aspect.clamp(max=1), side / 2 / aspect.clamp(min=1)
    margin = 0.35 * side
    cx = margin + _rand(g, p, 1, 1) * (s - 2 * margin)
    cy = margin + _rand(g, p, 1, 1) * (s - 2 * margin)
    rot = _rand(g, p, 1, 1, lo=-cfg.max_rotation, hi=cfg.max_rotation)
    dx, dy = xs - cx, ys - cy
    cos, sin = torch.cos(rot), torch.sin(rot)
    u = (dx * cos + dy * sin) / half_w
    v = (dy * cos - dx * sin) / half_h
    masks = torch.zeros(b, m, s, s, dtype=torch.bool)
    pattern = torch.zeros(b, m, s, s, dtype=torch.bool)
    c1 = torch.zeros(b, m, 3)
    c2 = torch.zeros(b, m, 3)
    masks[img_idx, slot_idx] = _shape_masks(shape_id[img_idx, slot_idx], u, v)
    pattern[img_idx, slot_idx] = _pattern(g, p, xs, ys, cfg.textured)
    ci = cx.reshape(-1).long().clamp(0, s - 1)
    cj = cy.reshape(-1).long().clamp(0, s - 1)
    c1[img_idx, slot_idx], c2[img_idx, slot_idx] = _colours(g, bg[img_idx, :, cj, ci], cfg.min_contrast)
    return masks, pattern, c1, c2


def _paint(img, masks, pattern, c1, c2):
    """Paint slots 0..M-1 in order (later ones on top) onto img [B, 3, S, S]."""
    for k in range(masks.shape[1]):
        colour = torch.where(pattern[:, k, None], c1[:, k, :, None, None], c2[:, k, :, None, None])
        img = torch.where(masks[:, k, None], colour, img)
    return img


def _render_chunk(g, b, cfg: SceneConfig, with_masks: bool):
    s = cfg.size
    bg = _background(g, b, s, cfg)
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32) + 0.5, torch.arange(s, dtype=torch.float32) + 0.5,
                            indexing="ij")                             # pixel centres

    # Clutter first: it lies under the objects.
    img = bg
    if cfg.rings:
        present = torch.arange(cfg.rings)[None] < torch.randint(0, cfg.rings + 1, (b, 1), generator=g)
        ring_id = torch.full((b, cfg.rings), _RING)
        img = _paint(img, *_shapes(g, present, ring_id, bg, cfg, xs, ys))
    img = _draw_lines(g, img, cfg.lines, xs, ys)

    m = cfg.max_objects
    labels = torch.randint(0, NUM_CLASSES, (b, m), generator=g)
    present = torch.arange(m)[None] < torch.randint(1, m + 1, (b, 1), generator=g)
    mask, pattern, c1, c2 = _shapes(g, present, labels, bg, cfg, xs, ys)
    active = present & (mask.sum((2, 3)) >= cfg.min_area)
    # Top to bottom: drop an object whose visible part (under the active ones above) is too small.
    above = torch.zeros(b, s, s, dtype=torch.bool)
    for k in reversed(range(m)):
        mk = mask[:, k] & active[:, k, None, None]
        area = mk.sum((1, 2)).clamp_min(1)
        visible = (mk & ~above).sum((1, 2)) / area
        active[:, k] &= visible >= cfg.min_visible
        above |= mask[:, k] & active[:, k, None, None]
    mask &= active[..., None, None]
    img = _paint(img, mask, pattern, c1, c2)
    sigma = _rand(g, b, 1, 1, 1, lo=cfg.noise[0], hi=cfg.noise[1])
    img = img + sigma * torch.randn(img.shape, generator=g)

    rows, cols = mask.any(3), mask.any(2)                              # [B, M, S]
    idx = torch.arange(s)
    big = s + 1
    x1 = torch.where(cols, idx, big).amin(-1)
    x2 = torch.where(cols, idx, -1).amax(-1) + 1
    y1 = torch.where(rows, idx, big).amin(-1)
    y2 = torch.where(rows, idx, -1).amax(-1) + 1
    boxes = torch.stack([x1, y1, x2, y2], -1).float()
    targets = [{"boxes": boxes[i][active[i]].contiguous(), "labels": labels[i][active[i]].long().contiguous()}
               for i in range(b)]
    if with_masks:
        for i in range(b):
            targets[i]["masks"] = mask[i][active[i]].contiguous()
    return img.float().contiguous(), targets


def _draw_lines(g, img, n_max, xs, ys):
    """Thin random line segments (distance to segment <= half the thickness) in random colours."""
    if n_max == 0:
        return img
    b = img.shape[0]
    s = img.shape[-1]
    n = torch.randint(0, n_max + 1, (b,), generator=g)
    p = _rand(g, b, n_max, 2, hi=s)
    q = p + (_rand(g, b, n_max, 2, lo=-1, hi=1) * s * 0.6)
    width = _rand(g, b, n_max, lo=0.5, hi=1.3)
    col = _rand(g, b, n_max, 3)
    for k in range(n_max):
        d = q[:, k] - p[:, k]                                          # [B, 2]
        px, py = xs[None] - p[:, k, 0, None, None], ys[None] - p[:, k, 1, None, None]
        t = ((px * d[:, 0, None, None] + py * d[:, 1, None, None]) / d.square().sum(1).clamp_min(1e-6)[:, None, None])
        t = t.clamp(0, 1)
        dist = (px - t * d[:, 0, None, None]).square() + (py - t * d[:, 1, None, None]).square()
        on = (dist <= width[:, k, None, None] ** 2) & (k < n)[:, None, None]
        img = torch.where(on[:, None], col[:, k, :, None, None], img)
    return img


def generate(n: int, seed: int, cfg: SceneConfig = SceneConfig(), with_masks: bool = False):
    """``n`` scenes from ``seed``: images float32 [n, 3, S, S] and a list of n target dicts
    ``{"boxes": float32 [k, 4] xyxy pixels, "labels": int64 [k]}`` (k >= 0; with
    ``with_masks`` also ``"masks"``: bool [k, S, S], each object's full mask)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"generate: n must be an int >= 0, got {n!r}")
    if cfg.max_objects < 1:
        raise ValueError(f"SceneConfig.max_objects must be >= 1, got {cfg.max_objects}")
    if not 0 < cfg.min_size <= cfg.max_size:
        raise ValueError(f"SceneConfig: need 0 < min_size <= max_size, got {cfg.min_size}, {cfg.max_size}")
    g = torch.Generator().manual_seed(int(seed))
    images, targets = [], []
    for start in range(0, n, cfg.chunk):
        x, t = _render_chunk(g, min(cfg.chunk, n - start), cfg, with_masks)
        images.append(x)
        targets += t
    if not images:
        return torch.zeros(0, 3, cfg.size, cfg.size), []
    return torch.cat(images), targets


def make_splits(data_seed: int, sizes: dict, cfg: SceneConfig = SceneConfig()) -> dict:
    """``{split: (images, targets)}`` for ``sizes = {"train": n, "val": n, "test": n}``; each
    split has its own stream derived from ``data_seed`` (no image is shared between splits)."""
    if isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0:
        raise ValueError(f"data_seed must be an int >= 0, got {data_seed!r}")
    offsets = {"train": 0, "val": 1, "test": 2}
    out = {}
    for name, n in sizes.items():
        if name not in offsets:
            raise ValueError(f"make_splits: unknown split {name!r}; valid: {list(offsets)}")
        out[name] = generate(n, data_seed * 1000 + 7 + offsets[name] * 104729, cfg)
    return out
