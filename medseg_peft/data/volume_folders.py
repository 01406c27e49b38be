"""3D data set layouts: the Medical Segmentation Decathlon (``dataset.json``) and plain ``images/`` + ``labels/``.

MSD task folders are read through their ``training`` list rather than by listing ``imagesTr/``: the
official archives carry macOS ``._*`` shadow files there that are not NIfTI at all, and following the
list skips them without a special case. Class names come from ``dataset.json`` ``labels`` or from the
user (required for the plain layout, which has no place to name them). The train / validation split
is the 2D loaders' seeded hash of file stems (:func:`medseg_peft.data.folders.split_by_stem`), so it is
the same on every machine and independent of listing order.

Only the layout is checked here (keys, files present, pairing); whether a pair's shapes, affines and
label values agree is :func:`medseg_peft.data.volume_checks.check_volume_pair`'s job.
"""

from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path
from typing import Mapping, Sequence

from medseg_peft.data.folders import split_by_stem
from medseg_peft.data.volume_files import VOLUME_SUFFIXES, VolumeDataError, is_dicom_dir, volume_stem

log = logging.getLogger("medseg_peft")

MSD_FILE = "dataset.json"
PLAIN_DIRS = ("images", "labels")
PLAIN_TEST_DIRS = ("imagesTs", "test")
CLASSES_HINT = "e.g. --classes \"['liver', 'spleen']\" for label values 1 and 2"
_SHOW = 5  # how many offending names a message lists before "... and N more"


def _listing(names: Sequence[str]) -> str:
    """The first few names and how many more: a message stays readable when a whole folder is wrong."""
    shown = [str(n) for n in list(names)[:_SHOW]]
    return f"{shown}" + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


# ---------------------------------------------------------------------------------------------- classes


def _class_value(value) -> int:
    """A label value from an int or a string of one (JSON keys are strings); anything else is an error."""
    if isinstance(value, bool):  # True == 1 in Python: a bool key is a mistake, not class 1
        raise ValueError(f"class value {value!r} is not an integer")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise ValueError(f"class value {value!r} is not an integer")


def class_names(classes: Sequence[str] | Mapping) -> dict[int, str]:
    """``{value: name}`` for label values >= 1, sorted, from a list of names (values 1..N) or a value -> name mapping.

    Keys may be ints or strings of ints (as in ``dataset.json``). Values must be >= 1 (0 is
    background and is not a class here) and names non-empty and distinct, since names become metric
    keys and exported channel names, where a duplicate would silently overwrite.
    """
    if isinstance(classes, (str, bytes)):
        raise ValueError(f"classes must be a list of names or a value -> name mapping, got the string {classes!r}")
    items = classes.items() if isinstance(classes, Mapping) else enumerate(classes, start=1)
    names: dict[int, str] = {}
    for key, name in items:
        value = _class_value(key)
        if value < 1:
            raise ValueError(f"class value {value} for {name!r}: values start at 1 (0 is background)")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class {value} needs a non-empty name, got {name!r}")
        if value in names:
            raise ValueError(f"class value {value} is given twice ({names[value]!r} and {name.strip()!r})")
        names[value] = name.strip()
    if not names:
        raise ValueError("classes is empty: name at least one class")
    repeated = sorted({n for n in names.values() if list(names.values()).count(n) > 1})
    if repeated:
        raise ValueError(f"class names must be distinct; repeated: {repeated}")
    return dict(sorted(names.items()))


# ---------------------------------------------------------------------------------------------- MSD


def _load_spec(path: Path) -> dict:
    """``dataset.json`` as a dict; a JSON error names the file and the line / column it stopped at."""
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VolumeDataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    if not isinstance(spec, dict):
        raise VolumeDataError(f"{path} must hold a JSON object (the MSD dataset description), got {type(spec).__name__}")
    for key, kind in (("training", list), ("labels", dict)):
        if key not in spec:
            raise VolumeDataError(f"{path} has no {key!r} key (expected a {kind.__name__}, as in the Medical Segmentation Decathlon)")
        if not isinstance(spec[key], kind):
            raise VolumeDataError(f"{path}: {key!r} must be a {kind.__name__}, got {type(spec[key]).__name__}")
    return spec


def _training_pairs(spec: dict, root: Path, path: Path) -> list[dict]:
    """``[{"image", "label", "name"}]`` from the ``training`` list; paths are relative to the task folder."""
    pairs = []
    for i, entry in enumerate(spec["training"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            raise VolumeDataError(f"{path}: training[{i}] must have 'image' and 'label' keys holding paths, got {entry!r}")
        pairs.append({"image": str(root / entry["image"]), "label": str(root / entry["label"]), "name": volume_stem(entry["image"])})
    return pairs


def _test_images(spec: dict, root: Path, path: Path) -> list[Path]:
    """The ``test`` list: MSD writes plain path strings; ``{"image": ...}`` entries are accepted too."""
    test = spec.get("test") or []
    if not isinstance(test, list):
        raise VolumeDataError(f"{path}: 'test' must be a list of image paths, got {type(test).__name__}")
    images = []
    for i, entry in enumerate(test):
        rel = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(rel, str):
            raise VolumeDataError(f"{path}: test[{i}] must be an image path (or {{'image': path}}), got {entry!r}")
        images.append(root / rel)
    return images


def _require_files(paths: Sequence[str | Path], what: str, listed_in: Path) -> None:
    """One error for every listed file that is absent: a half-extracted archive shows its whole damage."""
    gone = [str(p) for p in paths if not Path(p).exists()]
    if gone:
        raise FileNotFoundError(f"{listed_in} lists {len(gone)} {what} that do not exist: {_listing(gone)}")


def _msd_classes(spec: dict, path: Path) -> dict[int, str]:
    """``labels`` without background; a key that is not an integer is reported with the file it came from."""
    try:
        return class_names({k: v for k, v in spec["labels"].items() if str(k).strip() != "0"})
    except ValueError as err:
        raise VolumeDataError(f"{path}: 'labels' must map label values (\"1\", \"2\", ...) to names: {err}") from err


def msd_class_names(root: Path) -> dict[int, str]:
    """The class names of an MSD task folder's ``dataset.json`` (for inference, where no pairs are read)."""
    path = root / "dataset.json"
    return _msd_classes(_load_spec(path), path)


def read_msd(root: Path) -> dict:
    """``{"pairs", "test", "classes", "modality"}`` from ``root/dataset.json``; errors name the file and the key.

    ``modality`` is returned as given (``{"0": "CT"}``; BrainTumour has four MR channels), so a caller
    can ask which channel to use instead of guessing.
    """
    path = root / MSD_FILE
    spec = _load_spec(path)
    pairs = _training_pairs(spec, root, path)
    _require_files([p["image"] for p in pairs] + [p["label"] for p in pairs], "training files", path)
    test = _test_images(spec, root, path)
    _require_files(test, "test images", path)
    return {"pairs": pairs, "test": test, "classes": _msd_classes(spec, path), "modality": spec.get("modality", {})}


# ---------------------------------------------------------------------------------------------- plain folders


def _is_volume(path: Path) -> bool:
    return (path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)) or is_dicom_dir(path)


def volumes_by_stem(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the volume files and DICOM series folders in ``folder``, hidden entries skipped.

    Two volumes with one stem (``a.nii.gz`` and ``a.nrrd``) are an error: either choice could pair
    the wrong label.
    """
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not _is_volume(entry):
            continue
        stem = volume_stem(entry)
        if stem in found:
            raise VolumeDataError(f"{folder}: two volumes share the stem {stem!r} ({found[stem].name} and {entry.name}); keep one")
        found[stem] = entry
    return found


def _plain_test_images(root: Path) -> list[Path]:
    """Volumes of ``imagesTs/`` (or ``test/``) if there is such a folder; an empty one gives no test images."""
    folder = next((root / d for d in PLAIN_TEST_DIRS if (root / d).is_dir()), None)
    return list(volumes_by_stem(folder).values()) if folder is not None else []


def read_plain(root: Path) -> dict:
    """``{"pairs", "test", "modality"}`` from ``root/images`` and ``root/labels``, paired by file stem.

    An image without a label is an error (a silently smaller training set hides a broken copy); a
    label without an image is only a warning, since nothing is lost by ignoring it.
    """
    image_dir, label_dir = (root / d for d in PLAIN_DIRS)
    images, labels = volumes_by_stem(image_dir), volumes_by_stem(label_dir)
    if not images:
        raise VolumeDataError(f"{image_dir} holds no volumes ({', '.join(VOLUME_SUFFIXES)} files or DICOM series folders)")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise VolumeDataError(f"{len(unlabelled)} image(s) in {image_dir} have no label of the same stem in {label_dir}: "
                              f"{_listing(unlabelled)}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        log.warning("%d label(s) in %s have no image and are ignored: %s", len(orphans), label_dir, _listing(orphans))
    pairs = [{"image": str(images[s]), "label": str(labels[s]), "name": s} for s in sorted(images)]
    return {"pairs": pairs, "test": _plain_test_images(root), "modality": {}}


# ---------------------------------------------------------------------------------------------- entry point


def _no_layout(root: Path) -> VolumeDataError:
    """Say what was looked for and what is there, so a wrong ``dataset_dir`` is obvious."""
    present = [d for d in PLAIN_DIRS if (root / d).is_dir()]
    if present:
        missing = [d for d in PLAIN_DIRS if d not in present]
        return VolumeDataError(f"{root} has {present[0]}/ but no {missing[0]}/: the plain layout needs both images/ and labels/ "
                               f"(volumes matched by file stem); an MSD task needs {MSD_FILE}")
    found = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    return VolumeDataError(f"{root} is neither a Medical Segmentation Decathlon task ({MSD_FILE} with imagesTr/, labelsTr/) "
                           f"nor a plain layout (images/ and labels/, volumes matched by file stem); found {found or 'nothing'}")


def _split(pairs: list[dict], val_fraction: float, seed: int, root: Path) -> tuple[list[dict], list[dict]]:
    """Seeded split by stem with at least one validation volume: a run that cannot validate is refused."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if len(pairs) < 2:
        raise VolumeDataError(f"{root} has {len(pairs)} labelled volume(s); at least 2 are needed (one is held out for validation)")
    train, val = split_by_stem(pairs, val_fraction, seed)
    return [_pair(it) for it in train], [_pair(it) for it in val]


def _pair(item: dict) -> dict:
    return {"image": item["image"], "label": item["label"]}


def volume_datalists(root: str | Path, classes: Sequence[str] | Mapping | None = None, val_fraction: float = 0.2,
                     seed: int = 0) -> dict:
    """Datalists of an MSD task folder or a plain ``images/`` + ``labels/`` folder.

    Returns ``{"train": [{"image", "label"}], "val": [{"image", "label"}], "test": [{"image"}],
    "classes": {value: name} (background excluded), "modality": {...} (MSD's, {} for plain folders),
    "layout": "msd" | "folders", "source": str(root)}``, paths as strings. ``classes`` (a list of
    names for values 1..N, or a value -> name mapping) overrides ``dataset.json``'s ``labels`` and is
    required for the plain layout. ``val_fraction`` of the stems, at least one, is validation.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {root} does not exist or is not a folder")
    names = class_names(classes) if classes is not None else None
    if (root / MSD_FILE).is_file():
        found, layout = read_msd(root), "msd"
        names = names or found["classes"]
    elif all((root / d).is_dir() for d in PLAIN_DIRS):
        if names is None:
            raise VolumeDataError(f"{root} uses the images/ + labels/ layout, which does not name its classes: pass them, {CLASSES_HINT}")
        found, layout = read_plain(root), "folders"
    else:
        raise _no_layout(root)
    train, val = _split(found["pairs"], val_fraction, seed, root)
    return {"train": train, "val": val, "test": [{"image": str(p)} for p in found["test"]], "classes": names,
            "modality": found["modality"], "layout": layout, "source": str(root)}
