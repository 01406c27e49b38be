"""Volumes in and label volumes out with exact geometry: NIfTI through nibabel, NRRD / MHA / DICOM through SimpleITK.

A predicted label volume is only useful in 3D Slicer if it lands exactly on its input, so geometry is
never re-derived on the way out: a NIfTI label copies its input's header (affine, sform and qform
with their codes, zooms, units), an NRRD / MHA label copies its input's origin, spacing, direction
and user header fields. Only the voxel type changes (uint8, or uint16 beyond 255 classes).

Arrays follow MONAI's conventions, whatever the file type: indexed (i, j, k) = (x, y, z) with the
affine in RAS, so ``EnsureChannelFirst`` / ``Orientation`` / ``Invertd`` treat every format alike.
ITK stores geometry in LPS and ``GetArrayFromImage`` returns (z, y, x), hence the transposes and the
sign flip of the first two affine rows below.

Mistakes in the data (a label on another grid, a 4D image, a stray label value) are caught here,
before any training, by ``check_volume_pair``: they would otherwise train silently on garbage.

This module is copied into exported bundles (``scripts/volume_io.py``), so it imports nothing from
medseg_peft.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader
from monai.transforms import MapTransform, SaveImaged
from monai.utils import MetaKeys, SpaceKeys

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
SUPPORTED = f"{', '.join(VOLUME_SUFFIXES)} files and DICOM series folders"

# Header fields SimpleITK derives from the image itself (or its own bookkeeping): copying them onto a
# label would describe the reference's pixel type, not the label's.
_ITK_OWN_FIELDS = frozenset({
    "type", "dimension", "sizes", "encoding", "endian", "kinds", "space", "space directions", "space origin",
    "space dimension", "measurement frame", "ElementSpacing", "ElementType", "ElementNumberOfChannels",
    "Offset", "TransformMatrix", "DimSize", "NDims", "BinaryData", "CompressedData",
})


class VolumeDataError(ValueError):
    """A volume or a volume pair that cannot be used as it is; the message names the file(s)."""


# ---------------------------------------------------------------------------------------------- names


def _suffix(path: str | Path) -> str:
    """The volume suffix, lower case ('' if none): ``.nii.gz`` and ``.seg.nrrd`` are single suffixes here."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def volume_stem(path: str | Path) -> str:
    """The file name without its volume suffix (``case_1.nii.gz`` -> ``case_1``); a DICOM folder's name."""
    name = Path(path).name
    suffix = _suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def is_dicom_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder of DICOM files, the only way a series is given to this module.

    ``.dcm`` files settle it cheaply; suffix-less files (common in PACS exports) are left to GDCM.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    if not files or any(_suffix(p) for p in files):
        return False
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM complains about every non-DICOM file
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# ----------------------------------------------------------------------------------------- SimpleITK


def _series_files(folder: Path) -> list[str]:
    """The slice files of the folder's only series: two series in one folder would be read as one volume."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise VolumeDataError(f"{folder}: no DICOM series found in this folder")
    if len(ids) > 1:
        raise VolumeDataError(
            f"{folder} holds {len(ids)} DICOM series ({', '.join(ids)}); put each series in its own folder")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _itk_message(err: Exception) -> str:
    """The useful line of an ITK exception (the others are source locations)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else repr(err)).removeprefix("sitk::ERROR:").strip()


def _read_itk(path: Path, header_only: bool = False):
    """A SimpleITK image, or with ``header_only`` an ImageFileReader that has read the header alone.

    A DICOM series has no single header to read, so a folder is always read whole.
    """
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
    except RuntimeError as err:  # SimpleITK raises RuntimeError with the ITK message
        raise VolumeDataError(f"{path} could not be read by SimpleITK: {_itk_message(err)}") from err


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
        return bool(names) and all(_suffix(n) in ITK_SUFFIXES or is_dicom_dir(n) for n in names)

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
        return _read_itk(path)

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


# ------------------------------------------------------------------------------------------ geometry


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
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _nifti_geometry(path)
    if suffix in ITK_SUFFIXES or path.is_dir():
        return _itk_geometry(path)
    raise VolumeDataError(f"{path}: not a supported volume (supported: {SUPPORTED})")


def _load_nifti(path: Path):
    """A nibabel image (data not read yet), or an error naming the file and nibabel's reason."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises anything from ImageFileError to gzip / EOF errors
        raise VolumeDataError(f"{path} could not be read as NIfTI: {err}") from err


def _nifti_geometry(path: Path) -> VolumeGeometry:
    """NIfTI keeps channels on axes 4 and 5 (MSD BrainTumour: (x, y, z, 4)); anything else is not a volume."""
    img = _load_nifti(path)
    shape = tuple(int(s) for s in img.shape)
    if not 3 <= len(shape) <= 5:
        raise VolumeDataError(f"{path} has {len(shape)} axes, shape {shape}; a 3D volume (optionally with "
                              "channels on a 4th axis) was expected")
    return VolumeGeometry(str(path), shape[:3], int(np.prod(shape[3:], dtype=np.int64)), img.affine)


def _itk_geometry(path: Path) -> VolumeGeometry:
    """ITK keeps channels as pixel components, so its dimension is the spatial one and must be 3."""
    info = _read_itk(path, header_only=not path.is_dir())
    shape = tuple(int(s) for s in info.GetSize())
    if len(shape) != 3:
        raise VolumeDataError(f"{path} is a {len(shape)}D image, size {shape}; a 3D volume was expected")
    channels = info.GetNumberOfComponents() if hasattr(info, "GetNumberOfComponents") else info.GetNumberOfComponentsPerPixel()
    return VolumeGeometry(str(path), shape, int(channels), itk_affine(info.GetOrigin(), info.GetSpacing(), info.GetDirection()))


# --------------------------------------------------------------------------------------- pair checks


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
    if _suffix(path) in NIFTI_SUFFIXES:
        try:
            return np.asanyarray(_load_nifti(path).dataobj)
        except VolumeDataError:
            raise
        except Exception as err:  # a valid header over truncated data fails only here
            raise VolumeDataError(f"{path} could not be read as NIfTI: {err}") from err
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_read_itk(path))


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


# ----------------------------------------------------------------------------------- label writing


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
    suffix = _suffix(reference)
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
    ext = {".nii": ".nii", ".nii.gz": ".nii.gz", ".mha": ".mha", ".mhd": ".mha", "": ".nii.gz"}.get(_suffix(reference), ".nrrd")
    return output_dir / f"{volume_stem(reference)}_{postfix}{ext}"


def _write_nifti_like(array: np.ndarray, reference: Path, filename: str) -> None:
    """The reference's header, verbatim except data type, shape, scaling and display range.

    Passing no affine to nibabel keeps sform, qform, their codes and the zooms exactly as they were.
    """
    import nibabel as nib

    header = _load_nifti(reference).header.copy()
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

    info = _read_itk(reference, header_only=True)
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
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=".tmp_", suffix=_suffix(out_path) or out_path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


# ---------------------------------------------------------------------------------- inference inputs


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
        raise FileNotFoundError(f"{path} holds no volumes (looked for {SUPPORTED})")
    return found


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
