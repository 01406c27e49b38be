"""Label volumes out, with their input's exact geometry.

A predicted label volume is only useful in 3D Slicer if it lands exactly on its input, so geometry is
never re-derived on the way out: a NIfTI label copies its input's header (affine, sform and qform
with their codes, zooms, units), an NRRD / MHA label copies its input's origin, spacing, direction
and user header fields. Only the voxel type changes (uint8, or uint16 beyond 255 classes).

This module is copied into exported bundles (``scripts/volume_writers.py``, beside ``volume_io.py``), so it
imports nothing from medseg_peft.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from monai.transforms import MapTransform, SaveImaged

from .volume_files import NIFTI_SUFFIXES, VolumeDataError, load_nifti, read_itk, volume_stem, volume_suffix
from .volume_geometry import read_geometry

# Header fields SimpleITK derives from the image itself (or its own bookkeeping): copying them onto a
# label would describe the reference's pixel type, not the label's.
_ITK_OWN_FIELDS = frozenset({
    "type", "dimension", "sizes", "encoding", "endian", "kinds", "space", "space directions", "space origin",
    "space dimension", "measurement frame", "ElementSpacing", "ElementType", "ElementNumberOfChannels",
    "Offset", "TransformMatrix", "DimSize", "NDims", "BinaryData", "CompressedData",
})


def write_label_volume(labels, reference: str | Path, output_dir: str | Path, postfix: str = "seg") -> Path:
    """Write class values on ``reference``'s voxel grid (its own array order) with its exact geometry.

    ``labels`` is what ``LoadImage`` gives for the reference before any reorientation (e.g. after
    ``Invertd``), optionally with a leading channel of 1. NIfTI in -> NIfTI out (its header copied),
    NRRD in -> ``.nrrd``, MHA / MHD in -> ``.mha`` (origin, spacing, direction and user fields copied).
    A DICOM series -> ``.nii.gz`` with the series' RAS affine: 3D Slicer loads it on top of the series,
    and a DICOM-SEG writer is a different project.
    """
    reference = Path(reference)
    array = _label_array(labels)
    geometry = read_geometry(reference)
    if tuple(array.shape) != geometry.shape:
        raise VolumeDataError(f"labels of shape {tuple(array.shape)} do not fit {reference}, whose volume is {geometry.shape}")
    out = _output_path(reference, Path(output_dir), postfix)
    suffix = volume_suffix(reference)
    if suffix in NIFTI_SUFFIXES:
        return _atomic(out, lambda tmp: _write_nifti_like(array, reference, tmp))
    if not suffix:
        return _atomic(out, lambda tmp: _write_nifti_ras(array, geometry.affine, tmp))
    return _atomic(out, lambda tmp: _write_itk_like(array, reference, tmp))


def _label_array(labels) -> np.ndarray:
    """Non-negative integer class values as uint8 (uint16 beyond 255); a silent wrap-around would relabel voxels."""
    array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise VolumeDataError("labels must be integer class values; got fractional values (round or argmax first)")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise VolumeDataError(f"labels must be class values in 0..65535, got {low}..{high}")
    return array.astype(np.uint8 if high <= 255 else np.uint16)


def _output_path(reference: Path, output_dir: Path, postfix: str) -> Path:
    """``<stem>_<postfix><ext>`` where the format follows the reference (MHD's two files become one MHA)."""
    ext = {".nii": ".nii", ".nii.gz": ".nii.gz", ".mha": ".mha", ".mhd": ".mha", "": ".nii.gz"}.get(volume_suffix(reference), ".nrrd")
    return output_dir / f"{volume_stem(reference)}_{postfix}{ext}"


def _write_nifti_like(array: np.ndarray, reference: Path, filename: str) -> None:
    """The reference's header, verbatim except data type, shape, scaling and display range.

    Passing no affine to nibabel keeps sform, qform, their codes and the zooms exactly as they were.
    """
    import nibabel as nib

    header = load_nifti(reference).header.copy()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0  # class values must not be rescaled
    header["cal_min"], header["cal_max"] = 0.0, 0.0  # the reference's intensity window means nothing here
    header.set_intent("none")
    nib.save(nib.Nifti1Image(array, None, header), filename)


def _write_nifti_ras(array: np.ndarray, affine: np.ndarray, filename: str) -> None:
    """A NIfTI for a reference that has no NIfTI header to copy (a DICOM series); scanner-based, in mm."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, filename)


def _write_itk_like(array: np.ndarray, reference: Path, filename: str) -> None:
    """The reference's origin, spacing, direction and user fields on a compressed label image."""
    import SimpleITK as sitk

    info = read_itk(reference, header_only=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))  # (z, y, x) for ITK
    img.SetOrigin(info.GetOrigin())
    img.SetSpacing(info.GetSpacing())
    img.SetDirection(info.GetDirection())
    for key in info.GetMetaDataKeys():
        if _is_user_field(key):
            img.SetMetaData(key, info.GetMetaData(key))
    sitk.WriteImage(img, filename, True)


def _is_user_field(key: str) -> bool:
    """Whether a SimpleITK header key is the file's own information rather than something ITK recomputes."""
    return key not in _ITK_OWN_FIELDS and not key.startswith(("ITK_", "NRRD_"))


def _atomic(out_path: Path, write: Callable[[str], None]) -> Path:
    """Write through a temporary file in the same folder, so a crash never leaves a half label behind.

    (``medseg_peft.io.atomic_write``'s twin: this module is copied into exported bundles, which run
    without medseg_peft, so it imports nothing from the package.)"""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp_", suffix=volume_suffix(out_path) or out_path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


class SaveLabelVolumed(SaveImaged):
    """Write ``d[key]`` (a label map on the input's own voxel grid, after ``Invertd``) with its input's geometry.

    The input is the file named by the image's ``filename_or_obj``; the written path goes to ``d[f"{key}_file"]``.
    A ``SaveImaged`` by type (not by its writer), because MONAI Label drops the ``SaveImaged`` steps of a
    bundle's post-processing: inside a MONAI Label server the label goes back to the client instead of
    a file into the model folder.
    """

    def __init__(self, keys, output_dir: str | Path, postfix: str = "seg", image_key: str = "image",
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)  # SaveImaged's own writer set-up is not used
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.image_key = image_key

    def __call__(self, data):
        d = dict(data)
        image = d[self.image_key]
        meta = image.meta if hasattr(image, "meta") else d.get(f"{self.image_key}_meta_dict", {})
        reference = meta.get("filename_or_obj")
        if not reference:
            raise ValueError(f"{self.image_key!r} carries no filename_or_obj: load it with LoadImaged(image_only=False) or as a MetaTensor")
        for key in self.key_iterator(d):
            labels = d[key]
            labels = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
            d[f"{key}_file"] = str(write_label_volume(np.rint(labels).astype(np.int64), reference, self.output_dir, self.postfix))
        return d
