"""Volumes in with exact geometry: NIfTI through nibabel, NRRD / MHA / DICOM through SimpleITK; and the one
module bundles name for volume IO.

Arrays follow MONAI's conventions, whatever the file type: indexed (i, j, k) = (x, y, z) with the
affine in RAS, so ``EnsureChannelFirst`` / ``Orientation`` / ``Invertd`` treat every format alike.
ITK stores geometry in LPS and ``GetArrayFromImage`` returns (z, y, x), hence the transposes here and
the sign flip of the first two affine rows in ``volume_geometry.itk_affine``.

The volume modules, one job each: ``volume_files`` (names, formats, opening a file, listing a folder),
``volume_geometry`` (shape, channels, affine from the header), ``volume_checks`` (a bad image / label
pair refused before any training), ``volume_writers`` (label volumes out with their input's geometry),
and this one, the MONAI readers. Bundle configs name their targets here (``scripts.volume_io.<name>`` in an
exported bundle, ``medseg_peft.data.volume_io.<name>`` in the package's), so the names they use from the
other modules are importable from here too.

This module is copied into exported bundles (``scripts/volume_io.py``, with the modules above), so it
imports nothing from medseg_peft.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader
from monai.utils import MetaKeys, SpaceKeys

from .volume_checks import check_volume_pair, check_volumes
from .volume_files import ITK_SUFFIXES, VolumeDataError, is_dicom_dir, list_volumes, read_itk, volume_suffix
from .volume_geometry import VolumeGeometry, itk_affine, read_geometry
from .volume_writers import SaveLabelVolumed, write_label_volume

__all__ = [  # the readers, and the names bundle configs and callers use from here
    "NiftiReader",
    "SaveLabelVolumed",
    "SimpleITKReader",
    "VolumeDataError",
    "VolumeGeometry",
    "check_volume_pair",
    "check_volumes",
    "itk_affine",
    "list_volumes",
    "read_geometry",
    "write_label_volume",
]


def _xyz_array(img) -> np.ndarray:
    """The voxels indexed (x, y, z[, c]): SimpleITK gives (z, y, x[, c]); components stay last."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(img)
    spatial = list(range(img.GetDimension()))
    return np.moveaxis(array, spatial, spatial[::-1])


def _itk_meta(img) -> dict[str, Any]:
    """Header fields plus the geometry MONAI's transforms read, keyed as MONAI's ITKReader keys them."""
    meta: dict[str, Any] = {key: img.GetMetaData(key) for key in img.GetMetaDataKeys() if not key.startswith("ITK_")}
    affine = itk_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    meta["spacing"] = np.asarray(img.GetSpacing())
    meta[MetaKeys.ORIGINAL_AFFINE] = affine
    meta[MetaKeys.AFFINE] = affine.copy()
    meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(img.GetSize())
    meta[MetaKeys.SPACE] = SpaceKeys.RAS
    # MONAI's ITKReader and NibabelReader: NaN for "no channel", -1 for trailing components.
    meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if img.GetNumberOfComponentsPerPixel() == 1 else -1
    return meta


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` for NRRD, MetaImage and DICOM series folders, through SimpleITK.

    MONAI's own ``ITKReader`` needs the ``itk`` package (hundreds of MB) and ``NrrdReader`` handles NRRD
    only; SimpleITK is one wheel and reads all three. Use it as ``LoadImage(reader=SimpleITKReader())``.

    NIfTI is refused even by ``read``: a ``LoadImage`` given a reader tries it first *without* checking
    suffixes and falls back to its default readers only when it raises, so refusing is what sends NIfTI
    to MONAI's nibabel reader, whose affine is the one ``write_label_volume`` copies back.
    """

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        names = _as_list(filename)
        return bool(names) and all(volume_suffix(n) in ITK_SUFFIXES or is_dicom_dir(n) for n in names)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs):
        """One SimpleITK image; ``kwargs`` are accepted for the interface and ignored."""
        names = _as_list(data)
        if len(names) != 1:
            raise NotImplementedError(f"SimpleITKReader reads one volume at a time, got {len(names)}: {names}")
        path = Path(names[0])
        if not path.exists():
            raise FileNotFoundError(f"no such volume: {path}")
        if not self.verify_suffix(path):
            raise VolumeDataError(f"{path}: SimpleITKReader reads {', '.join(ITK_SUFFIXES)} files and DICOM series "
                                  "folders; NIfTI is read by MONAI's NibabelReader")
        return read_itk(path)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        images = _as_list(img)
        if len(images) != 1:
            raise NotImplementedError(f"SimpleITKReader.get_data takes one image, got {len(images)}")
        return _xyz_array(images[0]), _itk_meta(images[0])


class NiftiReader(NibabelReader):
    """MONAI's nibabel reader, naming the file when its voxels cannot be read.

    nibabel reads a NIfTI header eagerly and its voxels lazily, so a truncated ``.nii.gz`` fails only when
    the data is read, with a decompression error that names no file; this reader names it.
    """

    def get_data(self, img):
        try:
            return super().get_data(img)
        except Exception as err:
            names = [str(i.get_filename()) for i in (img if isinstance(img, (list, tuple)) else [img])]
            raise VolumeDataError(f"{', '.join(names)}: the voxel data cannot be read ({type(err).__name__}: {err}); "
                                  "a truncated or damaged file: replace it") from err


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
