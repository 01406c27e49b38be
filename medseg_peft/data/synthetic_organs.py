"""CT-like synthetic abdominal volumes: the default 3D task when no real data set is given.

What makes the task worth tuning for is kept: organs differ from the surrounding soft tissue by only
tens of HU under noise of about the same size (liver ~60, spleen ~100, kidneys ~150 against soft
tissue ~40, noise sigma 18), an unlabelled bright spine sits between the kidneys, a fat layer and the
air outside give strong edges that are not organs, and organs span only part of the slices, so some
slices are empty. A third of the volumes are stored with flipped in-plane axes (an LPS-like affine,
the array flipped to match, so the anatomy stays where it was in world space) and every fifth is
slightly oblique, so orientation handling is exercised, not assumed.

The set is written once in the Medical Segmentation Decathlon layout, so the real MSD loader is what
reads it by default too. NumPy only (nibabel to write): the default dozen volumes take about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg_peft.data.cache import build_once, default_cache_dir

GENERATOR_VERSION = 1  # bump when the volumes change, so stale caches are not reused
ORGAN_CLASSES = {1: "liver", 2: "spleen", 3: "kidneys"}
HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "bone": 400.0, "liver": 60.0, "spleen": 100.0, "kidneys": 150.0}
NOISE_HU = 18.0  # sigma of the voxel noise: about the liver's contrast, so the liver is the hard class

Grid = tuple[np.ndarray, np.ndarray, np.ndarray]


def _linear_weights(size: int, points: int) -> np.ndarray:
    """``[size, points]`` weights of 1D linear interpolation from ``points`` samples spanning the axis end to end."""
    pos = np.arange(size, dtype=np.float32) * np.float32((points - 1) / max(size - 1, 1))
    left = np.minimum(pos.astype(np.int64), points - 2)
    frac = pos - left
    weights = np.zeros((size, points), np.float32)
    weights[np.arange(size), left] = 1 - frac
    weights[np.arange(size), left + 1] = frac
    return weights


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]) -> np.ndarray:
    """Unit-std noise varying over about ``cells`` blobs per axis.

    Coarse Gaussian noise is upsampled trilinearly, one axis at a time (three small matrix products),
    which is what keeps this NumPy-only and fast; corners are aligned, so the coarse samples sit on
    the volume's first and last voxels.
    """
    coarse = rng.standard_normal(tuple(c + 2 for c in cells)).astype(np.float32)
    field = coarse
    for axis, size in enumerate(shape):
        field = np.moveaxis(np.tensordot(_linear_weights(size, coarse.shape[axis]), field, axes=(1, axis)), 0, axis)
    return (field - field.mean()) / (field.std() + 1e-6)


def _blob(grid: Grid, centre, radii, wobble: np.ndarray, amount: float = 0.25) -> np.ndarray:
    """A perturbed ellipsoid: the unit level set of the ellipsoid's quadric, moved by smooth noise."""
    q = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return q < 1.0 + amount * wobble


def _body(rng: np.random.Generator, grid: Grid, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Paint fat, soft tissue and the spine into ``hu``; return ``(body_q, inner, (cx, cy, ay))``.

    ``body_q`` is the body ellipse's quadric (< 1 inside the skin), ``inner`` the soft-tissue region
    organs may occupy; the spine is left out of ``inner`` implicitly by the organ painter.
    """
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    ax, ay = rng.uniform(0.40, 0.46), rng.uniform(0.30, 0.36)
    body_q = ((grid[0] - cx) / ax) ** 2 + ((grid[1] - cy) / ay) ** 2
    hu[body_q < 1.0] = HU["fat"]
    inner = body_q < rng.uniform(0.78, 0.88)  # a fat layer a few voxels thick under the skin
    hu[inner] = HU["soft"] + 8.0 * _smooth_field(rng, hu.shape, (4, 4, 3))[inner]
    return body_q, inner, (cx, cy, ay)


def _spine(rng: np.random.Generator, grid: Grid, centre: tuple[float, float, float]) -> np.ndarray:
    """The vertebral column: a bright cylinder behind the organs, through every slice, never labelled."""
    cx, cy, ay = centre
    radius = 0.06 + rng.uniform(-0.01, 0.01)
    return ((grid[0] - cx) ** 2 + (grid[1] - (cy - 0.6 * ay)) ** 2) < radius**2


def _organ_layout(rng: np.random.Generator, centre: tuple[float, float, float]) -> list[tuple[int, tuple, tuple]]:
    """``(label, centre, radii)`` of each blob in unit-cube coordinates, before per-volume jitter.

    The liver is large and the spleen small on opposite sides (which side varies per volume, so
    neither side alone gives the class away); the two kidneys lie behind, beside the spine, lower down.
    Their z extents stay inside the volume's middle, so the lowest slices hold no organ.
    """
    cx, cy, ay = centre
    side = 1.0 if rng.random() < 0.5 else -1.0
    return [
        (1, (cx - side * 0.16, cy + 0.05, rng.uniform(0.55, 0.65)), (0.17, 0.15, rng.uniform(0.25, 0.32))),
        (2, (cx + side * 0.2, cy + 0.02, rng.uniform(0.6, 0.7)), (0.08, 0.09, rng.uniform(0.15, 0.2))),
        (3, (cx - 0.13, cy - 0.45 * ay, rng.uniform(0.35, 0.45)), (0.05, 0.07, rng.uniform(0.12, 0.16))),
        (3, (cx + 0.13, cy - 0.45 * ay, rng.uniform(0.35, 0.45)), (0.05, 0.07, rng.uniform(0.12, 0.16))),
    ]


def _paint_organs(rng: np.random.Generator, grid: Grid, hu: np.ndarray, allowed: np.ndarray, layout) -> np.ndarray:
    """Label map of the organs, each painted only where no earlier organ is, so classes never overlap."""
    labels = np.zeros(hu.shape, np.uint8)
    for value, centre, radii in layout:
        centre = tuple(c + rng.uniform(-0.03, 0.03) for c in centre)
        radii = tuple(r * rng.uniform(0.85, 1.15) for r in radii)
        mask = _blob(grid, centre, radii, _smooth_field(rng, hu.shape, (3, 3, 2))) & allowed & (labels == 0)
        labels[mask] = value
        hu[mask] = HU[ORGAN_CLASSES[value]] + 6.0 * rng.standard_normal()  # each organ's mean varies a little
    return labels


def organ_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One ``(hu int16, labels uint8, spacing mm)`` in RAS array order.

    Axis 0 runs from the patient's left to right (+x), axis 1 from back to front (+y), axis 2 from
    feet to head (+z); how the array is stored on disk is decided later, by :func:`_affine`.
    """
    n = int(rng.integers(88, 113))
    nz = int(rng.integers(24, 37))
    spacing = (float(rng.uniform(0.7, 0.9)),) * 2 + (float(rng.uniform(2.5, 5.0)),)
    x, y, z = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), np.arange(nz, dtype=np.float32), indexing="ij")
    grid = (x / n, y / n, z / nz)  # unit cube coordinates
    hu = np.full(x.shape, HU["air"], np.float32)
    body_q, inner, centre = _body(rng, grid, hu)
    spine = _spine(rng, grid, centre)
    hu[spine] = HU["bone"]
    labels = _paint_organs(rng, grid, hu, inner & ~spine, _organ_layout(rng, centre))
    hu += 10.0 * _smooth_field(rng, x.shape, (2, 2, 2))  # scanner bias, smooth
    hu += NOISE_HU * rng.standard_normal(hu.shape).astype(np.float32)
    outside = body_q >= 1.0
    hu[outside] = HU["air"] + 20.0 * rng.standard_normal(int(outside.sum())).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16), labels, spacing


def _affine(rng: np.random.Generator, shape: tuple[int, ...], spacing, index: int) -> tuple[np.ndarray, bool]:
    """The stored affine, and whether the in-plane axes are stored flipped (LPS-like).

    Every third volume (index 1, 4, 7, ...) is flipped in x and y and every fifth (4, 9, ...) rotated
    a few degrees about z, so a loader that ignores the affine sees a mirrored spine.
    """
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, rng.uniform(-200, 0)]
    if index % 5 == 4:
        t = np.deg2rad(rng.uniform(4, 8))
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3]
    flipped = index % 3 == 1
    if flipped:  # array index i becomes n-1-i; composing with this keeps every voxel's world position
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        affine = affine @ flip
    return affine, flipped


def _dataset_json(training: list[dict], test: list[str]) -> dict:
    """The MSD ``dataset.json`` fields, in the order the Decathlon's own files use."""
    return {
        "name": "SyntheticOrgans",
        "description": "CT-like synthetic abdominal volumes generated by medseg-peft",
        "reference": "medseg_peft.data.synthetic_organs",
        "licence": "CC0",
        "release": str(GENERATOR_VERSION),
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in ORGAN_CLASSES.items()}},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }


def synthetic_organs_name(n_train: int, n_test: int, seed: int) -> str:
    """Cache folder name: every parameter and the generator version, so no two sets share a folder."""
    return f"synthetic_organs_n{int(n_train)}_t{int(n_test)}_seed{int(seed)}_v{GENERATOR_VERSION}"


def _write_set(tmp: Path, n_train: int, n_test: int, seed: int) -> None:
    """Generate and write every volume into ``tmp``; volume ``i`` depends only on ``(seed, i)``."""
    import nibabel as nib

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp / sub).mkdir()
    training, test = [], []
    for i in range(n_train + n_test):
        rng = np.random.default_rng([int(seed), i, GENERATOR_VERSION])
        hu, labels, spacing = organ_volume(rng)
        affine, flipped = _affine(rng, hu.shape, spacing, i)
        if flipped:
            hu, labels = hu[::-1, ::-1].copy(), labels[::-1, ::-1].copy()
        name = f"organs_{i:03d}.nii.gz"
        if i < n_train:
            nib.save(nib.Nifti1Image(hu, affine), tmp / "imagesTr" / name)
            nib.save(nib.Nifti1Image(labels, affine), tmp / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nib.save(nib.Nifti1Image(hu, affine), tmp / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    (tmp / "dataset.json").write_text(json.dumps(_dataset_json(training, test), indent=2) + "\n")


def make_synthetic_organs(cache_dir: str | Path | None = None, n_train: int = 12, n_test: int = 2, seed: int = 0) -> Path:
    """Write the synthetic CT set once and return its folder.

    The folder (``<cache_dir>/synthetic_organs_n{n_train}_t{n_test}_seed{seed}_v{version}``) is in the
    MSD layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/`` and ``imagesTs/`` (test images, no
    labels), plus ``done.json``. It is built in a temporary sibling and renamed into place only when
    complete, so an interrupted build is never mistaken for a finished one; a finished one is reused
    without being rewritten.
    """
    if n_train < 2:
        raise ValueError(f"n_train must be at least 2 (one volume is held out for validation), got {n_train}")
    if n_test < 0:
        raise ValueError(f"n_test must be 0 or more, got {n_test}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    params = {"n_train": int(n_train), "n_test": int(n_test), "seed": int(seed), "generator_version": GENERATOR_VERSION}
    target = cache_dir / synthetic_organs_name(n_train, n_test, seed)
    return build_once(target, params, lambda tmp: _write_set(tmp, int(n_train), int(n_test), int(seed)))
