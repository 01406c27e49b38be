"""Volumes in and label volumes out with exact geometry: NIfTI through nibabel, NRRD / MHA / DICOM through SimpleITK.

A predicted label volume is only useful in 3D Slicer if it lands exactly on its input, so geometry is
never re-derived on the way out: a NIfTI label copies its input's header (affine, sform and qform
with their codes, zooms, units), an NRRD / MHA label copies its input's origin, spacing, direction
and user header fields. Only the voxel type changes (uint8, or uint16 beyond 255 classes).

Arrays follow MONAI's conventions, whatever the file type: indexed (i, j, k) = (x, y, z) with the
affine in RAS, so ``EnsureChannelFirst`` / ``Orientation`` / ``Invertd`` treat every format alike.
ITK stores geometry in LPS and ``GetArrayFromImage`` returns (z, y, x), hence the transposes and the
sign flip of the first two affine rows below.

This module is copied into exported bundles (``scripts/volume_io.py``), so it imports nothing from
medseg_peft.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from monai.data import ImageReader
from monai.transforms import MapTransform
from monai.utils import MetaKeys, SpaceKeys

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeDataError(ValueError):
    """A volume or a volume pair that cannot be used as it is; the message names the file(s)."""


def _suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def volume_stem(path: str | Path) -> str:
    """The file name without its volume suffix (``case_1.nii.gz`` -> ``case_1``); a DICOM folder's name."""
    name = Path(path).name
    suffix = _suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def is_dicom_dir(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    if not files or any(_suffix(p) for p in files):
        return False
    import SimpleITK as sitk  # DICOM files without a suffix: ask GDCM, quietly

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _series_files(folder: Path) -> list[str]:
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise VolumeDataError(f"{folder}: no DICOM series found in this folder")
    if len(ids) > 1:
        raise VolumeDataError(f"{folder} holds {len(ids)} DICOM series ({', '.join(ids)}); put each series in its own folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _read_itk(path: Path, header_only: bool = False):
    """A SimpleITK image (or, ``header_only``, an ImageFileReader with its information read)."""
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_series_files(path))
            return reader.Execute()
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        if header_only:
            reader.ReadImageInformation()
            return reader
        return reader.Execute()
    except VolumeDataError:
        raise
    except Exception as err:  # SimpleITK raises RuntimeError with the ITK message
        raise VolumeDataError(f"{path} could not be read by SimpleITK: {str(err).strip().splitlines()[-1]}") from err


def itk_affine(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The RAS affine of ITK (LPS) geometry."""
    n = len(origin)
    affine = np.eye(4)
    affine[:n, :n] = np.asarray(direction, dtype=np.float64).reshape(n, n) @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:n, 3] = origin
    return LPS_TO_RAS @ affine


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` for NRRD, MetaImage and DICOM series folders, through SimpleITK.

    MONAI's own ``ITKReader`` needs the ``itk`` package (hundreds of MB) and ``NrrdReader`` handles NRRD
    only; SimpleITK is one wheel and reads all three. Register it with ``LoadImage(reader=SimpleITKReader())``:
    NIfTI keeps going to MONAI's nibabel reader, because this reader declines it.
    """

    def verify_suffix(self, filename) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(_suffix(n) in ITK_SUFFIXES or is_dicom_dir(n) for n in names)

    def read(self, data, **kwargs):
        names = data if isinstance(data, (list, tuple)) else [data]
        if len(names) != 1:
            raise NotImplementedError(f"SimpleITKReader reads one volume at a time, got {len(names)}: {names}")
        path = Path(names[0])
        if not path.exists():
            raise FileNotFoundError(f"no such volume: {path}")
        return _read_itk(path)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
        spatial = img.GetDimension()
        array = np.moveaxis(array, list(range(spatial)), list(range(spatial))[::-1])  # (x, y, z[, c])
        affine = itk_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
        meta = {key: img.GetMetaData(key) for key in img.GetMetaDataKeys()}
        meta.update({
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.SPATIAL_SHAPE: np.asarray(img.GetSize()),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if img.GetNumberOfComponentsPerPixel() == 1 else -1,
        })
        return array, meta


@dataclass(frozen=True)
class VolumeGeometry:
    path: str
    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_geometry(path: str | Path) -> VolumeGeometry:
    """Shape, channel count and RAS affine, from the header alone where the format allows it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such volume: {path}")
    if _suffix(path) in NIFTI_SUFFIXES:
        import nibabel as nib

        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
        except Exception as err:
            raise VolumeDataError(f"{path} could not be read as NIfTI: {err}") from err
        affine = np.asarray(img.affine, dtype=np.float64)
        channels = int(np.prod(shape[3:])) if len(shape) > 3 else 1
    elif _suffix(path) in ITK_SUFFIXES or path.is_dir():
        info = _read_itk(path, header_only=not path.is_dir())
        shape = tuple(int(s) for s in info.GetSize())
        affine = itk_affine(info.GetOrigin(), info.GetSpacing(), info.GetDirection())
        channels = int(info.GetNumberOfComponents() if hasattr(info, "GetNumberOfComponents") else info.GetNumberOfComponentsPerPixel())
    else:
        raise VolumeDataError(f"{path}: not a supported volume (supported: {', '.join(VOLUME_SUFFIXES)} files and DICOM series folders)")
    if len(shape) < 3:
        raise VolumeDataError(f"{path} is {len(shape)}D, shape {shape}; a 3D volume was expected")
    return VolumeGeometry(str(path), shape[:3], channels, affine)


def _read_labels(path: Path) -> np.ndarray:
    if _suffix(path) in NIFTI_SUFFIXES:
        import nibabel as nib

        try:
            return np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as err:
            raise VolumeDataError(f"{path} could not be read as NIfTI: {err}") from err
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_read_itk(path))


def check_volume_pair(image: str | Path, label: str | Path, classes: Iterable[int] | None = None, channel: int | None = None) -> VolumeGeometry:
    """Refuse a pair that would train on misaligned or mislabelled data; return the image's geometry."""
    img, lab = read_geometry(image), read_geometry(label)
    if img.channels > 1:
        if channel is None:
            raise VolumeDataError(
                f"image {image} has {img.channels} channels (a 4th axis of size {img.channels}); this pipeline segments 3D "
                f"volumes: set the `channel` key to the index to use (0..{img.channels - 1}), e.g. --channel 0")
        if not 0 <= int(channel) < img.channels:
            raise VolumeDataError(f"channel {channel} is out of range for image {image}, which has {img.channels} channels")
    if lab.channels > 1:
        raise VolumeDataError(f"label {label} has {lab.channels} channels; a label map with one value per voxel was expected")
    if img.shape != lab.shape:
        raise VolumeDataError(f"image {image} and label {label} differ in shape: {img.shape} vs {lab.shape}")
    if not np.allclose(img.affine, lab.affine, atol=1e-3, rtol=1e-4):
        raise VolumeDataError(
            f"image {image} and label {label} differ in geometry (affine):\n{np.round(img.affine, 4)}\nvs\n{np.round(lab.affine, 4)}")
    if classes is not None:
        values = np.unique(_read_labels(Path(label)))
        if not np.all(values == np.round(values)):
            raise VolumeDataError(f"label {label} holds non-integer values {values[values != np.round(values)][:5].tolist()}; "
                                  "a label map of class values was expected")
        allowed = sorted(int(c) for c in classes)
        extra = sorted(set(int(v) for v in values) - set(allowed))
        if extra:
            raise VolumeDataError(f"label {label} holds values {extra} that are not declared classes {allowed}")
    return img


def _atomic(out_path: Path, write) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp_", suffix=_suffix(out_path) or out_path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


_ITK_OWN_FIELDS = ("type", "dimension", "sizes", "encoding", "endian", "kinds", "space", "space directions", "space origin",
                   "ITK_InputFilterName", "ITK_original_direction", "ITK_original_spacing", "ElementSpacing", "Offset")


def write_label_volume(labels, reference: str | Path, output_dir: str | Path, postfix: str = "seg") -> Path:
    """Write class values on ``reference``'s voxel grid (its own array order) with its exact geometry.

    NIfTI in -> NIfTI out, NRRD in -> NRRD out, MHA/MHD in -> MHA out; a DICOM series -> NIfTI (RAS affine).
    """
    reference = Path(reference)
    array = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    array = array.astype(np.uint8 if array.max(initial=0) <= 255 else np.uint16)
    geometry = read_geometry(reference)
    if tuple(array.shape) != geometry.shape:
        raise VolumeDataError(f"labels of shape {tuple(array.shape)} do not fit {reference}, whose volume is {geometry.shape}")
    suffix = _suffix(reference)
    out_suffix = {".nii": ".nii", ".nii.gz": ".nii.gz", ".mha": ".mha", ".mhd": ".mha"}.get(suffix, ".nrrd" if suffix else ".nii.gz")
    out = Path(output_dir) / f"{volume_stem(reference)}_{postfix}{out_suffix}"
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        ref = nib.load(str(reference))
        header = ref.header.copy()
        header.set_data_dtype(array.dtype)
        header.set_data_shape(array.shape)
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
        img = nib.Nifti1Image(array, ref.affine, header)
        img.set_sform(ref.get_sform(), int(ref.header["sform_code"]))
        img.set_qform(ref.get_qform(), int(ref.header["qform_code"]))
        return _atomic(out, lambda tmp: nib.save(img, tmp))
    if not suffix:  # DICOM series: Slicer reads the RAS affine of a NIfTI as well
        import nibabel as nib

        return _atomic(out, lambda tmp: nib.save(nib.Nifti1Image(array, geometry.affine), tmp))
    import SimpleITK as sitk

    info = _read_itk(reference, header_only=True)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))  # (z, y, x) for ITK
    img.SetOrigin(info.GetOrigin())
    img.SetSpacing(info.GetSpacing())
    img.SetDirection(info.GetDirection())
    for key in info.GetMetaDataKeys():
        if key not in _ITK_OWN_FIELDS and not key.startswith("NRRD_"):
            img.SetMetaData(key, info.GetMetaData(key))
    return _atomic(out, lambda tmp: sitk.WriteImage(img, tmp, True))





def list_volumes(path: str | Path) -> list[Path]:
    """The volumes to segment: one file; an MSD task folder's test images; or every volume in a folder.

    A folder lists NIfTI / NRRD / MHA files and DICOM series subfolders, sorted by name; macOS ``._``
    shadow files (found in the MSD archives) are skipped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such volume file or folder: {path}")
    if path.is_file() or is_dicom_dir(path):
        return [path]
    if (path / "dataset.json").is_file():
        test = json.loads((path / "dataset.json").read_text()).get("test") or []
        listed = [path / (t["image"] if isinstance(t, dict) else t) for t in test]
        if listed:
            missing = [str(p) for p in listed if not p.exists()]
            if missing:
                raise FileNotFoundError(f"{path / 'dataset.json'} lists {len(missing)} test images that do not exist, e.g. {missing[:3]}")
            return listed
        path = path / "imagesTs" if (path / "imagesTs").is_dir() else path
    found = sorted(
        p for p in path.iterdir()
        if not p.name.startswith(".") and ((p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)) or is_dicom_dir(p))
    )
    if not found:
        raise FileNotFoundError(f"{path} holds no volumes (looked for {', '.join(VOLUME_SUFFIXES)} files and DICOM series folders)")
    return found


class SaveLabelVolumed(MapTransform):
    """Write ``d[key]`` (a label map on the input's own voxel grid, after ``Invertd``) beside nothing but its input's
    geometry: the file named by the image's ``filename_or_obj``, through ``write_label_volume``."""

    def __init__(self, keys, output_dir: str | Path, postfix: str = "seg", image_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
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
