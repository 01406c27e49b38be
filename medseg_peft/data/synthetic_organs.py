"""CT-like synthetic abdominal volumes: the default 3D task when no real data set is given.

What makes the task worth tuning for is kept: organs differ from the surrounding soft tissue by only
tens of HU under noise of about the same size (liver ~60, spleen ~100, kidneys ~150 against soft
tissue ~40, noise sigma 18), an unlabelled bright spine sits between the kidneys, a fat layer and the
air outside give strong edges that are not organs, and organs span only part of the slices, so many
slices are empty. A third of the volumes are stored with flipped in-plane axes (an LPS-like affine)
and one is slightly oblique, so orientation handling is exercised, not assumed.

The set is written once in the Medical Segmentation Decathlon layout, so the real MSD loader runs
by default too. NumPy only, plus torch for smooth 3D noise; a dozen volumes take a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg_peft.data.cache import build_once, default_cache_dir

GENERATOR_VERSION = 1
ORGAN_CLASSES = {1: "liver", 2: "spleen", 3: "kidneys"}
HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "bone": 400.0, "liver": 60.0, "spleen": 100.0, "kidneys": 150.0}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]) -> np.ndarray:
    """Unit-std noise varying over about ``cells`` blobs per axis (coarse noise upsampled trilinearly)."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.standard_normal(tuple(c + 2 for c in cells)).astype(np.float32))
    field = F.interpolate(coarse[None, None], size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return (field - field.mean()) / (field.std() + 1e-6)


def _blob(grid, centre, radii, wobble: np.ndarray, amount: float = 0.25) -> np.ndarray:
    """A perturbed ellipsoid: the unit level set of the ellipsoid's quadric, moved by smooth noise."""
    q = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return q < 1.0 + amount * wobble


def organ_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One ``(hu, labels, spacing)`` in RAS array order (x: right to left of the array, y: posterior to anterior, z: up)."""
    n = int(rng.integers(88, 113))
    nz = int(rng.integers(24, 37))
    spacing = (float(rng.uniform(0.7, 0.9)),) * 2 + (float(rng.uniform(2.5, 5.0)),)
    x, y, z = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), np.arange(nz, dtype=np.float32), indexing="ij")
    grid = (x / n, y / n, z / nz)  # unit cube coordinates
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    ax, ay = rng.uniform(0.40, 0.46), rng.uniform(0.30, 0.36)
    body_q = ((grid[0] - cx) / ax) ** 2 + ((grid[1] - cy) / ay) ** 2
    hu = np.full(x.shape, HU["air"], np.float32)
    hu[body_q < 1.0] = HU["fat"]
    inner = body_q < rng.uniform(0.78, 0.88)
    hu[inner] = HU["soft"] + 8.0 * _smooth_field(rng, x.shape, (4, 4, 3))[inner]
    spine = ((grid[0] - cx) ** 2 + (grid[1] - (cy - 0.6 * ay)) ** 2) < (0.06 + rng.uniform(-0.01, 0.01)) ** 2
    hu[spine] = HU["bone"]

    labels = np.zeros(x.shape, np.uint8)
    side = 1.0 if rng.random() < 0.5 else -1.0  # which side the liver is on in the array (flips some anatomy too)
    organs = [
        (1, (cx - side * 0.16, cy + 0.05, rng.uniform(0.55, 0.65)), (0.17, 0.15, rng.uniform(0.25, 0.32))),
        (2, (cx + side * 0.2, cy + 0.02, rng.uniform(0.6, 0.7)), (0.08, 0.09, rng.uniform(0.15, 0.2))),
        (3, (cx - 0.13, cy - 0.45 * ay, rng.uniform(0.35, 0.45)), (0.05, 0.07, rng.uniform(0.12, 0.16))),
        (3, (cx + 0.13, cy - 0.45 * ay, rng.uniform(0.35, 0.45)), (0.05, 0.07, rng.uniform(0.12, 0.16))),
    ]
    for value, centre, radii in organs:
        centre = tuple(c + rng.uniform(-0.03, 0.03) for c in centre)
        radii = tuple(r * rng.uniform(0.85, 1.15) for r in radii)
        mask = _blob(grid, centre, radii, _smooth_field(rng, x.shape, (3, 3, 2))) & inner & (labels == 0) & ~spine
        labels[mask] = value
        hu[mask] = HU[ORGAN_CLASSES[value]] + 6.0 * rng.standard_normal()
    hu += 10.0 * _smooth_field(rng, x.shape, (2, 2, 2))  # scanner bias, smooth
    hu += 18.0 * rng.standard_normal(hu.shape).astype(np.float32)
    hu[body_q >= 1.0] = HU["air"] + 20.0 * rng.standard_normal(int((body_q >= 1.0).sum())).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16), labels, spacing


def _affine(rng: np.random.Generator, shape: tuple[int, ...], spacing, index: int) -> tuple[np.ndarray, bool]:
    """The stored affine, and whether the in-plane axes are stored flipped (LPS-like)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, rng.uniform(-200, 0)]
    if index % 5 == 4:  # slightly oblique: a rotation of a few degrees about z
        t = np.deg2rad(rng.uniform(4, 8))
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
        affine[:3, :3] = rot @ affine[:3, :3]
    flipped = index % 3 == 1
    if flipped:  # store the array flipped in x and y; the affine maps it to the same world positions
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
        affine = affine @ flip
    return affine, flipped


def synthetic_organs_name(n_train: int, n_test: int, seed: int) -> str:
    return f"synthetic_organs_n{n_train}_t{n_test}_seed{seed}_v{GENERATOR_VERSION}"


def make_synthetic_organs(cache_dir: str | Path | None = None, n_train: int = 12, n_test: int = 2, seed: int = 0) -> Path:
    """Write the synthetic CT set once (MSD layout: ``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``); return its folder."""
    import nibabel as nib

    if n_train < 2:
        raise ValueError(f"n_train must be at least 2 (one volume is held out for validation), got {n_train}")
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    params = {"n_train": int(n_train), "n_test": int(n_test), "seed": int(seed), "generator_version": GENERATOR_VERSION}

    def build(tmp: Path) -> None:
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
            folder = "imagesTr" if i < n_train else "imagesTs"
            nib.save(nib.Nifti1Image(hu, affine), tmp / folder / name)
            if i < n_train:
                nib.save(nib.Nifti1Image(labels, affine), tmp / "labelsTr" / name)
                training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            else:
                test.append(f"./imagesTs/{name}")
        dataset = {
            "name": "SyntheticOrgans", "description": "CT-like synthetic abdominal volumes generated by medseg-peft",
            "reference": "medseg_peft.data.synthetic_organs", "licence": "CC0", "release": str(GENERATOR_VERSION),
            "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", **{str(k): v for k, v in ORGAN_CLASSES.items()}},
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
        }
        (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")

    return build_once(cache_dir / synthetic_organs_name(n_train, n_test, seed), params, build)
