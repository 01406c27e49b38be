"""Polyp folders, transforms and synthetic polyps: layouts, pairing, the errors users hit, orientation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medseg_peft.data import (
    check_pairs,
    make_synthetic_polyps,
    polyp_datalists,
    polyp_image_pair,
    polyp_transforms,
    split_by_stem,
    synthetic_polyps,
)


def write_pair(image_dir, mask_dir, stem, size=(24, 16), image_ext=".jpg", mask_ext=".png", mask_size=None):
    """A small RGB image and a 0/255 mask; ``size`` is (W, H) as PIL counts."""
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    w, h = size
    rgb = np.random.default_rng(len(stem)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(image_dir / f"{stem}{image_ext}")
    mw, mh = mask_size or size
    mask = np.zeros((mh, mw), np.uint8)
    mask[: mh // 2, : mw // 2] = 255
    Image.fromarray(mask).save(mask_dir / f"{stem}{mask_ext}")


def kvasir(root, stems, **kw):
    for i, stem in enumerate(stems):
        write_pair(root / "images", root / "masks", stem, size=(20 + i, 12 + i), **kw)  # distinct sizes: a mispairing would fail the size check
    return root


# --- layouts and pairing ---------------------------------------------------------------------------


def test_kvasir_layout_pairs_jpg_images_with_png_masks_by_stem(tmp_path):
    stems = ["cju0qkwl35piu0993l0dewei2", "a-b", "a", "z9", "b_10", "b_2"]
    root = kvasir(tmp_path / "kvasir", stems)
    (root / "images" / "._a.jpg").write_bytes(b"macOS resource fork, not an image")
    train, val = polyp_datalists(root, val_fraction=0.34, seed=0)
    items = train + val
    assert sorted(it["name"] for it in items) == sorted(stems)
    for it in items:
        assert it["image"].endswith(f"images/{it['name']}.jpg") and it["label"].endswith(f"masks/{it['name']}.png")
    assert len(val) == 2


def test_seeded_split_is_deterministic_disjoint_and_order_free(tmp_path):
    items = [{"image": f"{i}.jpg", "label": f"{i}.png", "name": f"img{i:03d}"} for i in range(50)]
    train, val = split_by_stem(items, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert not {t["name"] for t in train} & {v["name"] for v in val}
    shuffled = [items[i] for i in np.random.default_rng(0).permutation(50)]
    assert {v["name"] for v in split_by_stem(shuffled, 0.2, seed=3)[1]} == {v["name"] for v in val}
    assert split_by_stem(items, 0.2, seed=3) == (train, val)
    assert {v["name"] for v in split_by_stem(items, 0.2, seed=4)[1]} != {v["name"] for v in val}
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_stem(items, 1.0, seed=0)


def test_pranet_layout_trains_on_train_dataset_and_validates_on_named_test_sets(tmp_path):
    root = tmp_path / "pranet"
    for s in ("1", "2", "3"):
        write_pair(root / "TrainDataset" / "image", root / "TrainDataset" / "mask", s, image_ext=".png")
    for name, stems in {"Kvasir": ["k1", "k2"], "CVC-300": ["150", "151"]}.items():
        for s in stems:
            write_pair(root / "TestDataset" / name / "images", root / "TestDataset" / name / "masks", s)
    train, val = polyp_datalists(root)
    assert [t["name"] for t in train] == ["1", "2", "3"] and all("set" not in t for t in train)
    assert sorted((v["set"], v["name"]) for v in val) == [("CVC-300", "150"), ("CVC-300", "151"), ("Kvasir", "k1"), ("Kvasir", "k2")]
    _, only_kvasir = polyp_datalists(root, val_sets=["Kvasir"])
    assert {v["set"] for v in only_kvasir} == {"Kvasir"}
    with pytest.raises(FileNotFoundError, match=r"ETIS-LaribPolypDB.*available: \['CVC-300', 'Kvasir'\]"):
        polyp_datalists(root, val_sets=["ETIS-LaribPolypDB"])


def test_pranet_without_test_sets_falls_back_to_a_seeded_split(tmp_path):
    root = tmp_path / "pranet"
    for s in ("1", "2", "3", "4", "5"):
        write_pair(root / "TrainDataset" / "images", root / "TrainDataset" / "masks", s)
    train, val = polyp_datalists(root, val_fraction=0.2, seed=0)
    assert len(train) == 4 and len(val) == 1
    with pytest.raises(FileNotFoundError, match="available: none"):
        polyp_datalists(root, val_sets="Kvasir")


# --- errors that stop a run before training ---------------------------------------------------------


def test_missing_folder_and_unknown_layout_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        polyp_datalists(tmp_path / "nowhere")
    (tmp_path / "odd" / "pictures").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"odd.*'images/' and 'masks/'.*TrainDataset.*found sub-folders \['pictures'\]"):
        polyp_datalists(tmp_path / "odd")


def test_empty_images_folder_is_named(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "masks").mkdir()
    with pytest.raises(ValueError, match=r"ds[/\\]images: no image files"):
        polyp_datalists(tmp_path / "ds")


def test_images_without_masks_and_masks_without_images_are_listed(tmp_path):
    root = kvasir(tmp_path / "ds", ["ok"])
    for s in ["m1", "m2", "m3", "m4", "m5", "m6", "m7"]:
        Image.new("RGB", (20, 12)).save(root / "images" / f"{s}.jpg")
    Image.new("L", (20, 12)).save(root / "masks" / "orphan.png")
    with pytest.raises(ValueError) as err:
        polyp_datalists(root)
    msg = str(err.value)
    assert "7 image(s)" in msg and "'m1', 'm2', 'm3', 'm4', 'm5', ... and 2 more" in msg
    assert "1 mask(s)" in msg and "'orphan'" in msg


def test_size_mismatch_and_unreadable_image_name_the_file(tmp_path):
    root = tmp_path / "ds"
    write_pair(root / "images", root / "masks", "good")
    write_pair(root / "images", root / "masks", "wrong_size", size=(30, 20), mask_size=(20, 30))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG but truncated garbage")
    Image.new("L", (8, 8)).save(root / "masks" / "broken.png")
    with pytest.raises(ValueError) as err:
        polyp_datalists(root)
    msg = str(err.value)
    assert "wrong_size.jpg is 30x20 (WxH) but its mask" in msg and "20x30" in msg
    assert "1 file(s) PIL cannot open" in msg and "broken.png (image" in msg
    with pytest.raises(ValueError, match="empty"):
        check_pairs([])


# --- transforms -------------------------------------------------------------------------------------


def test_transforms_keep_row_major_orientation_of_a_non_square_image(tmp_path):
    h, w = 20, 40
    image = np.zeros((h, w, 3), np.uint8)
    image[0, w - 1] = (255, 200, 100)  # top-right pixel
    image[: h // 2, w // 2 :] = np.maximum(image[: h // 2, w // 2 :], 180)  # top-right quadrant
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, w // 2 :] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    item = {"image": str(tmp_path / "img.png"), "label": str(tmp_path / "mask.png"), "name": "img"}

    tf = polyp_transforms(32, train=False)
    from monai.transforms import Compose

    from medseg_peft.data import FitToSized

    loaded = Compose([t for t in tf.transforms if not isinstance(t, FitToSized)])(item)
    assert loaded["image"].shape == (3, h, w) and loaded["label"].shape == (1, h, w)
    assert loaded["image"][:, 0, w - 1].tolist() == [255.0, 200.0, 180.0]
    assert tuple(loaded["image"].meta["spatial_shape"]) == (h, w)

    out = tf(item)
    img, lab = out["image"], out["label"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and lab.shape == (1, 32, 32) and lab.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 255 and float(img.max()) > 100  # 0-255, not normalised
    assert set(lab.unique().tolist()) == {0.0, 1.0}
    assert float(lab[0, :16, 16:].mean()) == 1.0 and float(lab.sum()) == 16 * 16
    assert float(img[:, :16, 16:].mean()) > 150 > float(img[:, 16:, :16].mean())
    assert out["name"] == "img"


def test_grey_rgba_images_and_noisy_jpeg_or_0_1_masks(tmp_path):
    truth = np.zeros((16, 16), bool)
    truth[4:12, 2:9] = True
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([np.full((16, 16, 3), 70, np.uint8), np.full((16, 16), 5, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "mask.jpg", quality=60)
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "mask01.png")
    tf = polyp_transforms(16, train=False)
    for image, mask, value in (("grey.png", "mask.jpg", 90.0), ("rgba.png", "mask01.png", 70.0)):
        out = tf({"image": str(tmp_path / image), "label": str(tmp_path / mask)})
        assert out["image"].shape == (3, 16, 16) and torch.allclose(out["image"], torch.tensor(value))
        assert torch.equal(out["label"][0].bool(), torch.from_numpy(truth))


def test_training_augmentation_moves_image_and_label_together(tmp_path):
    image = np.full((24, 24, 3), 40, np.uint8)
    image[2:10, 3:20] = 220
    mask = np.zeros((24, 24), np.uint8)
    mask[2:10, 3:20] = 255
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    tf = polyp_transforms(24, train=True)
    tf.set_random_state(seed=0)
    for _ in range(8):
        out = tf({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "mask.png"), "name": "x"})
        img, lab = out["image"], out["label"][0].bool()
        assert img.shape == (3, 24, 24) and set(out["label"].unique().tolist()) == {0.0, 1.0} and float(lab.sum()) == 8 * 17
        assert 0 <= float(img.min()) and float(img.max()) <= 255
        assert float(img[:, lab].mean()) > float(img[:, ~lab].mean()) + 100
        assert out["name"] == "x"


# --- synthetic polyps -------------------------------------------------------------------------------


def test_polyp_image_pair_is_seeded_and_mostly_has_lesions():
    a = polyp_image_pair(np.random.default_rng(7), 64)
    b = polyp_image_pair(np.random.default_rng(7), 64)
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8 and a[1].shape == (64, 64) and set(np.unique(a[1])) <= {0, 1}
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != polyp_image_pair(np.random.default_rng(8), 64)[0].tobytes()
    masks = [polyp_image_pair(np.random.default_rng([1, i]), 48)[1] for i in range(30)]
    assert sum(m.any() for m in masks) >= 25


def test_make_synthetic_polyps_writes_once_in_kvasir_layout_and_reuses(tmp_path, monkeypatch):
    root = make_synthetic_polyps(tmp_path / "c1", n_images=6, size=40, seed=5)
    assert root.name.startswith("synthetic_polyps_n6_s40_seed5")
    assert json.loads((root / "done.json").read_text())["n_images"] == 6
    images, masks = sorted((root / "images").glob("*.png")), sorted((root / "masks").glob("*.png"))
    assert len(images) == len(masks) == 6
    assert all(set(np.unique(np.asarray(Image.open(m)))) <= {0, 255} for m in masks)
    again = make_synthetic_polyps(tmp_path / "c2", n_images=6, size=40, seed=5)
    assert all((root / d / p.name).read_bytes() == (again / d / p.name).read_bytes() for d in ("images", "masks") for p in images)
    assert not [p for p in (tmp_path / "c1").iterdir() if p.name.startswith(".")]  # no temp folder left behind

    def no_rewrite(*args, **kwargs):
        raise AssertionError("the cached set was regenerated")

    monkeypatch.setattr(synthetic_polyps, "polyp_image_pair", no_rewrite)
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "c1"))
    assert make_synthetic_polyps(n_images=6, size=40, seed=5) == root

    train, val = polyp_datalists(root, val_fraction=0.34, seed=0)
    assert len(train) == 4 and len(val) == 2
    out = polyp_transforms(32, train=False)(train[0])
    assert out["image"].shape == (3, 32, 32) and out["label"].shape == (1, 32, 32)


@pytest.mark.parametrize("prompt,augment", [("none", True), ("box", True), ("box", False)])
def test_the_bundles_transform_lists_are_the_library_pipeline(prompt, augment):
    """``polyp_fps.json`` lists its transforms step by step (overridable by key); they equal ``polyp_transforms``."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    from conftest import BUNDLES
    from medseg_peft.data import make_synthetic_polyps, polyp_datalists

    train, val = polyp_datalists(make_synthetic_polyps(n_images=8, size=64, seed=0), 0.25, 0)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "polyp_fps.json"))
    parser.update({"image_size": 64, "prompt": prompt, "augment": augment, "train#preprocessing#transforms#5#spatial_axis": 1})
    set_determinism(0)
    steps = parser.get_parsed_content("train#preprocessing")
    assert steps.transforms[5].flipper.spatial_axis == 1  # one step's setting, overridden by its key
    parser["train#preprocessing#transforms#5#spatial_axis"] = 0
    for bundle, library, items in ((parser.get_parsed_content("train#preprocessing", lazy=False), polyp_transforms(64, True, prompt=prompt, augment=augment), train),
                                   (parser.get_parsed_content("validate#preprocessing"), polyp_transforms(64, False, prompt=prompt), val)):
        bundle.set_random_state(3), library.set_random_state(3)
        for item in items:
            ours, theirs = bundle(dict(item)), library(dict(item))
            for key in ("image", "label", "box"):
                assert (key in ours) == (key in theirs)
                if key in theirs:
                    assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), (key, item["name"])
