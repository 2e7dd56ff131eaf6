"""Procedural breast-ultrasound-like images for the segmentation task of ``q2ext demo``.

An image is formed the way a B-mode scan is, all in batched tensor ops from one seeded
``torch.Generator`` (no download, thousands of images per second):

1. **Echogenicity map** (the tissue's mean backscatter, linear scale): horizontal layers
   with wavy, tilted boundaries (skin, fat, gland, muscle), each with its own level, thin
   bright fascia lines between them, a horizontally stretched texture (fibres), and
   hypoechoic fat lobules in the fat layer (distractors: dark, smooth, but not lesions).
2. **Lesions** (0-2 per image), three classes that differ in what a sonographer reads:
   1 *cyst*: round, smooth, anechoic, with posterior acoustic enhancement;
   2 *benign solid*: oval, wider than tall, gently lobulated, mildly hypoechoic, no
   posterior change; 3 *malignant*: taller than wide, spiculated border, hypoechoic and
   heterogeneous, posterior shadowing.  A share of lesions is faint (echo level close to
   the tissue's, weak posterior effect), so class and extent need context.
3. **Speckle**: complex Gaussian scatterers weighted by sqrt(echogenicity), smoothed by an
   anisotropic point-spread function (wider laterally than axially), magnitude squared,
   then **log-compressed** over a fixed dynamic range to [0, 1].

Outputs one channel; masks hold 0 background, 1 cyst, 2 benign, 3 malignant (a later lesion
occludes an earlier one).  The lesion mask is the lesion's own boundary; the posterior
effect (below it) is not part of any lesion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLASS_NAMES = ("background", "cyst", "benign", "malignant")
NUM_CLASSES = len(CLASS_NAMES)

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "UltrasoundConfig", "generate"]


@dataclass(frozen=True)
class UltrasoundConfig:
    """What the generator draws.

    size: image side in pixels.  max_lesions: lesions per image (0..max_lesions).
    faint: share of lesions drawn faint.  dynamic_range_db: log-compression range.
    psf_lateral/psf_axial: point-spread function sigma in pixels.  looks: independent speckle
    realisations averaged (spatial compounding, as breast scanners do).  speckle: False draws the
    noise-free log-compressed echogenicity (for tests and pictures).
    chunk: images drawn per generator stream (whole chunks do not depend on the count asked).
    """

    size: int = 48
    max_lesions: int = 2
    faint: float = 0.3
    dynamic_range_db: float = 30.0
    psf_lateral: float = 1.2
    psf_axial: float = 0.6
    speckle: bool = True
    looks: int = 3
    chunk: int = 256


def _u(g, shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _smooth(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] (circular padding: no dark borders)."""
    ky, kx = _gauss_kernel(sigma_y), _gauss_kernel(sigma_x)
    c = x.shape[1]
    x = F.pad(x, (0, 0, len(ky) // 2, len(ky) // 2), mode="circular")
    x = F.conv2d(x, ky.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)
    x = F.pad(x, (len(kx) // 2, len(kx) // 2, 0, 0), mode="circular")
    return F.conv2d(x, kx.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)


def _unit_noise(g, b, s, sigma_y, sigma_x):
    """Smoothed Gaussian noise [B, S, S] rescaled to unit std."""
    n = _smooth(torch.randn(b, 1, s, s, generator=g), sigma_y, sigma_x)[:, 0]
    return n / n.flatten(1).std(1).clamp_min(1e-6).view(b, 1, 1)


def _tissue(g, b, x, y, s):
    """Layered echogenicity [B, S, S] (linear) and the fat layer's band [B, S, S] in {0, 1}."""
    # four layers: skin, subcutaneous fat (dark), gland (bright), muscle (medium)
    base = torch.stack([_u(g, (b,), 0.04, 0.09), _u(g, (b,), 0.22, 0.34), _u(g, (b,), 0.72, 0.85)], 1)
    tilt = _u(g, (b, 3), -0.12, 0.12)
    amp = _u(g, (b, 3), 0.0, 0.04)
    freq = _u(g, (b, 3), 0.5, 2.0)
    phase = _u(g, (b, 3), 0, 2 * math.pi)
    bx = x[0, 0]  # [S] lateral coordinate
    b_lines = (base.view(b, 3, 1) + tilt.view(b, 3, 1) * (bx - 0.5)
               + amp.view(b, 3, 1) * torch.sin(2 * math.pi * freq.view(b, 3, 1) * bx + phase.view(b, 3, 1)))
    levels = torch.stack([_u(g, (b,), 0.5, 0.9), _u(g, (b,), 0.25, 0.45), _u(g, (b,), 0.7, 1.0),
                          _u(g, (b,), 0.35, 0.6)], 1)  # skin, fat, gland, muscle
    layer = (y.unsqueeze(1) > b_lines.view(b, 3, 1, s)).sum(1)  # [B, S, S] in 0..3
    echo = torch.gather(levels, 1, layer.flatten(1)).view(b, s, s)
    fascia = sum(torch.exp(-0.5 * ((y - b_lines[:, i].view(b, 1, s)) * s / 0.7) ** 2) for i in range(3))
    echo = echo * (1 + _u(g, (b, 1, 1), 0.8, 2.0) * fascia)
    fibres = _unit_noise(g, b, s, 0.7, 3.5)
    echo = echo * torch.exp(_u(g, (b, 1, 1), 0.15, 0.35) * fibres)
    return echo, (layer == 1).float(), b_lines


def _radial_border(g, b, theta, kind):
    """r(theta) / r0 of a lesion border, [B, S, S], per class kind."""
    if kind == 1:  # cyst: nearly round
        ks, amp = (2, 3), (0.0, 0.04)
    elif kind == 2:  # benign: lobulated
        ks, amp = (3, 4, 5), (0.03, 0.09)
    else:  # malignant: spiculated
        ks, amp = (7, 9, 11, 13), (0.04, 0.1)
    r = torch.ones_like(theta)
    for k in ks:
        a = _u(g, (b, 1, 1), *amp)
        ph = _u(g, (b, 1, 1), 0, 2 * math.pi)
        wave = torch.cos(k * theta + ph)
        if kind == 3:  # sharp spikes rather than smooth ripples
            wave = 2 * wave.clamp_min(0) ** 2 - 0.5
        r = r + a * wave
    return r


# Per class: echo factor range (inside / tissue), faint range, posterior gain range,
# horizontal and vertical half-extent ranges (fraction of the side).
_CLASSES = {
    1: dict(echo=(0.04, 0.15), faint=(0.45, 0.65), post=(1.5, 2.2), rx=(0.07, 0.15), aspect=(0.8, 1.1)),
    2: dict(echo=(0.35, 0.6), faint=(0.6, 0.8), post=(0.95, 1.1), rx=(0.09, 0.19), aspect=(0.45, 0.7)),
    3: dict(echo=(0.25, 0.5), faint=(0.6, 0.8), post=(0.3, 0.6), rx=(0.06, 0.12), aspect=(1.1, 1.6)),
}


def _lesions(g, b, x, y, s, echo, cfg):
    """Draw the lesions into `echo`; returns (echo, mask [B, S, S] int64, posterior gain map)."""
    mask = torch.zeros(b, s, s, dtype=torch.long)
    gain = torch.ones(b, s, s)
    count = torch.randint(0, cfg.max_lesions + 1, (b,), generator=g)
    for slot in range(cfg.max_lesions):
        active = (count > slot).view(b, 1, 1)
        cls = torch.randint(1, NUM_CLASSES, (b,), generator=g)
        faint = torch.rand(b, generator=g) < cfg.faint
        cx, cy = _u(g, (b, 1, 1), 0.2, 0.8), _u(g, (b, 1, 1), 0.3, 0.62)
        region = torch.zeros(b, s, s, dtype=torch.bool)
        inside_echo = torch.ones(b, s, s)
        post_gain = torch.ones(b, 1, 1)
        rx_all, ry_all = torch.zeros(b, 1, 1), torch.zeros(b, 1, 1)
        for k, spec in _CLASSES.items():
            sel = (cls == k).view(b, 1, 1)
            rx = _u(g, (b, 1, 1), *spec["rx"])
            ry = rx * _u(g, (b, 1, 1), *spec["aspect"])
            du, dv = (x - cx) / rx, (y - cy) / ry
            theta = torch.atan2(dv, du)
            border = _radial_border(g, b, theta, k)
            inside = (du * du + dv * dv).sqrt() <= border
            level = torch.where(faint.view(b, 1, 1), _u(g, (b, 1, 1), *spec["faint"]), _u(g, (b, 1, 1), *spec["echo"]))
            if k == 3:  # heterogeneous interior
                level = level * torch.exp(0.35 * _unit_noise(g, b, s, 1.0, 1.0))
            pg = _u(g, (b, 1, 1), *spec["post"])
            pg = torch.where(faint.view(b, 1, 1), 1 + 0.4 * (pg - 1), pg)
            region = torch.where(sel, inside, region)
            inside_echo = torch.where(sel, level.expand(b, s, s), inside_echo)
            post_gain = torch.where(sel, pg, post_gain)
            rx_all = torch.where(sel, rx, rx_all)
            ry_all = torch.where(sel, ry, ry_all)
        region = region & active
        # posterior column: starts at the lesion's centre, as wide as the lesion, fades with depth
        lateral = ((rx_all * 0.9 + 1.5 / s - (x - cx).abs()) * s / 1.5).clamp(0, 1)
        depth = ((y - cy) * s / 2.0).clamp(0, 1) * torch.exp(-(y - cy - ry_all).clamp_min(0) / 0.35)
        column = lateral * depth * active
        gain = gain * (1 + (post_gain - 1) * column)
        echo = torch.where(region, echo * inside_echo, echo)
        mask = torch.where(region, cls.view(b, 1, 1), mask)
    # the posterior effect acts on what lies behind the lesion, not inside it
    echo = torch.where(mask > 0, echo, echo * gain)
    return echo, mask, gain


def _fat_lobules(g, b, x, y, s, echo, fat_band):
    """Dark elongated blobs inside the fat layer: lesion look-alikes that are background."""
    for _ in range(2):
        cx, cy = _u(g, (b, 1, 1), 0.1, 0.9), _u(g, (b, 1, 1), 0.12, 0.32)
        rx, ry = _u(g, (b, 1, 1), 0.05, 0.12), _u(g, (b, 1, 1), 0.025, 0.05)
        blob = torch.exp(-0.5 * (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) ** 2)
        depth = _u(g, (b, 1, 1), 0.3, 0.7)
        echo = echo * (1 - depth * blob * fat_band)
    return echo


def _chunk(seed: int, index: int, n: int, cfg: UltrasoundConfig):
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    s = cfg.size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    x, y = xx.expand(n, s, s), yy.expand(n, s, s)
    echo, fat_band, _ = _tissue(g, n, x, y, s)
    echo = _fat_lobules(g, n, x, y, s, echo, fat_band)
    # depth attenuation left after time-gain compensation: a mild random tilt in depth
    echo = echo * torch.exp(-_u(g, (n, 1, 1), -0.3, 0.6) * y)
    tissue = echo.clone()
    echo, mask, gain = _lesions(g, n, x, y, s, echo, cfg)
    if cfg.speckle:
        # real and imaginary scatterer fields per look; |PSF * field|^2 has mean echo * sum(PSF^2);
        # the scanner averages `looks` independent looks (spatial compounding)
        scat = torch.randn(n, 2 * cfg.looks, s, s, generator=g) * echo.sqrt().unsqueeze(1)
        field = _smooth(scat, cfg.psf_axial, cfg.psf_lateral)
        psf_energy = _gauss_kernel(cfg.psf_axial).square().sum() * _gauss_kernel(cfg.psf_lateral).square().sum()
        intensity = field.square().sum(1) / (2 * cfg.looks * psf_energy)
    else:
        intensity = echo
    db = 10 * torch.log10(intensity + 1e-8)
    top = 10 * math.log10(8.0)  # the brightest speckle of bright tissue (a few x its mean) reaches the top
    image = ((db - (top - cfg.dynamic_range_db)) / cfg.dynamic_range_db).clamp(0, 1)
    return image.unsqueeze(1), mask, echo, tissue, gain


def generate(n: int, seed: int, cfg: UltrasoundConfig = UltrasoundConfig(), return_maps: bool = False):
    """``n`` images and masks, a pure function of (n, seed, cfg).

    Returns images float32 [n, 1, S, S] in [0, 1] and masks int64 [n, S, S] in
    0..NUM_CLASSES-1.  With ``return_maps`` also a dict of float32 [n, S, S] maps:
    "echo" (final echogenicity, before speckle), "tissue" (before the lesions and their
    posterior effect) and "gain" (the posterior gain, 1 where no lesion acts).
    Images are drawn in chunks of ``cfg.chunk``, each chunk from its own stream, so the
    first k * chunk images do not depend on n.
    """
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    parts = [_chunk(seed, i, min(cfg.chunk, n - i * cfg.chunk), cfg) for i in range(-(-n // cfg.chunk))]
    images = torch.cat([p[0] for p in parts])
    masks = torch.cat([p[1] for p in parts])
    if return_maps:
        maps = {k: torch.cat([p[i] for p in parts]) for i, k in ((2, "echo"), (3, "tissue"), (4, "gain"))}
        return images, masks, maps
    return images, masks
