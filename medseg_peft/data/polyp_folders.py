"""2D image/mask folders on disk -> MONAI datalists, with every layout problem caught before training.

The layout is recognised by which sub-folders and file names exist:

* **Kvasir-SEG**: ``<root>/images/*`` and ``<root>/masks/*``. There is no official split, so
  validation is a seeded fraction of the stems (see :func:`medseg_peft.data.folders.split_by_stem`).
* **PraNet benchmark**: ``<root>/TrainDataset/{images,masks}`` for training and
  ``<root>/TestDataset/<set>/{images,masks}`` for the test sets (Kvasir, CVC-ClinicDB, CVC-ColonDB,
  CVC-300, ETIS-LaribPolypDB). The singular ``image`` / ``mask`` spellings are accepted too.
* **DRIVE, CVC-ClinicDB, PH2, ISIC, BUSI**, and ``images/`` + ``masks/`` whose masks add a suffix to
  their image's stem (``case1_mask.png``): see :mod:`medseg_peft.data.layouts_2d`, which says which
  layout a folder is in and which mask is whose. Like Kvasir-SEG, these are split by a seeded fraction.

Images and masks are paired by file *stem*, never by sorted position: Kvasir ships ``.jpg`` images
with ``.jpg`` masks, other copies convert masks to ``.png`` and PraNet's test loader accepts ``.tif``;
a pairing by position would silently shift every label by one the moment a single file is missing.

The checks read image headers only (``PIL.Image.open(p).size``), so a 1,450-image folder is verified
in well under a second and a broken download fails here, naming the file, rather than at epoch 3.
:func:`check_contents` then decodes every file once, before any training, for what only the pixels show.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from medseg_peft.data.folders import _SHOW, _image_mask_dirs, _listing, pair_by_stem, split_by_stem
from medseg_peft.data.layouts_2d import LAYOUTS, which_layout

log = logging.getLogger("medseg_peft")

PRANET_TRAIN_DIR = "TrainDataset"
PRANET_TEST_DIR = "TestDataset"
PRANET_TEST_SETS = ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "Kvasir")

MIN_IMAGE_SIDE = 8
"""Smallest image side, in pixels, a data set may have.

An image smaller than this is a thumbnail, an icon or a failed export rather than a photograph: resized
to the model's input (hundreds of pixels) it becomes a few blurred blocks, and its mask would still count
in the score. 8 px keeps tiny but real crops acceptable.
"""

LARGE_IMAGE_PIXELS = 4 * 1024 * 1024
"""Pixel count (4x SAM's 1024 x 1024 input, e.g. 2048 x 2048) above which the data check warns.

Every image is decoded and resized to the model's input size again each epoch; an image this large
costs many times a typical photograph's time, so a handful of them can make an epoch several times
slower. Shrinking them once beforehand loses nothing the model sees.
"""

# what PIL raises for damaged files: OSError (truncated data), SyntaxError (a broken PNG chunk),
# struct.error and EOFError (a header cut short), ValueError (impossible header values)
_DECODE_ERRORS = (OSError, SyntaxError, struct.error, EOFError, ValueError)


def _header_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:  # reads the header only; pixels are decoded lazily and never here
        return im.size


def _problem(count_text: str, lines: list[str]) -> str:
    return (f"{len(lines)} {count_text}:\n    " + "\n    ".join(lines[:_SHOW])
            + (f"\n    ... and {len(lines) - _SHOW} more" if len(lines) > _SHOW else ""))


def check_pairs(pairs: Iterable[dict | tuple[str, str]]) -> None:
    """Raise one ``ValueError`` listing every unreadable file, every image/mask size mismatch and every
    image below :data:`MIN_IMAGE_SIDE`; otherwise log one line naming the largest image.

    ``pairs`` are datalist items (``{"image", "label", ...}``) or ``(image, mask)`` tuples. All
    problems are gathered before raising so one run shows the whole damage, not the first file. The
    largest image is named because every image is resized to the model's input size each epoch: one
    huge file slows every epoch without any other sign (a warning above :data:`LARGE_IMAGE_PIXELS`).
    """
    unreadable: list[str] = []
    mismatched: list[str] = []
    tiny: list[str] = []
    large = 0
    largest: tuple[int, str, tuple[int, int]] | None = None
    count = 0
    for item in pairs:
        count += 1
        image, mask = (item["image"], item["label"]) if isinstance(item, dict) else item
        sizes = {}
        for role, path in (("image", image), ("mask", mask)):
            try:
                sizes[role] = _header_size(path)
            except (UnidentifiedImageError, *_DECODE_ERRORS) as err:
                unreadable.append(f"{path} ({role}: {type(err).__name__}: {err})")
        if "image" in sizes:
            iw, ih = sizes["image"]
            if min(iw, ih) < MIN_IMAGE_SIDE:
                tiny.append(f"{image} ({iw}x{ih})")
            if iw * ih > LARGE_IMAGE_PIXELS:
                large += 1
            if largest is None or iw * ih > largest[0]:
                largest = (iw * ih, str(image), (iw, ih))
        if len(sizes) == 2 and sizes["image"] != sizes["mask"]:
            (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
            mismatched.append(f"{image} is {iw}x{ih} (WxH) but its mask {mask} is {mw}x{mh}")
    if count == 0:
        raise ValueError("no image/mask pairs to check: the datalist is empty")
    problems = []
    if unreadable:
        problems.append(_problem("file(s) PIL cannot open", unreadable))
    if mismatched:
        problems.append(_problem("mask(s) differ in size from their image", mismatched))
    if tiny:
        problems.append(_problem(f"image(s) smaller than {MIN_IMAGE_SIDE} px on a side (WxH), too small to segment", tiny))
    if problems:
        raise ValueError("the polyp dataset has broken pairs:\n  " + "\n  ".join(problems))
    _, name, (w, h) = largest
    if large:
        log.warning("every image is resized to the model's input size each epoch, and %d image(s) have more than %d pixels "
                    "(the largest: %s, %dx%d WxH), which slows every epoch: shrink them once beforehand", large, LARGE_IMAGE_PIXELS, name, w, h)
    else:
        log.info("every image is resized to the model's input size each epoch; the largest is %s (%dx%d WxH)", name, w, h)


def _decoded(path: str, role: str, convert):
    """``convert`` of the fully decoded file; a damaged file is a ``ValueError`` naming it.

    ``verify`` first: it checks a PNG's chunk checksums to its end marker, so a download cut after the
    pixel data (which PIL would still decode) is caught too; it leaves the file unusable, hence the
    second open.
    """
    def damaged(err: BaseException) -> ValueError:
        return ValueError(f"{role} {path} cannot be decoded ({type(err).__name__}: {err}): a truncated or damaged file; replace or remove it")

    try:
        with Image.open(path) as img:
            img.verify()
        img = Image.open(path)
    except (UnidentifiedImageError, *_DECODE_ERRORS) as err:
        raise damaged(err) from err
    with img:
        try:
            img.load()
        except _DECODE_ERRORS as err:
            raise damaged(err) from err
        return convert(img)  # outside the decode errors: its own refusals (NaN pixels) say what they are


def check_contents(items: Iterable[dict], what: str = "dataset") -> None:
    """Decode every image and mask once (a truncated file fails here, named, not in selection), and refuse
    masks whose foreground vanishes under the binarisation the transforms apply, before training.

    Images are converted as the transforms convert them (:func:`~medseg_peft.data.polyp_transforms.image_to_rgb`),
    so a float image with NaN pixels is refused here too. Masks are read as the transforms read them
    (colour to grey) and foreground is value > 127 (> 0.5 for 0/1 masks). A mask with non-zero pixels
    that are all below that (0/100 masks, pure red masks: grey 76) would train and score as empty, and
    empty-vs-empty scores 1: a perfect score for a broken data set. A set whose masks are all empty
    cannot measure anything either, nor one whose masks are all entirely foreground: predicting
    "everything" scores 1 on it without finding anything.
    """
    import numpy as np

    from medseg_peft.data.polyp_transforms import image_to_rgb, mask_to_grey

    items = list(items)
    vanished, empty, full = [], 0, 0
    for item in items:
        _decoded(item["image"], "image", image_to_rgb)
        mask = _decoded(item["label"], "mask", lambda img: np.asarray(mask_to_grey(img)))
        top = float(mask.max()) if mask.size else 0.0
        threshold = 127.0 if top > 1.0 else 0.5
        if top == 0:
            empty += 1
        elif top <= threshold:
            vanished.append(f"{item['label']} (max {top:g})")
        elif bool((mask > threshold).all()):
            full += 1
    if vanished:
        raise ValueError(
            f"{len(vanished)} mask(s) of the {what} have non-zero pixels but none above the foreground threshold "
            f"(> 127 for 0-255 masks, > 0.5 for 0/1 masks), so they would count as empty: {_listing(vanished)}. "
            "Store masks as 0/255 (or 0/1) grey images")
    if items and empty == len(items):
        raise ValueError(f"every one of the {len(items)} masks of the {what} is empty: the scores would measure nothing")
    if items and full == len(items):
        raise ValueError(f"every one of the {len(items)} masks of the {what} is entirely foreground: the scores would measure nothing")


def _pranet_datalists(root: Path, val_fraction: float, seed: int, val_sets: Sequence[str] | None) -> tuple[list[dict], list[dict]]:
    train_root = root / PRANET_TRAIN_DIR
    train_dirs = _image_mask_dirs(train_root)
    if train_dirs is None:
        raise FileNotFoundError(f"{train_root}: expected sub-folders 'images' (or 'image') and 'masks' (or 'mask'), "
                                f"found {sorted(p.name for p in train_root.iterdir() if p.is_dir())}")
    train = pair_by_stem(*train_dirs)

    test_root = root / PRANET_TEST_DIR
    available = sorted(p.name for p in test_root.iterdir() if _image_mask_dirs(p) is not None) if test_root.is_dir() else []
    if val_sets is None:
        if not available:
            log.warning("%s has no test sets (%s/<name>/{images,masks}); validating on a seeded %.0f%% of %s instead",
                        root, PRANET_TEST_DIR, 100 * val_fraction, PRANET_TRAIN_DIR)
            check_pairs(train)
            return split_by_stem(train, val_fraction, seed)
        val_sets = available
    elif isinstance(val_sets, str):
        val_sets = [val_sets]
    missing = [s for s in val_sets if s not in available]
    if missing:
        raise FileNotFoundError(f"{test_root}: no test set(s) {missing} with images/ and masks/ sub-folders; "
                                f"available: {available or 'none'} (the PraNet sets are {list(PRANET_TEST_SETS)})")
    val = []
    for name in val_sets:
        val += [dict(item, set=name) for item in pair_by_stem(*_image_mask_dirs(test_root / name))]
    check_pairs(train + val)
    return train, val


def polyp_datalists(
    dataset_dir: str | Path, val_fraction: float = 0.2, seed: int = 0, val_sets: Sequence[str] | str | None = None
) -> tuple[list[dict], list[dict]]:
    """``(train, val)`` datalists of ``{"image": path, "label": path, "name": stem}`` dicts.

    PraNet layout: train is ``TrainDataset``; val is the named ``val_sets`` under ``TestDataset``
    (default: every set there), each item tagged with ``"set": name`` so scores can be reported per set;
    ``val_fraction`` and ``seed`` only matter when it has no ``TestDataset``. Every other layout
    (:data:`medseg_peft.data.layouts_2d.LAYOUTS`: Kvasir-SEG, DRIVE, CVC-ClinicDB, PH2, ISIC, BUSI) is
    one pool of pairs, a seeded ``val_fraction`` of which is validation.
    """
    root = Path(dataset_dir).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"polyp dataset folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"polyp dataset path {root} is a file; pass the folder that holds images/ and masks/")
    if (root / PRANET_TRAIN_DIR).is_dir():
        return _pranet_datalists(root, val_fraction, seed, val_sets)
    layout = which_layout(root)
    if layout is None:
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        others = "; ".join(f"{lay.name} ({lay.folders})" for lay in LAYOUTS if lay.name != "Kvasir")
        raise FileNotFoundError(
            f"{root} has no known layout: expected 'images/' and 'masks/' (Kvasir-SEG; masks named <stem> or <stem><suffix>), "
            f"'{PRANET_TRAIN_DIR}/{{images,masks}}' with '{PRANET_TEST_DIR}/<set>/{{images,masks}}' (PraNet), or "
            f"{others}; found sub-folders {found or 'none'}"
        )
    if val_sets is not None:
        raise ValueError(f"{root} has the {layout.name} layout ({layout.folders}), which has no named test sets; drop val_sets={val_sets!r}")
    items = layout.pairs(root)
    log.info("%s: %s layout, %d image / mask pairs", root, layout.name, len(items))
    check_pairs(items)
    return split_by_stem(items, val_fraction, seed)
