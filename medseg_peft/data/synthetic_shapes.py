"""The demo model's *source* task: generic shapes on textures, deliberately not polyps.

The embedded demo SAM is pretrained here so that the default polyp run shows an honest adaptation:
a model that learnt to cut out polygons, stars and rings from busy backgrounds knows what "an object"
is, but has never seen mucosa, lighting falloff or lesions, so its zero-shot polyp masks are weak and
tuning a few of its weights has something to learn.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random background: smooth noise, stripes, a checkerboard or a gradient, in random colours."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(4)
    if kind == 0:
        low = rng.random((size // 16 + 2, size // 16 + 2))
        field = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    elif kind == 1:
        angle, freq = rng.uniform(0, math.pi), rng.uniform(4, 20)
        field = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    elif kind == 2:
        cells = rng.integers(3, 12)
        field = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        field = xx * math.cos(angle) + yy * math.sin(angle)
        field = (field - field.min()) / (np.ptp(field) + 1e-6)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = a[None, None] * (1 - field[..., None]) + b[None, None] * field[..., None]
    return img + rng.normal(0, rng.uniform(2, 12), img.shape)


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    kind = rng.integers(3)
    if kind == 0:  # regular-ish polygon, 3 to 6 corners
        n = rng.integers(3, 7)
        radii = np.full(n, r)
    elif kind == 1:  # star
        n = 2 * rng.integers(4, 7)
        radii = np.where(np.arange(n) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
    else:  # irregular polygon
        n = rng.integers(5, 9)
        radii = r * rng.uniform(0.5, 1.0, n)
    start = rng.uniform(0, 2 * math.pi)
    angles = start + np.arange(n) * 2 * math.pi / n
    return [(cx + rr * math.cos(t), cy + rr * math.sin(t)) for rr, t in zip(radii, angles)]


def shapes_image_pair(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 [H, W, 3], mask uint8 [H, W] in {0, 1})`` sample of the source task."""
    img = _texture(rng, size)
    mask = Image.new("L", (size, size), 0)
    colour_layer = Image.new("RGB", (size, size), (0, 0, 0))
    draw_mask, draw_colour = ImageDraw.Draw(mask), ImageDraw.Draw(colour_layer)
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.08, 0.3) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.2:  # ring
            box = [cx - r, cy - r, cx + r, cy + r]
            width = max(2, int(r * rng.uniform(0.2, 0.45)))
            draw_mask.ellipse(box, outline=255, width=width)
            draw_colour.ellipse(box, outline=colour, width=width)
        else:
            pts = _polygon(rng, cx, cy, r)
            draw_mask.polygon(pts, fill=255)
            draw_colour.polygon(pts, fill=colour)
    m = np.asarray(mask) > 127
    shapes = np.asarray(colour_layer, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    img[m] = shapes[m]
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0))))
    return img, m.astype(np.uint8)
