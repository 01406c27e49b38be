"""The folder layouts public 2D medical sets ship in, recognised as they are: which file is whose mask.

Beside the Kvasir-SEG and PraNet layouts (``polyp_folders``), a ``dataset_dir`` may be:

* **masks with a suffix**: ``images/case1.png`` + ``masks/case1_mask.png`` (or ``_seg``, ...): the one
  suffix every mask stem adds to an image stem is found by itself;
* **CVC-ClinicDB**: ``Original/`` + ``Ground Truth/`` (TIFF), paired by stem;
* **DRIVE**: ``images/21_training.tif`` + ``1st_manual/21_manual1.gif``, possibly under ``training/``
  and ``test/`` (paired by the leading number; every pair found is one pool split by ``val_fraction``);
* **PH2**: a folder per case, ``IMD002/IMD002_Dermoscopic_Image/IMD002.bmp`` +
  ``IMD002/IMD002_lesion/IMD002_lesion.bmp``;
* **ISIC**: ``ISIC_0000000.jpg`` + ``ISIC_0000000_segmentation.png``, in one folder or two;
* **BUSI**: class folders of ``benign (1).png`` + ``benign (1)_mask.png``; an image's further masks
  (``_mask_1``, ``_mask_2``) are merged with it into one mask, written once into the cache folder.

An image without a mask, or a mask without an image, is an error that lists them: a silently smaller
set is how a half-extracted archive goes unnoticed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from PIL import Image

from medseg_peft.data.cache import default_cache_dir
from medseg_peft.io import atomic_write

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif")
_SHOW = 5


def _files(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _listing(names) -> str:
    names = sorted(str(n) for n in names)
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f", ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def pair_keys(where: Path, images: dict[str, Path], masks: dict[str, Path], what: str) -> list[dict]:
    """``[{"image", "label", "name"}]`` for keys in both; an error listing the unpaired files otherwise."""
    lonely_images = [images[k].name for k in set(images) - set(masks)]
    lonely_masks = [masks[k].name for k in set(masks) - set(images)]
    problems = ([f"{len(lonely_images)} image(s) without a mask: {_listing(lonely_images)}"] if lonely_images else []) + \
               ([f"{len(lonely_masks)} mask(s) without an image: {_listing(lonely_masks)}"] if lonely_masks else [])
    if problems:
        raise ValueError(f"{where} ({what} layout): files do not pair up: " + "; ".join(problems))
    if not images:
        raise ValueError(f"{where} ({what} layout): no image files found")
    return [{"image": str(images[k]), "label": str(masks[k]), "name": k} for k in sorted(images)]


def mask_suffix(image_stems, mask_stems) -> str | None:
    """The one suffix every mask stem adds to an image stem (``"_mask"``), ``""`` when stems match, else None."""
    images, masks = set(image_stems), set(mask_stems)
    if masks <= images:
        return ""
    candidates = {m[len(i):] for m in masks for i in images if m.startswith(i) and len(m) > len(i)}
    for suffix in sorted(candidates, key=len):
        if {m[: -len(suffix)] for m in masks if m.endswith(suffix)} <= images and all(m.endswith(suffix) for m in masks):
            return suffix
    return None


def _find_dir(parent: Path, pattern: str) -> Path | None:
    rule = re.compile(pattern, re.IGNORECASE)
    return next((p for p in sorted(parent.iterdir()) if p.is_dir() and rule.fullmatch(p.name)), None)


def cvc_clinicdb(root: Path) -> list[dict] | None:
    images, masks = _find_dir(root, r"original"), _find_dir(root, r"ground[ _]?truth")
    if images is None or masks is None:
        return None
    return pair_keys(root, {p.stem: p for p in _files(images)}, {p.stem: p for p in _files(masks)}, "CVC-ClinicDB")


def drive(root: Path) -> list[dict] | None:
    manual_dirs = [p for p in root.rglob("1st_manual") if p.is_dir()]
    if not manual_dirs:
        return None
    images, masks = {}, {}
    for manual in manual_dirs:
        split = manual.parent.name if manual.parent != root else ""
        tag = f"{split}_" if split else ""
        masks.update({f"{tag}{p.name.split('_')[0]}": p for p in _files(manual)})
        if (manual.parent / "images").is_dir():
            images.update({f"{tag}{p.name.split('_')[0]}": p for p in _files(manual.parent / "images")})
    return pair_keys(root, images, masks, "DRIVE")


def ph2(root: Path) -> list[dict] | None:
    cases = sorted(p for p in root.rglob("*_Dermoscopic_Image") if p.is_dir())
    if not cases:
        return None
    images, masks = {}, {}
    for folder in cases:
        case = folder.name[: -len("_Dermoscopic_Image")]
        images.update({case: p for p in _files(folder)[:1]})
        lesion = folder.parent / f"{case}_lesion"
        if lesion.is_dir():
            masks.update({case: p for p in _files(lesion)[:1]})
    return pair_keys(root, images, masks, "PH2")


def isic(root: Path) -> list[dict] | None:
    files = _files(root, recursive=True)
    masks = {p.stem[: -len("_segmentation")]: p for p in files if p.stem.endswith("_segmentation")}
    if not masks:
        return None
    images = {p.stem: p for p in files if not p.stem.endswith(("_segmentation", "_superpixels"))}
    return pair_keys(root, images, masks, "ISIC")


BUSI_MASK = re.compile(r"^(.*)_mask(?:_(\d+))?$")


def busi(root: Path) -> list[dict] | None:
    files = _files(root, recursive=True)
    groups: dict[str, list[Path]] = {}
    for p in files:
        if m := BUSI_MASK.match(p.stem):
            groups.setdefault(str(p.parent / m.group(1)), []).append(p)
    if not groups:
        return None
    images = {str(p.parent / p.stem): p for p in files if not BUSI_MASK.match(p.stem)}
    masks = {key: merged_mask(sorted(paths)) if len(paths) > 1 else paths[0] for key, paths in groups.items()}
    pairs = pair_keys(root, images, masks, "BUSI")
    return [dict(item, name=Path(item["name"]).relative_to(root).as_posix()) for item in pairs]


def merged_mask(paths: list[Path]) -> Path:
    """One mask, the union of ``paths``, written once into the cache folder (named by the sources' content)."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()[:16]
    target = default_cache_dir() / "merged_masks" / f"{paths[0].stem}_{digest}.png"
    if not target.is_file():
        arrays = [np.asarray(Image.open(p).convert("L")) > 127 for p in paths]
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"masks of one image differ in size: {_listing(p.name for p in paths)} in {paths[0].parent}")
        union = Image.fromarray((np.logical_or.reduce(arrays) * 255).astype(np.uint8))
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: union.save(tmp, format="PNG"), suffix=".png")
    return target


LAYOUTS = {"CVC-ClinicDB": cvc_clinicdb, "DRIVE": drive, "PH2": ph2, "ISIC": isic, "BUSI": busi}


def other_layout_pairs(root: Path) -> tuple[str, list[dict]] | None:
    """``(layout name, pairs)`` for the first layout ``root`` has, or None."""
    for name, find in LAYOUTS.items():
        pairs = find(root)
        if pairs is not None:
            return name, pairs
    return None
