"""A volume's geometry (spatial shape, channel count, RAS affine), read from the header alone where the format allows it.

Geometry is what must agree between an image and its label, and what a written label must reproduce; checking
a whole data set before training must not mean decompressing every volume.

ITK stores geometry in LPS, MONAI in RAS: :func:`itk_affine` flips the sign of the first two affine rows, as
MONAI's ITKReader does, so every format gives the same affine for the same voxels.

This module is copied into exported bundles (``scripts/volume_geometry.py``, beside ``volume_io.py``), so it
imports nothing from medseg_peft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .volume_files import ITK_SUFFIXES, NIFTI_SUFFIXES, SUPPORTED, VolumeDataError, load_nifti, read_itk, volume_suffix


def itk_affine(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The RAS affine of ITK (LPS) geometry, as MONAI's ITKReader builds it with ``affine_lps_to_ras=True``."""
    n = len(origin)
    affine = np.eye(n + 1)
    matrix = np.asarray(direction, dtype=np.float64).reshape(n, n)
    affine[:n, :n] = matrix @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:n, n] = origin
    lps_to_ras = np.eye(n + 1)
    lps_to_ras[0, 0] = lps_to_ras[1, 1] = -1.0
    return lps_to_ras @ affine


@dataclass(frozen=True)
class VolumeGeometry:
    """What must agree between an image and its label, and what a written label must reproduce.

    ``shape`` is spatial, (x, y, z) as the loaded arrays; ``affine`` is RAS and read-only.
    """

    path: str
    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray = field(hash=False)

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)
        affine.setflags(write=False)  # frozen means frozen
        object.__setattr__(self, "affine", affine)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VolumeGeometry):
            return NotImplemented
        return ((self.path, self.shape, self.channels) == (other.path, other.shape, other.channels)
                and np.array_equal(self.affine, other.affine))

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_geometry(path: str | Path) -> VolumeGeometry:
    """Shape, channel count and RAS affine, from the header alone where the format allows it.

    Checking a whole data set before training must not mean decompressing every volume.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such volume: {path}")
    suffix = volume_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _nifti_geometry(path)
    if suffix in ITK_SUFFIXES or path.is_dir():
        return _itk_geometry(path)
    raise VolumeDataError(f"{path}: not a supported volume (supported: {SUPPORTED})")


def _nifti_geometry(path: Path) -> VolumeGeometry:
    """NIfTI keeps channels on axes 4 and 5 (MSD BrainTumour: (x, y, z, 4)); anything else is not a volume."""
    img = load_nifti(path)
    shape = tuple(int(s) for s in img.shape)
    if not 3 <= len(shape) <= 5:
        raise VolumeDataError(f"{path} has {len(shape)} axes, shape {shape}; a 3D volume (optionally with "
                              "channels on a 4th axis) was expected")
    return VolumeGeometry(str(path), shape[:3], int(np.prod(shape[3:], dtype=np.int64)), img.affine)


def _itk_geometry(path: Path) -> VolumeGeometry:
    """ITK keeps channels as pixel components, so its dimension is the spatial one and must be 3."""
    info = read_itk(path, header_only=not path.is_dir())
    shape = tuple(int(s) for s in info.GetSize())
    if len(shape) != 3:
        raise VolumeDataError(f"{path} is a {len(shape)}D image, size {shape}; a 3D volume was expected")
    channels = info.GetNumberOfComponents() if hasattr(info, "GetNumberOfComponents") else info.GetNumberOfComponentsPerPixel()
    return VolumeGeometry(str(path), shape, int(channels), itk_affine(info.GetOrigin(), info.GetSpacing(), info.GetDirection()))
