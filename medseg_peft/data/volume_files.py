"""Volume files on disk: which names are volumes, how each format is opened, and which volumes a folder holds.

The other volume modules (geometry, checks, writers, readers) open files only through :func:`read_itk` and
:func:`load_nifti`, so an unreadable file fails the same way everywhere: a :class:`VolumeDataError` naming it.

This module is copied into exported bundles (``scripts/volume_files.py``, beside ``volume_io.py``), so it
imports nothing from medseg_peft.
"""

from __future__ import annotations

import json
from pathlib import Path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
SUPPORTED = f"{', '.join(VOLUME_SUFFIXES)} files and DICOM series folders"


class VolumeDataError(ValueError):
    """A volume or a volume pair that cannot be used as it is; the message names the file(s)."""


# ---------------------------------------------------------------------------------------------- names


def volume_suffix(path: str | Path) -> str:
    """The volume suffix, lower case ('' if none): ``.nii.gz`` and ``.seg.nrrd`` are single suffixes here."""
    name = Path(path).name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def volume_stem(path: str | Path) -> str:
    """The file name without its volume suffix (``case_1.nii.gz`` -> ``case_1``); a DICOM folder's name."""
    name = Path(path).name
    suffix = volume_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def is_dicom_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder of DICOM files, the only way a series is given to these modules.

    ``.dcm`` files settle it cheaply; suffix-less files (common in PACS exports) are left to GDCM.
    """
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    if not files or any(volume_suffix(p) for p in files):
        return False
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM complains about every non-DICOM file
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# ------------------------------------------------------------------------------------------- opening


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


def read_itk(path: Path, header_only: bool = False):
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


def load_nifti(path: Path):
    """A nibabel image (data not read yet), or an error naming the file and nibabel's reason."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as err:  # nibabel raises anything from ImageFileError to gzip / EOF errors
        raise VolumeDataError(f"{path} could not be read as NIfTI: {err}") from err


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
