"""The public 2D layouts a dataset_dir may be in (DRIVE, CVC-ClinicDB, PH2, ISIC, BUSI, masks with a
suffix): which mask goes with which image, the split, and the errors that name the unpaired files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg_peft.data import polyp_datalists, polyp_transforms
from medseg_peft.data.layouts_2d import LAYOUTS, mask_suffix, which_layout


def image(path: Path, value: int = 100, mode: str = "RGB") -> Path:
    """An 8x8 picture; ``value`` makes each image of a set distinct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).convert(mode).save(path)
    return path


def box(rows: slice, cols: slice) -> np.ndarray:
    a = np.zeros((8, 8), bool)
    a[rows, cols] = True
    return a


def mask(path: Path, fg: np.ndarray | None = None, mode: str = "L") -> Path:
    """A 0/255 8x8 mask (``fg`` True is foreground), saved in ``mode`` as the real sets store it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fg = box(slice(1, 4), slice(1, 4)) if fg is None else fg
    Image.fromarray(fg.astype(np.uint8) * 255).convert(mode).save(path)
    return path


def datalists(root: Path, val_fraction: float = 0.25):
    """``(items sorted by name, n_train, n_val)``; the split is checked disjoint and complete."""
    train, val = polyp_datalists(root, val_fraction=val_fraction, seed=0)
    assert not {t["name"] for t in train} & {v["name"] for v in val}
    return sorted(train + val, key=lambda it: it["name"]), len(train), len(val)


def labels(items, root: Path) -> dict[str, tuple[str, str]]:
    """``{name: (image, label)}`` as paths below ``root``."""
    return {it["name"]: (Path(it["image"]).relative_to(root).as_posix(), Path(it["label"]).relative_to(root).as_posix()) for it in items}


# --- each layout pairs the right files ---------------------------------------------------------------


@pytest.mark.parametrize("folders", [("Original", "Ground Truth"), ("original", "ground_truth")])
def test_cvc_clinicdb_pairs_tiff_images_and_masks_by_stem(tmp_path, folders):
    for i in (1, 2, 3, 10):
        image(tmp_path / folders[0] / f"{i}.tif", value=10 * i)
        mask(tmp_path / folders[1] / f"{i}.tif")
    items, n_train, n_val = datalists(tmp_path)
    assert which_layout(tmp_path).name == "CVC-ClinicDB"
    assert labels(items, tmp_path) == {str(i): (f"{folders[0]}/{i}.tif", f"{folders[1]}/{i}.tif") for i in (1, 2, 3, 10)}
    assert (n_train, n_val) == (3, 1)


@pytest.mark.parametrize("two_folders", [False, True])
def test_isic_pairs_by_the_segmentation_suffix_in_one_folder_or_two(tmp_path, two_folders):
    inputs, truth = ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth") if two_folders else ("", "")
    ids = [f"ISIC_{n:07d}" for n in (0, 1, 3, 12, 16)]
    for k, i in enumerate(ids):
        image(tmp_path / inputs / f"{i}.jpg", value=20 * k)
        image(tmp_path / inputs / f"{i}_superpixels.png", value=7)  # ISIC 2017 ships these beside the images
        mask(tmp_path / truth / f"{i}_segmentation.png")
    (tmp_path / inputs / "LICENSE.txt").write_text("not an image")
    items, n_train, n_val = datalists(tmp_path, val_fraction=0.2)
    assert which_layout(tmp_path).name == "ISIC"
    prefix = lambda folder: f"{folder}/" if folder else ""  # noqa: E731
    assert labels(items, tmp_path) == {i: (f"{prefix(inputs)}{i}.jpg", f"{prefix(truth)}{i}_segmentation.png") for i in ids}
    assert (n_train, n_val) == (4, 1)


def test_busi_pairs_class_folders_and_merges_extra_masks_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(cache))
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls, n in (("benign", 3), ("malignant", 2), ("normal", 1)):
        for i in range(1, n + 1):
            image(root / cls / f"{cls} ({i}).png", value=30 * i, mode="L")
            mask(root / cls / f"{cls} ({i})_mask.png", fg=np.zeros((8, 8), bool) if cls == "normal" else None, mode="1")
    first, second, third = box(slice(1, 4), slice(1, 4)), box(slice(5, 7), slice(0, 2)), box(slice(6, 8), slice(5, 8))
    mask(root / "benign" / "benign (2)_mask_1.png", fg=second, mode="RGB")
    mask(root / "benign" / "benign (2)_mask_2.png", fg=third)

    items, n_train, n_val = datalists(root, val_fraction=0.34)
    assert which_layout(root).name == "BUSI"
    assert (n_train, n_val) == (4, 2)
    pairs = labels([it for it in items if it["name"] != "benign (2)"], root)
    assert pairs == {f"{c} ({i})": (f"{c}/{c} ({i}).png", f"{c}/{c} ({i})_mask.png")
                     for c, i in (("benign", 1), ("benign", 3), ("malignant", 1), ("malignant", 2), ("normal", 1))}

    merged = Path(next(it["label"] for it in items if it["name"] == "benign (2)"))
    assert merged.parent == cache / "merged_masks" and merged.name.startswith("benign (2)_mask")
    assert np.array_equal(np.asarray(Image.open(merged)), (first | second | third).astype(np.uint8) * 255)
    written = merged.stat().st_mtime_ns
    again = {it["name"]: it["label"] for it in datalists(root, val_fraction=0.34)[0]}
    assert again["benign (2)"] == str(merged) and merged.stat().st_mtime_ns == written  # reused, not rewritten
    assert sorted(p.name for p in merged.parent.iterdir()) == [merged.name]  # no temporary left behind

    mask(root / "benign" / "benign (2)_mask_2.png", fg=box(slice(0, 1), slice(7, 8)))  # a source changed
    changed = Path({it["name"]: it["label"] for it in datalists(root)[0]}["benign (2)"])
    assert changed != merged and np.asarray(Image.open(changed)).sum() == 255 * (9 + 4 + 1)


@pytest.mark.parametrize("test_labelled", [True, False])
def test_drive_pairs_by_number_and_ignores_the_field_of_view_masks(tmp_path, test_labelled):
    root = tmp_path / "DRIVE"
    for split, numbers in (("training", (21, 22, 23)), ("test", (1, 2))):
        for n in numbers:
            image(root / split / "images" / f"{n:02d}_{split}.tif", value=n)
            mask(root / split / "mask" / f"{n:02d}_{split}_mask.gif", fg=np.ones((8, 8), bool))  # field of view, not a label
            if split == "training" or test_labelled:
                mask(root / split / "1st_manual" / f"{n:02d}_manual1.gif")
            if split == "test" and test_labelled:
                mask(root / split / "2nd_manual" / f"{n:02d}_manual2.gif")
    items, n_train, n_val = datalists(root, val_fraction=0.2)
    assert which_layout(root).name == "DRIVE"
    expected = {f"{n}_training": (f"training/images/{n}_training.tif", f"training/1st_manual/{n}_manual1.gif") for n in (21, 22, 23)}
    if test_labelled:  # one pool, split by val_fraction
        expected |= {f"0{n}_test": (f"test/images/0{n}_test.tif", f"test/1st_manual/0{n}_manual1.gif") for n in (1, 2)}
    assert labels(items, root) == expected
    assert (n_train, n_val) == ((4, 1) if test_labelled else (2, 1))

    # one split folder on its own is DRIVE too, although images/ + mask/ sit beside 1st_manual/
    items, _, _ = datalists(root / "training")
    assert which_layout(root / "training").name == "DRIVE"
    assert [Path(it["label"]).parent.name for it in items] == ["1st_manual"] * 3


@pytest.mark.parametrize("below", ["", "PH2 Dataset images"])
def test_ph2_pairs_each_case_folder(tmp_path, below):
    root = tmp_path / "PH2Dataset"
    cases = ("IMD002", "IMD003", "IMD010", "IMD435")
    for k, case in enumerate(cases):
        base = root / "PH2 Dataset images" / case
        image(base / f"{case}_Dermoscopic_Image" / f"{case}.bmp", value=40 * k)
        mask(base / f"{case}_lesion" / f"{case}_lesion.bmp", mode="1" if k % 2 else "RGB")
        mask(base / f"{case}_roi" / f"{case}_R1_Label4.bmp")  # colour-class regions: not the lesion mask
    (root / "PH2_dataset.txt").write_text("metadata")
    items, n_train, n_val = datalists(root / below)
    assert which_layout(root / below).name == "PH2"
    case_dir = lambda case: f"{'PH2 Dataset images/' if not below else ''}{case}"  # noqa: E731
    assert labels(items, root / below) == {
        c: (f"{case_dir(c)}/{c}_Dermoscopic_Image/{c}.bmp", f"{case_dir(c)}/{c}_lesion/{c}_lesion.bmp") for c in cases}
    assert (n_train, n_val) == (3, 1)


@pytest.mark.parametrize("suffix", ["_mask", "_seg", "_segmentation"])
def test_images_and_masks_with_a_shared_suffix(tmp_path, suffix):
    stems = ["case1", "case10", "case2", "patient_7"]
    for k, s in enumerate(stems):
        image(tmp_path / "images" / f"{s}.png", value=50 * k)
        mask(tmp_path / "masks" / f"{s}{suffix}.png")
    items, n_train, n_val = datalists(tmp_path)
    assert which_layout(tmp_path).name == "Kvasir"
    assert labels(items, tmp_path) == {s: (f"images/{s}.png", f"masks/{s}{suffix}.png") for s in stems}
    assert (n_train, n_val) == (3, 1)


def test_mask_suffix_only_when_every_mask_shares_it():
    assert mask_suffix({"a", "b"}, {"a", "b"}) is None  # Kvasir-SEG: same stems
    assert mask_suffix({"case1", "case10"}, {"case1_mask", "case10_mask"}) == "_mask"
    assert mask_suffix({"case1", "case10"}, {"case10_mask"}) == "_mask"
    assert mask_suffix({"a", "b"}, {"a_mask", "b_seg"}) is None  # no single suffix
    assert mask_suffix({"a", "b"}, {"x_mask", "y_mask"}) is None  # no mask starts with an image stem
    assert mask_suffix({"a", "b"}, {"a", "b_mask"}) is None  # some masks named as their image


def test_masks_of_each_layout_load_as_their_binary_label(tmp_path, monkeypatch):
    """GIF palette (DRIVE), 1-bit and RGB BMP (PH2), 1-bit PNG (BUSI), TIFF (CVC) all read as the same box."""
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    truth = box(slice(1, 4), slice(2, 6))
    tf = polyp_transforms(8, train=False)
    img = image(tmp_path / "img.tif")
    for name, mode in (("m.gif", "P"), ("m1.bmp", "1"), ("mrgb.bmp", "RGB"), ("m.png", "1"), ("m.tif", "L"), ("mrgb.tif", "RGB")):
        out = tf({"image": str(img), "label": str(mask(tmp_path / name, fg=truth, mode=mode))})
        assert np.array_equal(out["label"][0].numpy() > 0.5, truth), name


# --- errors ------------------------------------------------------------------------------------------


def _unpaired(kind: str, root: Path) -> tuple[Path, str]:
    """A folder of ``kind`` with one unpaired file: ``(folder the message must name, file it must list)``."""
    if kind == "CVC-ClinicDB":
        image(root / "Original" / "1.tif"), mask(root / "Ground Truth" / "1.tif"), image(root / "Original" / "2.tif")
        return root, "Original/2.tif"
    if kind == "ISIC":
        image(root / "in" / "ISIC_0000001.jpg"), mask(root / "gt" / "ISIC_0000001_segmentation.png")
        mask(root / "gt" / "ISIC_0000002_segmentation.png")
        return root, "gt/ISIC_0000002_segmentation.png"
    if kind == "BUSI":
        image(root / "benign" / "benign (1).png"), mask(root / "benign" / "benign (1)_mask.png")
        image(root / "malignant" / "malignant (3).png")
        return root, "malignant/malignant (3).png"
    if kind == "DRIVE":
        image(root / "training" / "images" / "21_training.tif"), mask(root / "training" / "1st_manual" / "21_manual1.gif")
        mask(root / "training" / "1st_manual" / "22_manual1.gif")
        return root / "training", "training/1st_manual/22_manual1.gif"
    if kind == "PH2":
        image(root / "IMD002" / "IMD002_Dermoscopic_Image" / "IMD002.bmp"), mask(root / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp")
        image(root / "IMD003" / "IMD003_Dermoscopic_Image" / "IMD003.bmp")
        return root, "IMD003/IMD003_Dermoscopic_Image/IMD003.bmp"
    image(root / "images" / "a.png"), image(root / "images" / "b.png"), mask(root / "masks" / "a_mask.png")
    return root, "images/b.png"


@pytest.mark.parametrize("kind", ["CVC-ClinicDB", "ISIC", "BUSI", "DRIVE", "PH2", "suffix"])
def test_unpaired_files_are_a_one_line_error_naming_folder_and_file(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    folder, lonely = _unpaired(kind, tmp_path / "ds")
    with pytest.raises(ValueError) as err:
        polyp_datalists(tmp_path / "ds")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{folder} (") and "do not pair up" in msg and repr(lonely) in msg, msg


def test_an_unknown_folder_names_itself_and_every_layout_looked_for(tmp_path):
    root = tmp_path / "stuff"
    image(root / "pictures" / "a.png")
    with pytest.raises(FileNotFoundError) as err:
        polyp_datalists(root)
    msg = str(err.value)
    assert msg.startswith(f"{root} has no known layout") and "found sub-folders ['pictures']" in msg
    for name in ["Kvasir-SEG", "PraNet"] + [lay.name for lay in LAYOUTS if lay.name != "Kvasir"]:
        assert f"({name}" in msg or f"{name} (" in msg, name


def test_named_test_sets_are_refused_for_a_pooled_layout(tmp_path):
    image(tmp_path / "Original" / "1.tif"), mask(tmp_path / "Ground Truth" / "1.tif")
    with pytest.raises(ValueError, match=re.escape("has the CVC-ClinicDB layout (Original/, Ground Truth/), which has no named test sets")):
        polyp_datalists(tmp_path, val_sets=["Kvasir"])


def test_detection_reads_names_only(tmp_path, monkeypatch):
    """Recognising a layout must not decode a pixel: a 1,000-image folder is recognised at once."""
    for i in range(3):
        (tmp_path / "Original").mkdir(exist_ok=True)
        (tmp_path / "Original" / f"{i}.tif").write_bytes(b"not decoded")
        (tmp_path / "Ground Truth").mkdir(exist_ok=True)
        (tmp_path / "Ground Truth" / f"{i}.tif").write_bytes(b"not decoded")

    def no_open(*args, **kwargs):
        raise AssertionError("detection opened an image")

    monkeypatch.setattr(Image, "open", no_open)
    assert which_layout(tmp_path).name == "CVC-ClinicDB"
    assert os.path.basename(which_layout(tmp_path).pairs(tmp_path)[0]["label"]) == "0.tif"
