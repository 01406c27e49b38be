"""Colonoscopy-like synthetic polyps: the default target task when no real dataset is given.

The images imitate what makes real polyp segmentation hard rather than what makes it look pretty:
lesions are redder (congested) or paler than the mucosa, but weaker colour shifts of the same kinds
also appear as flat, unlabelled patches; what gives a polyp away is its colour together with its
*shape in light*: a dome lit by the scope's own lamp, a shadow at its base, specular glints on its
top and a rim where it rises from the wall. Folds, vessels, a dark lumen, lighting falloff, black
corners and JPEG noise add the clutter of a real frame. So a model that has only learnt "a uniformly
coloured object on a background" (the demo SAM's source task) does poorly here zero-shot, and its
encoder has something real to learn. (Version 1 made some lesions the mucosa's own hue: a task no
method could learn well from 200 images in the default run's minutes, which hid the differences
between methods.)

Only NumPy and PIL are used (no SciPy): smooth noise is low-resolution Gaussian noise upsampled
bicubically, which is also what keeps 200 images of 128 px to about a second.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medseg_peft.data.cache import build_once, default_cache_dir

GENERATOR_VERSION = 2  # bump when the images change, so stale caches are not reused


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, feature_px: float) -> np.ndarray:
    """Zero-mean, unit-std noise whose blobs are about ``feature_px`` pixels across."""
    n = max(2, int(math.ceil(size / max(feature_px, 1.0)))) + 2
    low = rng.standard_normal((n, n)).astype(np.float32)
    field = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _fractal_noise(rng: np.random.Generator, size: int, feature_px: float, octaves: int = 3) -> np.ndarray:
    field = sum(0.5**k * _smooth_noise(rng, size, feature_px / 2**k) for k in range(octaves))
    return field / (field.std() + 1e-6)


def _blob(rng: np.random.Generator, size: int, cx: float, cy: float, r0: float, aspect: float, reach: float):
    """A perturbed ellipse, evaluated only in the window it can affect (``reach`` x its radius).

    Returns ``(window, ratio, yy, xx)``: ``window`` slices the image, ``ratio`` is distance over the
    outline's radius in that window (< 1 inside, 1 on the outline), ``yy, xx`` are its pixel
    coordinates. Working in the window instead of the whole frame is what keeps generation fast.
    """
    half = 1.25 * reach * r0 + 2  # the wobble below stretches the radius by at most ~1.2
    y0, y1 = max(0, int(cy - half)), min(size, int(math.ceil(cy + half)) + 1)
    x0, x1 = max(0, int(cx - half)), min(size, int(math.ceil(cx + half)) + 1)
    window = (slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1)))
    yy, xx = (g[window] for g in _grid(size))
    rot = rng.uniform(0, math.pi)
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(rot) + dy * math.sin(rot)
    v = (-dx * math.sin(rot) + dy * math.cos(rot)) / aspect
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in range(2, 6):
        wobble += rng.uniform(0.0, 0.16 / k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return window, np.sqrt(u * u + v * v) / (r0 * wobble), yy, xx


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _illumination(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float], float]:
    """Light from the scope: radial falloff around the image centre and darkness down the lumen."""
    yy, xx = _grid(size)
    c = (size - 1) / 2
    r_centre = np.hypot(xx - c, yy - c) / (size / 2)
    light = 1.0 - rng.uniform(0.25, 0.55) * r_centre**2
    if rng.random() < 0.7:  # the lumen is in (or just outside) the frame: farther wall is darker
        lx, ly = c + rng.uniform(-0.6, 0.6) * size, c + rng.uniform(-0.6, 0.6) * size
        lumen_r = rng.uniform(0.12, 0.3) * size
    else:  # looking at the wall: the lumen is far off-frame
        ang = rng.uniform(0, 2 * math.pi)
        lx, ly = c + 1.6 * size * math.cos(ang), c + 1.6 * size * math.sin(ang)
        lumen_r = rng.uniform(0.6, 1.0) * size
    r_lumen = np.hypot(xx - lx, yy - ly)
    light *= 0.12 + 0.88 * (1.0 - np.exp(-((r_lumen / lumen_r) ** 2)))
    return light.astype(np.float32), (lx, ly), lumen_r


def _folds(rng: np.random.Generator, size: int, lumen: tuple[float, float], lumen_r: float) -> np.ndarray:
    """Haustral folds: partial rings around the lumen, a lit crest with a shadow on the lumen side."""
    yy, xx = _grid(size)
    lx, ly = lumen
    r = np.hypot(xx - lx, yy - ly) * (1 + 0.07 * _smooth_noise(rng, size, size / 1.5))
    theta = np.arctan2(yy - ly, xx - lx)
    shade = np.zeros((size, size), np.float32)
    scale = size / 128
    radius = lumen_r * rng.uniform(0.8, 1.3)
    for _ in range(rng.integers(1, 5)):
        radius += rng.uniform(0.12, 0.35) * size
        width = rng.uniform(4.0, 9.0) * scale * (radius / size + 0.5)  # nearer folds look wider
        d = (r - radius) / width
        arc = (0.5 + 0.5 * np.cos(theta - rng.uniform(-math.pi, math.pi))) ** rng.uniform(0.5, 3.0)
        crest = rng.uniform(0.08, 0.2) * np.exp(-((d - 0.5) ** 2))
        shadow = rng.uniform(0.12, 0.3) * np.exp(-((d + 0.6) ** 2) / 0.6)
        shade += arc * (crest - shadow)
    return shade


def _vessels(rng: np.random.Generator, size: int) -> np.ndarray:
    """Thin wandering lines, 0..1, for submucosal vessels."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    step = size / 40
    for _ in range(rng.integers(0, 7)):
        x, y, ang = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, 2 * math.pi)
        pts = [(x, y)]
        for _ in range(rng.integers(8, 30)):
            ang += rng.normal(0, 0.35)
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
            pts.append((x, y))
        draw.line(pts, fill=int(rng.integers(90, 200)), width=max(1, int(round(size / 128 * rng.uniform(0.6, 1.6)))))
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.5 * size / 128)), dtype=np.float32) / 255


def _highlights(rng: np.random.Generator, size: int, centres: list[tuple[float, float]]) -> np.ndarray:
    """Specular glints, 0..1: small saturated blobs with a soft halo."""
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    scale = size / 128
    for cx, cy in centres:
        rx, ry = rng.uniform(0.5, 2.6) * scale, rng.uniform(0.5, 2.0) * scale
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.8 * scale)), dtype=np.float32) / 255


def _mucosa(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mucosa colour ``[H, W, 3]`` (0-255, before lighting): pink to orange-red, blotchy, finely grained."""
    red = rng.uniform(175, 235)
    base = np.array([red, red * rng.uniform(0.42, 0.64), red * rng.uniform(0.36, 0.56)], np.float32)
    bright = 1 + 0.07 * _fractal_noise(rng, size, size / rng.uniform(3, 8))
    redness = 0.06 * _fractal_noise(rng, size, size / rng.uniform(2, 5))  # > 0: redder, less green/blue
    grain = 0.025 * _smooth_noise(rng, size, rng.uniform(1.5, 3.0) * size / 128)
    img = base[None, None] * (bright + grain)[..., None]
    img[..., 1] *= 1 - redness
    img[..., 2] *= 1 - 0.8 * redness
    return img


def _tint(rng: np.random.Generator) -> np.ndarray:
    """Multiplicative RGB change of a lesion or a flat patch: redder, paler, or almost none."""
    kind = rng.integers(3)
    if kind == 0:  # congested, redder
        g = rng.uniform(0.78, 0.95)
        return np.array([rng.uniform(0.95, 1.05), g, g * rng.uniform(0.95, 1.05)], np.float32)
    if kind == 1:  # paler, whitish-pink
        f = rng.uniform(1.04, 1.15)
        return np.array([rng.uniform(0.98, 1.04), f, f * rng.uniform(1.0, 1.08)], np.float32)
    return np.array(rng.uniform(0.96, 1.04, 3), np.float32)


def _lesion_tint(rng: np.random.Generator) -> np.ndarray:
    """A polyp's colour change: clearly redder or paler than the mucosa (stronger than any flat patch's)."""
    if rng.integers(2) == 0:  # congested, redder
        g = rng.uniform(0.62, 0.82)
        return np.array([rng.uniform(0.98, 1.08), g, g * rng.uniform(0.95, 1.05)], np.float32)
    f = rng.uniform(1.12, 1.3)  # paler, whitish-pink
    return np.array([rng.uniform(0.98, 1.04), f, f * rng.uniform(1.0, 1.08)], np.float32)


def _n_polyps(rng: np.random.Generator) -> int:
    return int(rng.choice([0, 1, 2, 3], p=[0.04, 0.62, 0.24, 0.10]))


def polyp_image_pair(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 [H, W, 3], mask uint8 [H, W] in {0, 1})`` colonoscopy-like sample.

    About 4 % of images show no polyp (the mask is empty), as real screening frames do.
    """
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    scale = size / 128
    yy, xx = _grid(size)
    light, lumen, lumen_r = _illumination(rng, size)
    img = _mucosa(rng, size)
    light = light * (1 + _folds(rng, size, lumen, lumen_r))

    vessels = _vessels(rng, size)[..., None]
    img *= 1 - vessels * np.array([0.18, 0.35, 0.3], np.float32)

    for _ in range(rng.integers(0, 4)):  # flat, unlabelled colour patches: colour alone is not the answer
        r0 = size * math.exp(rng.uniform(math.log(0.06), math.log(0.25)))
        win, ratio, _, _ = _blob(rng, size, rng.uniform(0, size), rng.uniform(0, size), r0, rng.uniform(0.5, 1.0), reach=1.3)
        soft = 1 - _smoothstep(0.6, 1.3, ratio)
        img[win] *= 1 + soft[..., None] * (_tint(rng) - 1)

    mask = np.zeros((size, size), bool)
    glints: list[tuple[float, float]] = []
    light_dir = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), 1.0], np.float32)
    light_dir /= np.linalg.norm(light_dir)
    for _ in range(_n_polyps(rng)):
        r0 = size * math.exp(rng.uniform(math.log(0.05), math.log(0.26)))
        cx, cy = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size
        win, ratio, wy, wx = _blob(rng, size, cx, cy, r0, rng.uniform(0.6, 1.0), reach=1.5)
        inside = ratio < 1
        if not inside.any():
            continue
        mask[win] |= inside
        # dome height -> surface normal -> Lambert shading from the scope's lamp
        # (a finite slope at the edge: a steeper profile draws a dark outline no real polyp has)
        height = np.clip(1 - ratio**2, 0, 1) ** rng.uniform(0.9, 1.6) * r0 * rng.uniform(0.3, 0.7)
        gy, gx = np.gradient(height) if min(height.shape) > 1 else (np.zeros_like(height),) * 2
        normal_z = 1 / np.sqrt(gx * gx + gy * gy + 1)
        lambert = (-gx * light_dir[0] - gy * light_dir[1] + light_dir[2]) * normal_z - light_dir[2]  # 0 where flat
        texture = 1 + rng.uniform(0.02, 0.07) * _smooth_noise(rng, max(ratio.shape), rng.uniform(1.5, 4) * scale)[: ratio.shape[0], : ratio.shape[1]]
        surface = _lesion_tint(rng)[None, None] * texture[..., None]
        alpha = (1 - _smoothstep(0.9, 1.05, ratio))[..., None]
        polyp = img[win] * surface * (1 + rng.uniform(0.6, 1.2) * lambert)[..., None]
        # a soft shadow where it rises from the wall, on the side facing away from the lamp
        away = np.clip(((wx - cx) * -light_dir[0] + (wy - cy) * -light_dir[1]) / (r0 * 0.4 + 1e-6) + 0.3, 0, 1)
        base_shadow = 1 - rng.uniform(0.0, 0.25) * away * np.exp(-(((ratio - 1.08) / 0.14) ** 2))
        img[win] = (img[win] * base_shadow[..., None]) * (1 - alpha) + polyp * alpha
        if rng.random() < 0.75:  # glints near the dome top, nudged towards the lamp
            for _ in range(rng.integers(1, 4)):
                glints.append((cx + light_dir[0] * r0 * 0.5 + rng.normal(0, 0.25 * r0), cy + light_dir[1] * r0 * 0.5 + rng.normal(0, 0.25 * r0)))
    for _ in range(rng.integers(0, 5)):  # wet mucosa glints
        glints.append((rng.uniform(0, size), rng.uniform(0, size)))

    img *= light[..., None]
    spec = _highlights(rng, size, glints)[..., None] if glints else 0.0
    img = img * (1 - spec) + 250 * spec
    img += rng.uniform(1.0, 4.0) * rng.standard_normal(img.shape, dtype=np.float32)  # sensor noise

    if rng.random() < 0.3:  # the black, rounded corners of an endoscope frame
        c = (size - 1) / 2
        outside = np.hypot(xx - c, yy - c) > rng.uniform(0.68, 0.74) * size
        img[outside] = rng.uniform(0, 8)
        mask &= ~outside

    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * scale))
    if rng.random() < 0.5:  # Kvasir frames are JPEGs
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(out, dtype=np.uint8), mask.astype(np.uint8)


def synthetic_polyps_name(n_images: int, size: int, seed: int) -> str:
    return f"synthetic_polyps_n{n_images}_s{size}_seed{seed}_v{GENERATOR_VERSION}"


def make_synthetic_polyps(cache_dir: str | Path | None = None, n_images: int = 200, size: int = 128, seed: int = 0) -> Path:
    """Write ``n_images`` synthetic polyps once, in the Kvasir layout, and return their folder.

    The folder (``<cache_dir>/synthetic_polyps_n{n}_s{size}_seed{seed}_v{version}``) holds
    ``images/*.png``, ``masks/*.png`` (0/255) and ``done.json``. It is built in a temporary sibling and
    renamed into place, so an interrupted run or two processes racing (DDP ranks) never leave a
    half-written set behind; a folder with ``done.json`` is reused as it is. Image ``i`` depends only
    on ``(seed, i, size)``, so the same parameters give the same bytes with the same NumPy and Pillow
    (a different libjpeg or resampling code may change a few pixel values, never the layout).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    params = {"n_images": int(n_images), "size": int(size), "seed": int(seed), "generator_version": GENERATOR_VERSION}
    target = cache_dir / synthetic_polyps_name(n_images, size, seed)

    def build(tmp: Path) -> None:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        width = max(4, len(str(n_images - 1)))
        for i in range(n_images):
            rng = np.random.default_rng([int(seed), i, int(size)])
            image, mask = polyp_image_pair(rng, size)
            stem = f"polyp_{i:0{width}d}"
            # zlib level 1: files ~15 % larger than the default level 6, written four times faster
            Image.fromarray(image).save(tmp / "images" / f"{stem}.png", compress_level=1)
            Image.fromarray(mask * 255).save(tmp / "masks" / f"{stem}.png", compress_level=1)

    return build_once(target, params, build)
