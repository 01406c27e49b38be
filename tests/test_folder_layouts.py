"""The public 2D layouts a dataset_dir may have: CVC-ClinicDB, ISIC, BUSI, DRIVE, PH2, masks with a suffix."""

import re

import numpy as np
import pytest
from PIL import Image

from medseg_peft.data.polyp_folders import polyp_datalists


def _image(path, value=100, size=(8, 6), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


def _mask(path, box=(1, 1, 4, 4), size=(8, 6), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    a[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(a).convert(mode).save(path)


def _all(root, val_fraction=0.25):
    train, val = polyp_datalists(root, val_fraction=val_fraction, seed=0)
    return sorted(train + val, key=lambda item: item["name"]), len(train), len(val)


def test_cvc_clinicdb(tmp_path):
    for i in range(1, 5):
        _image(tmp_path / "Original" / f"{i}.tif")
        _mask(tmp_path / "Ground Truth" / f"{i}.tif")
    items, n_train, n_val = _all(tmp_path)
    assert [i["name"] for i in items] == ["1", "2", "3", "4"] and (n_train, n_val) == (3, 1)
    assert all("Ground Truth" in i["label"] and i["label"].endswith(f"{i['name']}.tif") for i in items)


def test_isic_in_one_folder_or_two(tmp_path):
    for i in range(4):
        _image(tmp_path / "a" / "ISIC2018_Task1-2_Training_Input" / f"ISIC_000000{i}.jpg")
        _mask(tmp_path / "a" / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_000000{i}_segmentation.png")
        _image(tmp_path / "b" / f"ISIC_000000{i}.jpg")
        _mask(tmp_path / "b" / f"ISIC_000000{i}_segmentation.png")
    for folder in ("a", "b"):
        items, _, _ = _all(tmp_path / folder)
        assert [i["name"] for i in items] == [f"ISIC_000000{i}" for i in range(4)]
        assert all(i["label"].endswith(f"{i['name']}_segmentation.png") for i in items)


def test_busi_merges_an_images_extra_masks(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "busi"
    for cls in ("benign", "malignant"):
        for i in (1, 2):
            _image(root / cls / f"{cls} ({i}).png")
            _mask(root / cls / f"{cls} ({i})_mask.png")
    _mask(root / "benign" / "benign (2)_mask_1.png", box=(5, 3, 8, 6), mode="RGBA")
    items, _, _ = _all(root)
    assert [i["name"] for i in items] == ["benign/benign (1)", "benign/benign (2)", "malignant/malignant (1)", "malignant/malignant (2)"]
    merged = np.asarray(Image.open(items[1]["label"]))
    assert merged[1:4, 1:4].all() and merged[3:6, 5:8].all() and merged.sum() == 255 * (9 + 9)
    assert items[1]["label"].startswith(str(tmp_path / "cache")) and items[0]["label"].endswith("benign (1)_mask.png")
    assert _all(root)[0][1]["label"] == items[1]["label"]  # written once, reused


def test_drive_pairs_by_number_across_training_and_test(tmp_path):
    for split, numbers in (("training", (21, 22)), ("test", (1, 2))):
        for n in numbers:
            _image(tmp_path / split / "images" / f"{n:02d}_{split}.tif")
            _mask(tmp_path / split / "1st_manual" / f"{n:02d}_manual1.gif", mode="P")
            _mask(tmp_path / split / "mask" / f"{n:02d}_{split}_mask.gif", mode="P")  # the field of view, not a label
    items, _, _ = _all(tmp_path)
    assert [i["name"] for i in items] == ["test_01", "test_02", "training_21", "training_22"]
    assert all("1st_manual" in i["label"] for i in items)


def test_ph2_case_folders(tmp_path):
    for case in ("IMD002", "IMD003", "IMD004", "IMD006"):
        base = tmp_path / "PH2 Dataset images" / case
        _image(base / f"{case}_Dermoscopic_Image" / f"{case}.bmp")
        _mask(base / f"{case}_lesion" / f"{case}_lesion.bmp", mode="RGB")
        _mask(base / f"{case}_roi" / f"{case}_R1_Label1.bmp")
    items, _, _ = _all(tmp_path)
    assert [i["name"] for i in items] == ["IMD002", "IMD003", "IMD004", "IMD006"]
    assert all(i["label"].endswith(f"{i['name']}_lesion.bmp") for i in items)


def test_masks_named_with_a_suffix(tmp_path):
    for i in range(4):
        _image(tmp_path / "images" / f"case{i}.png")
        _mask(tmp_path / "masks" / f"case{i}_mask.png")
    items, _, _ = _all(tmp_path)
    assert [i["name"] for i in items] == [f"case{i}" for i in range(4)] and items[0]["label"].endswith("case0_mask.png")


@pytest.mark.parametrize("layout", ["busi", "isic", "ph2", "suffix"])
def test_unpaired_files_are_listed(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    if layout == "busi":
        _image(tmp_path / "benign" / "benign (1).png")
        _mask(tmp_path / "benign" / "benign (1)_mask.png")
        _image(tmp_path / "benign" / "benign (2).png")
        lonely = "benign (2).png"
    elif layout == "isic":
        _image(tmp_path / "ISIC_1.jpg")
        _mask(tmp_path / "ISIC_1_segmentation.png")
        _mask(tmp_path / "ISIC_2_segmentation.png")
        lonely = "ISIC_2_segmentation.png"
    elif layout == "ph2":
        _image(tmp_path / "IMD002" / "IMD002_Dermoscopic_Image" / "IMD002.bmp")
        lonely = "IMD002.bmp"
    else:
        _image(tmp_path / "images" / "a.png")
        _image(tmp_path / "images" / "b.png")
        _mask(tmp_path / "masks" / "a_mask.png")
        lonely = "b"
    with pytest.raises(ValueError, match=f"do not pair up.*{re.escape(lonely)}"):
        polyp_datalists(tmp_path)


def test_an_unknown_folder_names_the_layouts_it_looked_for(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(FileNotFoundError, match="CVC-ClinicDB, DRIVE, PH2, ISIC, BUSI"):
        polyp_datalists(tmp_path)
