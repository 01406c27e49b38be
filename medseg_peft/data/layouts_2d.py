"""Which public 2D layout a dataset folder is in, and which mask file belongs to which image.

:func:`polyp_datalists` asks :func:`which_layout` once the PraNet layout (which brings its own split)
is ruled out. The first layout whose tell-tale folders or file names are present decides, in this order:

* **DRIVE**: ``images/21_training.tif`` + ``1st_manual/21_manual1.gif``, in the folder itself or in
  ``training/`` and ``test/``; paired by the leading number. It is checked before ``images/`` + ``masks/``
  because DRIVE's folders also hold ``mask/``, a field-of-view mask per image that pairs up perfectly
  and would train the model on the wrong target. Every labelled folder joins one pool that
  ``val_fraction`` splits, as for Kvasir-SEG: model selection needs a validation set DRIVE does not
  have, so scores are not those of papers reporting on DRIVE's test half. A folder without
  ``1st_manual/`` (the challenge's unlabelled test images) is left out.
* **Kvasir-SEG and generic**: ``images/`` + ``masks/``; a mask is named as its image, or every mask adds
  one shared suffix to its image's stem (``case1.png`` + ``case1_mask.png``), found by itself.
* **CVC-ClinicDB**: ``Original/`` + ``Ground Truth/`` (any case, space, ``_`` or ``-``), by stem.
* **PH2**: a folder per case, ``IMD002/IMD002_Dermoscopic_Image/IMD002.bmp`` +
  ``IMD002/IMD002_lesion/IMD002_lesion.bmp``, up to three folders deep (``PH2Dataset/PH2 Dataset images/``).
* **ISIC**: ``ISIC_0000000.jpg`` + ``ISIC_0000000_segmentation.png``, in the folder or in its
  sub-folders (the challenge ships them in two); recognised by the ``_segmentation`` suffix alone.
* **BUSI**: class folders of ``benign (1).png`` + ``benign (1)_mask.png``. An image's further masks
  (``_mask_1``, ``_mask_2``: one per lesion) are merged with it into one mask, since the transforms read
  one mask per image; the union is written once into the cache folder (:func:`merged_mask`).

An image without a mask, or a mask without an image, is an error listing them, never a skip: a silently
smaller set is how a half-extracted archive goes unnoticed. Detection reads names only, never pixels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator

import numpy as np
from PIL import Image

from medseg_peft.data.cache import default_cache_dir
from medseg_peft.data.folders import IMAGE_SUFFIXES, _image_mask_dirs, _listing, image_files, pair_by_stem

log = logging.getLogger("medseg_peft")

SUFFIXES_WITH_GIF = IMAGE_SUFFIXES + (".gif",)  # DRIVE's manual annotations are GIFs
MERGED_MASK_DIR = "merged_masks"
PH2_IMAGE_DIR, PH2_MASK_DIR = "_Dermoscopic_Image", "_lesion"
ISIC_MASK, ISIC_SKIP = "_segmentation", ("_superpixels",)
_BUSI_MASK = re.compile(r"(.+)_mask(?:_(\d+))?")
_CVC_IMAGES, _CVC_MASKS = re.compile(r"original", re.I), re.compile(r"ground[ _-]?truth", re.I)
_LEADING_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Layout:
    name: str
    folders: str  # what the folder holds, for messages
    matches: Callable[[Path], bool]  # names only: cheap, and never raises for a folder of another layout
    pairs: Callable[[Path], list[dict]]


# --- shared helpers ---------------------------------------------------------------------------------


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stems(folder: Path) -> Iterator[str]:
    """Stems of the image files in ``folder``, without ``image_files``' duplicate check (detection must not raise)."""
    with os.scandir(folder) as entries:
        for e in entries:
            name, ext = os.path.splitext(e.name)
            if not e.name.startswith(".") and ext.lower() in SUFFIXES_WITH_GIF and e.is_file():
                yield name


def _shown(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def pair_keys(
    where: Path, layout: str, images: dict[Hashable, Path], masks: dict[Hashable, Path], root: Path | None = None
) -> list[tuple[Path, Path]]:
    """``[(image, mask)]`` for the keys in both, sorted by image; a one-line error listing every unpaired file.

    Files are listed relative to ``root`` (default ``where``), so a class or split folder shows in the name.
    """
    root = where if root is None else root
    no_mask = sorted(_shown(images[k], root) for k in images.keys() - masks.keys())
    no_image = sorted(_shown(masks[k], root) for k in masks.keys() - images.keys())
    if no_mask or no_image:
        parts = ([f"{len(no_mask)} image(s) without a mask: {_listing(no_mask)}"] if no_mask else []) + (
            [f"{len(no_image)} mask(s) without an image: {_listing(no_image)}"] if no_image else [])
        raise ValueError(f"{where} ({layout} layout): images and masks do not pair up: " + "; ".join(parts))
    if not images:
        raise ValueError(f"{where} ({layout} layout): no image files ({', '.join(SUFFIXES_WITH_GIF)})")
    return sorted(((images[k], masks[k]) for k in images), key=lambda pair: str(pair[0]))


def _datalist(pairs: list[tuple[Path, Path]], root: Path) -> list[dict]:
    """Datalist items named by image stem, or by path below ``root`` where two folders share a stem.

    Names must be unique: the train/val split and per-image scores are keyed by them.
    """
    stems = Counter(image.stem for image, _ in pairs)
    unique = all(n == 1 for n in stems.values())
    items = [{"image": str(image), "label": str(mask),
              "name": image.stem if unique else _shown(image.with_suffix(""), root)} for image, mask in pairs]
    return sorted(items, key=lambda it: it["name"])


# --- images/ + masks/ (Kvasir-SEG, or masks with a suffix) -----------------------------------------


def mask_suffix(image_stems, mask_stems) -> str | None:
    """The one suffix every mask stem adds to an image stem (``"_mask"`` for ``case1_mask``), else None.

    None when any mask is named exactly as an image (Kvasir-SEG naming), or no suffix is shared by all
    masks. The suffix explaining the most masks wins; a mask whose stem minus the suffix is no image's
    is then reported as unpaired, by name, rather than making the whole folder unrecognisable.
    """
    images, masks = set(image_stems), set(mask_stems)
    if not images or not masks or images & masks:
        return None
    counts: Counter[str] = Counter()
    for m in masks:  # each prefix of m that is an image stem proposes the rest of m: no image x mask loop
        counts.update({m[i:] for i in range(1, len(m)) if m[:i] in images})
    if not counts:
        return None
    suffix = min(counts, key=lambda s: (-counts[s], len(s), s))
    return suffix if all(m.endswith(suffix) and len(m) > len(suffix) for m in masks) else None


def images_masks_pairs(root: Path) -> list[dict]:
    image_dir, mask_dir = _image_mask_dirs(root)
    images, masks = image_files(image_dir), image_files(mask_dir)
    suffix = mask_suffix(images, masks)
    if not suffix:
        return pair_by_stem(image_dir, mask_dir)
    log.info("%s: masks are named <image stem>%s", root, suffix)
    by_image = {stem[: -len(suffix)]: p for stem, p in masks.items()}
    return _datalist(pair_keys(root, f"images/ + masks/<stem>{suffix}", images, by_image), root)


# --- DRIVE --------------------------------------------------------------------------------------------


def _drive_folders(root: Path) -> list[Path]:
    return [d for d in [root, *_subdirs(root)] if (d / "1st_manual").is_dir()]


def _by_number(folder: Path) -> dict[Hashable, Path]:
    """``{leading number: path}``; a file without one keeps its stem as key, so it shows as unpaired."""
    found: dict[Hashable, Path] = {}
    for stem, p in image_files(folder, SUFFIXES_WITH_GIF).items():
        m = _LEADING_NUMBER.match(stem)
        key = int(m.group()) if m else stem
        if key in found:
            raise ValueError(f"{folder}: {found[key].name} and {p.name} share the number {key}; keep one")
        found[key] = p
    return found


def drive_pairs(root: Path) -> list[dict]:
    pairs = []
    for folder in _drive_folders(root):
        if not (folder / "images").is_dir():
            raise ValueError(f"{folder}: the DRIVE layout has '1st_manual/' here but no 'images/' beside it")
        pairs += pair_keys(folder, "DRIVE", _by_number(folder / "images"), _by_number(folder / "1st_manual"), root)
    unlabelled = [d.name for d in _subdirs(root) if (d / "images").is_dir() and not (d / "1st_manual").is_dir()]
    if unlabelled:
        log.info("%s: DRIVE folder(s) %s have no 1st_manual/ annotations and are left out", root, unlabelled)
    return _datalist(pairs, root)


# --- CVC-ClinicDB ------------------------------------------------------------------------------------


def _cvc_dirs(root: Path) -> tuple[Path, Path] | None:
    subdirs = _subdirs(root)
    images = next((d for d in subdirs if _CVC_IMAGES.fullmatch(d.name)), None)
    masks = next((d for d in subdirs if _CVC_MASKS.fullmatch(d.name)), None)
    return (images, masks) if images and masks else None


def cvc_clinicdb_pairs(root: Path) -> list[dict]:
    image_dir, mask_dir = _cvc_dirs(root)
    return _datalist(pair_keys(root, "CVC-ClinicDB", image_files(image_dir), image_files(mask_dir)), root)


# --- PH2 ---------------------------------------------------------------------------------------------


def _ph2_cases(root: Path, depth: int = 3, first_only: bool = False) -> list[Path]:
    """Folders (``root`` itself, or up to ``depth`` below it) holding a ``*_Dermoscopic_Image/`` or ``*_lesion/`` folder."""
    cases, level = [], [root]
    for _ in range(depth + 1):
        deeper = []
        for folder in level:
            subdirs = _subdirs(folder)
            if any(d.name.endswith(PH2_IMAGE_DIR) for d in subdirs):
                cases.append(folder)
                if first_only:
                    return cases
            elif any(d.name.endswith(PH2_MASK_DIR) for d in subdirs):
                cases.append(folder)  # a case whose image is missing: found, so it is reported
            else:
                deeper += subdirs
        level = deeper
    return cases if any(any(d.name.endswith(PH2_IMAGE_DIR) for d in _subdirs(c)) for c in cases) else []


def _one_file(case: Path, ending: str) -> Path | None:
    files = [p for d in _subdirs(case) if d.name.endswith(ending) for p in image_files(d).values()]
    if len(files) > 1:
        raise ValueError(f"{case}: expected one file in its *{ending}/ folder, found {_listing(sorted(p.name for p in files))}")
    return files[0] if files else None


def ph2_pairs(root: Path) -> list[dict]:
    images, masks = {}, {}
    for case in _ph2_cases(root):
        for found, ending in ((images, PH2_IMAGE_DIR), (masks, PH2_MASK_DIR)):
            if (path := _one_file(case, ending)) is not None:
                found[case] = path
    return _datalist(pair_keys(root, "PH2", images, masks), root)


# --- ISIC --------------------------------------------------------------------------------------------


def _is_isic(root: Path) -> bool:
    return any(stem.endswith(ISIC_MASK) for folder in [root, *_subdirs(root)] for stem in _stems(folder))


def isic_pairs(root: Path) -> list[dict]:
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for folder in [root, *_subdirs(root)]:
        for stem, p in image_files(folder).items():
            if stem.endswith(ISIC_SKIP):
                continue
            found, key = (masks, stem[: -len(ISIC_MASK)]) if stem.endswith(ISIC_MASK) else (images, stem)
            if key in found:
                raise ValueError(f"{root}: two ISIC files for {key!r}: {_shown(found[key], root)} and {_shown(p, root)}; keep one")
            found[key] = p
    return _datalist(pair_keys(root, "ISIC", images, masks), root)


# --- BUSI --------------------------------------------------------------------------------------------


def _is_busi(root: Path) -> bool:
    return any(_BUSI_MASK.fullmatch(stem) for folder in [root, *_subdirs(root)] for stem in _stems(folder))


def merged_mask(paths: list[Path], name: str) -> Path:
    """The union of one image's masks as a 0/255 PNG in the cache folder, written once.

    The file name carries a hash of the sources' bytes: an unchanged set finds its file without decoding
    anything, an edited mask gives a new one. Foreground is read as the transforms read it (colour to
    grey, then > 127, or > 0.5 for 0/1 masks), so the union holds exactly the pixels each mask would add.
    """
    digest = hashlib.sha256()
    for p in sorted(paths):
        data = p.read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    target = default_cache_dir() / MERGED_MASK_DIR / f"{name}_mask_merged_{digest.hexdigest()[:16]}.png"
    if target.is_file():
        return target
    from medseg_peft.data.polyp_transforms import mask_to_grey
    from medseg_peft.io import atomic_write

    grey = []
    for p in paths:
        with Image.open(p) as img:
            grey.append(np.asarray(mask_to_grey(img)))
    if len({g.shape for g in grey}) > 1:
        sizes = ", ".join(f"{p.name} {g.shape[1]}x{g.shape[0]}" for p, g in zip(paths, grey))
        raise ValueError(f"{paths[0].parent}: the masks of {name!r} differ in size (WxH: {sizes}); they cannot be merged")
    union = np.logical_or.reduce([g > (127 if g.max() > 1 else 0.5) for g in grey])
    atomic_write(target, lambda tmp: Image.fromarray(union.astype(np.uint8) * 255).save(tmp, format="PNG"), suffix=".png")
    return target


def busi_pairs(root: Path) -> list[dict]:
    images: dict[tuple[Path, str], Path] = {}
    masks: dict[tuple[Path, str], list[Path]] = {}
    for folder in [root, *_subdirs(root)]:
        for stem, p in image_files(folder).items():
            if m := _BUSI_MASK.fullmatch(stem):
                masks.setdefault((folder, m.group(1)), []).append(p)
            else:
                images[(folder, stem)] = p
    pairs = pair_keys(root, "BUSI", images, {key: sorted(paths)[0] for key, paths in masks.items()})
    merged = {images[key]: merged_mask(paths, key[1]) for key, paths in masks.items() if len(paths) > 1}
    if merged:
        log.info("%s: %d BUSI image(s) have several masks, merged into %s", root, len(merged), default_cache_dir() / MERGED_MASK_DIR)
    return _datalist([(image, merged.get(image, mask)) for image, mask in pairs], root)


# --- detection ---------------------------------------------------------------------------------------

LAYOUTS = (
    Layout("DRIVE", "images/, 1st_manual/, in the folder or in training/ and test/", lambda r: bool(_drive_folders(r)), drive_pairs),
    Layout("Kvasir", "images/, masks/", lambda r: _image_mask_dirs(r) is not None, images_masks_pairs),
    Layout("CVC-ClinicDB", "Original/, Ground Truth/", lambda r: _cvc_dirs(r) is not None, cvc_clinicdb_pairs),
    Layout("PH2", "<case>/<case>_Dermoscopic_Image/, <case>/<case>_lesion/", lambda r: bool(_ph2_cases(r, first_only=True)), ph2_pairs),
    Layout("ISIC", "<id>.jpg, <id>_segmentation.png, in one folder or two", _is_isic, isic_pairs),
    Layout("BUSI", "class folders of <name>.png, <name>_mask.png, <name>_mask_1.png, ...", _is_busi, busi_pairs),
)


def which_layout(root: Path) -> Layout | None:
    """The first of :data:`LAYOUTS` that ``root`` has, or None."""
    return next((layout for layout in LAYOUTS if layout.matches(root)), None)
