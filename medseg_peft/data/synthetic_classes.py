"""Small synthetic image-classification tasks, written in the VTAB-1k layout: the classification path's default.

Two tasks that share low-level statistics but not their labels, so pre-training on one and adapting
to the other is a miniature of ImageNet-21k -> VTAB: ``shapes`` (which of 8 shapes is drawn; the demo
ViT's source task) and ``counting`` (how many objects, 1 to 4, of mixed shapes; the default target,
a CLEVR-count in miniature). Objects vary in colour, size, position and background clutter.
Written once to the cache folder as ``<task>/images/...`` plus ``train800.txt``, ``val200.txt``,
``train800val200.txt`` and ``test.txt``, so the real VTAB-1k loader runs by default too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medseg_peft.data.cache import build_once, default_cache_dir

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
TASKS = {"shapes": len(SHAPES), "counting": 4}


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple, rng: np.random.Generator) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r / 2.5)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "bar":
        angle = rng.uniform(0, np.pi)
        dx, dy = r * np.cos(angle), r * np.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=max(1, int(r / 2.5)))
    else:  # star
        t = np.linspace(0, 2 * np.pi, 11)[:-1] + rng.uniform(0, np.pi)
        radius = np.where(np.arange(10) % 2 == 0, r, r / 2.3)
        draw.polygon(list(zip(cx + radius * np.cos(t), cy + radius * np.sin(t))), fill=colour)


def synthetic_image(rng: np.random.Generator, task: str, size: int = 32) -> tuple[np.ndarray, int]:
    """One ``(uint8 [size, size, 3], label)`` of ``task``."""
    background = rng.integers(0, 90, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if task == "shapes":
        label = int(rng.integers(len(SHAPES)))
        shapes = [SHAPES[label]]
    elif task == "counting":
        label = int(rng.integers(4))
        shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=label + 1)]
    else:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    scale = size / 32
    for shape in shapes:
        r = rng.uniform(3.5, 7.0) * scale / (1 if task == "shapes" else 1.4)
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        _draw(draw, shape, cx, cy, r, tuple(int(c) for c in rng.integers(110, 256, 3)), rng)
    return np.asarray(img), label


def make_synthetic_vtab(task: str = "counting", cache_dir: str | Path | None = None, n_train: int = 1000, n_test: int = 500,
                        size: int = 32, seed: int = 0) -> Path:
    """The task folder (VTAB-1k layout: train800 / val200 = the first 800 / last 200 of ``n_train``)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    params = {"task": task, "n_train": n_train, "n_test": n_test, "size": size, "seed": seed, "generator_version": GENERATOR_VERSION}
    target = cache_dir / f"synthetic_vtab_{task}_n{n_train}_t{n_test}_s{size}_seed{seed}_v{GENERATOR_VERSION}" / task
    n_first = int(round(n_train * 0.8))

    def build(tmp: Path) -> None:
        lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
        for i in range(n_train + n_test):
            split = "train800" if i < n_first else "val200" if i < n_train else "test"
            folder = "train800val200" if split != "test" else "test"
            image, label = synthetic_image(np.random.default_rng([seed, i, GENERATOR_VERSION]), task, size)
            rel = f"images/{folder}/{i:06d}.png"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp / rel, compress_level=1)
            lines[split].append(f"{rel} {label}")
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for split, entries in lines.items():
            (tmp / f"{split}.txt").write_text("\n".join(entries) + "\n")

    return build_once(target, params, build)
