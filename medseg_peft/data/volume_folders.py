"""3D data set layouts: the Medical Segmentation Decathlon (``dataset.json``) and plain ``images/`` + ``labels/``.

MSD task folders are read through their ``training`` list rather than by listing ``imagesTr/``: the
official archives carry macOS ``._*`` shadow files there that are not NIfTI at all. Class names come
from ``dataset.json`` ``labels`` or from the user (required for the plain layout, which has no place
to name them). The train / validation split is the polyp loader's seeded hash of file stems, so it
is the same on every machine and independent of listing order.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from medseg_peft.data.polyp_folders import split_by_stem
from medseg_peft.data.volume_io import VOLUME_SUFFIXES, VolumeDataError, is_dicom_dir, list_volumes, volume_stem

log = logging.getLogger("medseg_peft")
_SHOW = 5


def class_names(classes: Sequence[str] | Mapping) -> dict[int, str]:
    """``{value: name}`` for label values >= 1, from a list of names (values 1..N) or a value -> name mapping."""
    if isinstance(classes, str):
        raise ValueError(f"classes must be a list of names or a value -> name mapping, got the string {classes!r}")
    items = classes.items() if isinstance(classes, Mapping) else enumerate(classes, start=1)
    names: dict[int, str] = {}
    for value, name in items:
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"class value {value!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"class value {value} for {name!r}: values start at 1 (0 is background)")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class {value} needs a non-empty name, got {name!r}")
        names[value] = name.strip()
    if not names:
        raise ValueError("classes is empty: name at least one class")
    return dict(sorted(names.items()))


def _missing(paths: list[Path], what: str, where: Path) -> None:
    gone = [str(p) for p in paths if not p.exists()]
    if gone:
        more = f" ... and {len(gone) - _SHOW} more" if len(gone) > _SHOW else ""
        raise FileNotFoundError(f"{where} lists {len(gone)} {what} that do not exist: {gone[:_SHOW]}{more}")


def read_msd(root: Path) -> dict:
    """Pairs, test images, class names and modality from ``root/dataset.json``, with errors that name file and key."""
    path = root / "dataset.json"
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise VolumeDataError(f"{path} is not valid JSON: {err}") from err
    for key, kind in (("training", list), ("labels", dict)):
        if key not in spec:
            raise VolumeDataError(f"{path} has no {key!r} key (expected a {kind.__name__}, as in the Medical Segmentation Decathlon)")
        if not isinstance(spec[key], kind):
            raise VolumeDataError(f"{path}: {key!r} must be a {kind.__name__}, got {type(spec[key]).__name__}")
    pairs = []
    for i, entry in enumerate(spec["training"]):
        if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
            raise VolumeDataError(f"{path}: training[{i}] must have 'image' and 'label' keys, got {entry!r}")
        pairs.append({"image": str(root / entry["image"]), "label": str(root / entry["label"]), "name": volume_stem(entry["image"])})
    _missing([Path(p["image"]) for p in pairs] + [Path(p["label"]) for p in pairs], "training files", path)
    test = [root / (t["image"] if isinstance(t, dict) else t) for t in spec.get("test", [])]
    _missing(test, "test images", path)
    labels = {k: v for k, v in spec["labels"].items() if str(k) != "0"}
    return {"pairs": pairs, "test": test, "classes": class_names(labels), "modality": spec.get("modality", {})}


def _by_stem(folder: Path) -> dict[str, Path]:
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return {volume_stem(p): p for p in entries if (p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)) or is_dicom_dir(p)}


def read_plain(root: Path) -> dict:
    images, labels = _by_stem(root / "images"), _by_stem(root / "labels")
    if not images:
        raise VolumeDataError(f"{root / 'images'} holds no volumes ({', '.join(VOLUME_SUFFIXES)} files or DICOM series folders)")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise VolumeDataError(f"{len(unlabelled)} image(s) in {root / 'images'} have no label of the same stem in {root / 'labels'}: "
                              f"{unlabelled[:_SHOW]}")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        log.warning("%d label(s) in %s have no image and are ignored: %s", len(orphans), root / "labels", orphans[:_SHOW])
    pairs = [{"image": str(images[s]), "label": str(labels[s]), "name": s} for s in sorted(images)]
    test_dir = next((root / d for d in ("imagesTs", "test") if (root / d).is_dir()), None)
    return {"pairs": pairs, "test": list_volumes(test_dir) if test_dir and any(test_dir.iterdir()) else [], "modality": {}}


def volume_datalists(root: str | Path, classes: Sequence[str] | Mapping | None = None, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """``{"train", "val": [{"image", "label"}], "test": [{"image"}], "classes": {value: name}, "modality", "layout", "source"}``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset_dir {root} does not exist or is not a folder")
    if (root / "dataset.json").is_file():
        found, layout = read_msd(root), "msd"
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        found, layout = read_plain(root), "folders"
        if classes is None:
            raise VolumeDataError(f"{root} uses the images/ + labels/ layout, which does not name its classes: pass them, "
                                  "e.g. --classes \"['liver', 'spleen']\" for label values 1 and 2")
    else:
        raise VolumeDataError(f"{root} is neither a Medical Segmentation Decathlon task (dataset.json, imagesTr/, labelsTr/) "
                              "nor a plain layout (images/ and labels/, volumes matched by file stem)")
    if len(found["pairs"]) < 2:
        raise VolumeDataError(f"{root} has {len(found['pairs'])} labelled volume(s); at least 2 are needed (one is held out for validation)")
    names = class_names(classes) if classes is not None else found["classes"]
    train, val = split_by_stem(found["pairs"], val_fraction, seed)
    strip = lambda items: [{"image": it["image"], "label": it["label"]} for it in items]  # noqa: E731
    return {"train": strip(train), "val": strip(val), "test": [{"image": str(p)} for p in found["test"]], "classes": names,
            "modality": found["modality"], "layout": layout, "source": str(root)}
