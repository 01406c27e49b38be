"""Image / mask folders: listing image files, pairing images with masks by stem, and the seeded split.

Every 2D layout (:mod:`medseg_peft.data.polyp_folders`, :mod:`medseg_peft.data.layouts_2d`) pairs its
files with these, and the 3D folders (:mod:`medseg_peft.data.volume_folders`) split their volumes with
the same :func:`split_by_stem`, so a split depends on the stems and the seed alone, whatever the data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
IMAGE_DIR_NAMES = ("images", "image")
MASK_DIR_NAMES = ("masks", "mask")

_SHOW = 5  # how many offending names an error message lists before "... and N more"


def _listing(names: Sequence[str], total: int | None = None) -> str:
    total = len(names) if total is None else total
    shown = ", ".join(repr(n) for n in list(names)[:_SHOW])
    return shown + (f", ... and {total - _SHOW} more" if total > _SHOW else "")


def image_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """``{stem: path}`` of the image files (``suffixes``, lower case) in ``folder``.

    Hidden files are skipped because macOS archives carry ``._name.jpg`` resource forks next to
    every real image; two files sharing a stem (``a.jpg`` and ``a.png``) are an error, since either
    choice could pair the wrong mask.
    """
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in suffixes:
            continue
        if p.stem in found:
            raise ValueError(f"{folder}: two files share the stem {p.stem!r} ({found[p.stem].name} and {p.name}); keep one")
        found[p.stem] = p
    return found


def _find_subdir(parent: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    return None


def _image_mask_dirs(parent: Path) -> tuple[Path, Path] | None:
    images, masks = _find_subdir(parent, IMAGE_DIR_NAMES), _find_subdir(parent, MASK_DIR_NAMES)
    return (images, masks) if images is not None and masks is not None else None


def pair_by_stem(image_dir: str | Path, mask_dir: str | Path) -> list[dict]:
    """``[{"image", "label", "name"}]`` for every stem present in both folders, sorted by stem.

    An image without a mask (or a mask without an image) is an error, not a skip: a silently
    smaller training set is how a half-extracted archive goes unnoticed.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    images, masks = image_files(image_dir), image_files(mask_dir)
    if not images:
        raise ValueError(f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the images folder")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    problems = []
    if no_mask:
        problems.append(f"{len(no_mask)} image(s) in {image_dir} have no mask with the same stem in {mask_dir}: {_listing(no_mask)}")
    if no_image:
        problems.append(f"{len(no_image)} mask(s) in {mask_dir} have no image with the same stem in {image_dir}: {_listing(no_image)}")
    if problems:
        raise ValueError("images and masks do not pair up by file stem:\n  " + "\n  ".join(problems))
    return [{"image": str(images[s]), "label": str(masks[s]), "name": s} for s in sorted(images)]


def _split_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_by_stem(items: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/val split that depends only on the stems and the seed.

    Ranking stems by a hash of ``seed:stem`` (instead of shuffling with a RNG) keeps the split the same
    across NumPy versions, operating systems and directory listing orders, and adding one image to the
    folder moves at most a single other image between train and val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(items) * val_fraction)
    if val_fraction > 0 and len(items) >= 2:
        n_val = min(max(n_val, 1), len(items) - 1)
    ranked = sorted(items, key=lambda it: _split_key(seed, it["name"]))
    val_names = {it["name"] for it in ranked[:n_val]}
    train = [it for it in items if it["name"] not in val_names]
    val = [it for it in items if it["name"] in val_names]
    return train, val
