"""Mistakes in the data caught before any training or inference: a label on another grid, a 4D image, a stray
label value. Each would otherwise train (or segment) silently on garbage, or fail deep in a transform with a
message that names no file.

This module is copied into exported bundles (``scripts/volume_checks.py``, beside ``volume_io.py``), so it
imports nothing from medseg_peft.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .volume_files import NIFTI_SUFFIXES, VolumeDataError, load_nifti, read_itk, volume_suffix
from .volume_geometry import VolumeGeometry, read_geometry


def check_volume_pair(image: str | Path, label: str | Path, classes: Iterable[int] | None = None,
                      channel: int | None = None) -> VolumeGeometry:
    """Refuse a pair that would train on misaligned or mislabelled data; return the image's geometry.

    ``classes`` are the allowed label values (background 0 included); ``None`` skips reading the
    label's voxels. ``channel`` picks one channel of a multi-channel image.
    """
    img, lab = read_geometry(image), read_geometry(label)
    check_channels(img, channel)
    if lab.channels > 1:
        raise VolumeDataError(f"label {label} has {lab.channels} channels; a label map with one value per voxel was expected")
    _check_alignment(img, lab)
    if classes is not None:
        _check_label_values(Path(label), classes)
    return img


def check_channels(img: VolumeGeometry, channel: int | None) -> None:
    """The pipeline segments 3D volumes: a multi-channel image needs one channel named explicitly."""
    if img.channels == 1:
        return
    if channel is None:
        raise VolumeDataError(
            f"image {img.path} has {img.channels} channels (a 4th axis of size {img.channels}); this pipeline segments "
            f"3D volumes: set the `channel` config key to the index to use (0..{img.channels - 1}), e.g. --channel 0")
    if not 0 <= int(channel) < img.channels:
        raise VolumeDataError(f"channel {channel} is out of range for image {img.path}, which has {img.channels} "
                              f"channels (0..{img.channels - 1})")


def check_volumes(paths: Iterable[str | Path], channel: int | None = None) -> list:
    """``paths``, once every volume is known, from its header alone, to be a 3D volume the pipeline can segment
    (one channel, or ``channel`` of several); else an error naming the file and its shape.

    Inference checks its inputs with this before any model work: a 2D image would otherwise fail deep in
    the slice inferer with a window-size error that names no file."""
    paths = list(paths)
    for path in paths:
        check_channels(read_geometry(path), channel)
    return paths


def _check_alignment(img: VolumeGeometry, lab: VolumeGeometry) -> None:
    """Same voxel grid in the same place: otherwise every label voxel describes some other tissue."""
    if img.shape != lab.shape:
        raise VolumeDataError(f"image {img.path} and label {lab.path} differ in shape: {img.shape} vs {lab.shape}")
    if not np.allclose(img.affine, lab.affine, atol=1e-3, rtol=1e-4):
        raise VolumeDataError(f"image {img.path} and label {lab.path} differ in geometry (affine):\n"
                              f"{np.round(img.affine, 4)}\nvs\n{np.round(lab.affine, 4)}")


def _read_labels(path: Path) -> np.ndarray:
    """The label voxels, in whatever order: only their values are looked at."""
    if volume_suffix(path) in NIFTI_SUFFIXES:
        try:
            return np.asanyarray(load_nifti(path).dataobj)
        except VolumeDataError:
            raise
        except Exception as err:  # a valid header over truncated data fails only here
            raise VolumeDataError(f"{path} could not be read as NIfTI: {err}") from err
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(read_itk(path))


def label_classes(label: str | Path) -> set[int]:
    """The class values present in a label volume (0, background, included when present)."""
    return {int(v) for v in np.unique(_read_labels(Path(label))) if v == v}


def _check_label_values(label: Path, classes: Iterable[int]) -> None:
    """A value outside the declared classes is a mislabelled file or a wrong class list: both need a human."""
    values = np.unique(_read_labels(label))
    fractional = values[values != np.round(values)]  # NaN is caught too
    if fractional.size:
        raise VolumeDataError(f"label {label} holds non-integer values {fractional[:5].tolist()}; "
                              "a label map of class values was expected")
    allowed = sorted(int(c) for c in classes)
    extra = sorted(set(int(v) for v in values) - set(allowed))
    if extra:
        raise VolumeDataError(f"label {label} holds values {extra} that are not declared classes {allowed}")
