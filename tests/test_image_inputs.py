"""2D inputs that would load, train and score wrongly without a word: high-bit-depth images, masks that
are all foreground, images far from the model's input size, and files cut short."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg_peft.data import polyp_datalists, polyp_transforms
from medseg_peft.data.polyp_folders import MIN_IMAGE_SIDE, check_contents
from medseg_peft.workflows.polyp import polyp_data


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def box_mask(size=(64, 64), value: int = 255) -> np.ndarray:
    m = np.zeros(size, np.uint8)
    m[size[0] // 4 : size[0] * 5 // 8, size[1] // 4 : size[1] * 3 // 4] = value
    return m


def folder(root: Path, n: int = 10, size=(64, 64), image_ext: str = ".png", mask_ext: str = ".png") -> Path:
    """``n`` random RGB images with a box mask each, in the Kvasir layout."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"c{i}{image_ext}")
        Image.fromarray(box_mask(size)).save(root / "masks" / f"c{i}{mask_ext}")
    return root


def grey_copies(source: Path, root: Path, n: int = 12) -> tuple[Path, Path]:
    """The first ``n`` pairs of ``source`` twice: grey 8-bit images stretched to 0..255, and 16-bit
    images holding the same values * 257 (the same relative range); the masks are the same files."""
    eight, sixteen = root / "bits8", root / "bits16"
    for out in (eight, sixteen):
        (out / "images").mkdir(parents=True), (out / "masks").mkdir()
    for path in sorted((source / "images").glob("*.png"))[:n]:
        grey = np.asarray(Image.open(path).convert("L"), np.float64)
        grey = np.round((grey - grey.min()) * 255 / (grey.max() - grey.min())).astype(np.uint8)
        Image.fromarray(grey).save(eight / "images" / path.name)
        Image.fromarray(grey.astype(np.uint16) * 257).save(sixteen / "images" / path.name)
        for out in (eight, sixteen):
            (out / "masks" / path.name).write_bytes((source / "masks" / path.name).read_bytes())
    return eight, sixteen


# --- high-bit-depth images are scaled, not clipped to white ------------------------------------------


def test_a_16_bit_image_loads_as_its_8_bit_copy(tmp_path):
    from medseg_peft.data import make_synthetic_polyps

    eight, sixteen = grey_copies(make_synthetic_polyps(tmp_path / "src", n_images=4, size=64, seed=1), tmp_path, n=4)
    assert Image.open(next((sixteen / "images").iterdir())).mode == "I;16"
    tf = polyp_transforms(48, train=False)  # with a resize, as a run does
    for path in sorted((eight / "images").iterdir()):
        a, b = (tf({"image": str(d / "images" / path.name), "label": str(d / "masks" / path.name)})["image"] for d in (eight, sixteen))
        assert a.shape == b.shape == (3, 48, 48)
        assert float(a.max()) > 200  # a real image, not a blank one
        assert float((a - b).abs().max()) < 1e-3, path.name


@pytest.mark.parametrize("mode", ["F", "I"])
def test_float_and_32_bit_images_are_scaled_min_to_max(tmp_path, mode):
    yy, xx = np.mgrid[:40, :56]
    values = (xx * 30.0 - yy * 7.5 - 1000.0).astype(np.float32 if mode == "F" else np.int32)  # a CT-like range, negative too
    Image.fromarray(values).save(tmp_path / "scan.tif")
    Image.fromarray(box_mask((40, 56))).save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "scan.tif").mode == mode
    tf = polyp_transforms(32, train=False)
    from monai.transforms import Compose

    from medseg_peft.data import FitToSized

    item = {"image": str(tmp_path / "scan.tif"), "label": str(tmp_path / "mask.png")}
    image = Compose([t for t in tf.transforms if not isinstance(t, FitToSized)])(item)["image"]
    expected = (values - values.min()) / (values.max() - values.min()) * 255.0
    assert image.shape == (3, 40, 56)
    for channel in image:
        np.testing.assert_allclose(channel.numpy(), expected, atol=1e-3)
    assert tf(item)["image"].shape == (3, 32, 32)


def test_a_constant_high_depth_image_is_zero_and_nan_pixels_are_refused(tmp_path):
    Image.fromarray(np.full((20, 20), 700, np.uint16)).save(tmp_path / "flat.png")
    Image.fromarray(box_mask((20, 20))).save(tmp_path / "mask.png")
    item = {"image": str(tmp_path / "flat.png"), "label": str(tmp_path / "mask.png")}
    assert float(polyp_transforms(20, train=False)(item)["image"].abs().max()) == 0.0
    values = np.ones((20, 20), np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError) as err:
        check_contents([{"image": str(tmp_path / "nan.tif"), "label": str(tmp_path / "mask.png")}])
    assert str(tmp_path / "nan.tif") in str(err.value) and "NaN" in str(err.value)


# --- masks that are all foreground measure nothing ---------------------------------------------------


def test_a_set_whose_masks_are_all_foreground_is_refused_one_full_mask_is_not(tmp_path):
    data = folder(tmp_path / "full")
    for mask in (data / "masks").iterdir():
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    with pytest.raises(ValueError) as err:
        polyp_data(str(data))
    assert "masks of the training set is entirely foreground" in str(err.value)
    train, val = polyp_datalists(data)
    with pytest.raises(ValueError, match="masks of the validation set is entirely foreground"):
        check_contents(val, "validation set")

    mixed = folder(tmp_path / "mixed")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mixed / "masks" / "c3.png")
    assert len(polyp_data(str(mixed))["train"]) == 8


# --- images far from the model's input size ----------------------------------------------------------


def test_a_1x1_image_is_refused_naming_it(tmp_path):
    data = folder(tmp_path / "data", n=4)
    Image.new("RGB", (1, 1), (90, 40, 40)).save(data / "images" / "dot.png")
    Image.new("L", (1, 1), 255).save(data / "masks" / "dot.png")
    Image.new("RGB", (MIN_IMAGE_SIDE, 300)).save(data / "images" / "narrow.png")  # the minimum itself is fine
    Image.fromarray(box_mask((300, MIN_IMAGE_SIDE))).save(data / "masks" / "narrow.png")
    with pytest.raises(ValueError) as err:
        polyp_datalists(data)
    message = str(err.value)
    assert f"1 image(s) smaller than {MIN_IMAGE_SIDE} px" in message and str(data / "images" / "dot.png") in message
    assert "narrow.png" not in message


def _size_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "resized to the model's input size" in r.getMessage()]


def test_the_data_check_names_the_largest_image_once(tmp_path, caplog):
    data = folder(tmp_path / "data", n=6)
    Image.fromarray(np.full((72, 90, 3), 120, np.uint8)).save(data / "images" / "c2.png")
    Image.fromarray(box_mask((72, 90))).save(data / "masks" / "c2.png")
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        polyp_data(str(data))
    lines = _size_lines(caplog)
    assert len(lines) == 1 and str(data / "images" / "c2.png") in lines[0] and "90x72" in lines[0]


def test_a_huge_image_is_a_warning_naming_it(tmp_path, caplog):
    data = folder(tmp_path / "data", n=4)
    Image.new("L", (2100, 2100), 100).save(data / "images" / "huge.png")
    Image.fromarray(box_mask((2100, 2100))).save(data / "masks" / "huge.png")
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        polyp_data(str(data))
    records = [r for r in caplog.records if "resized to the model's input size" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert str(data / "images" / "huge.png") in records[0].getMessage() and "2100x2100" in records[0].getMessage()
    assert "1 image(s) have more than" in records[0].getMessage()


# --- files cut short ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.4, 0.95])
@pytest.mark.parametrize("role", ["images", "masks"])
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_a_truncated_file_is_named(tmp_path, ext, role, fraction):
    data = folder(tmp_path / "data", n=6, image_ext=ext, mask_ext=ext)
    victim = data / role / f"c3{ext}"
    raw = victim.read_bytes()
    victim.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(ValueError) as err:
        polyp_data(str(data))
    assert str(victim) in str(err.value)


def test_a_16_bit_image_in_a_classification_list_is_scaled_not_white(tmp_path):
    from torchvision import transforms as T

    from medseg_peft.workflows.classify import ImageList

    values = np.tile(np.arange(0, 64, dtype=np.uint16) * 500, (16, 1))  # 0 .. 31,500 of 65,535
    Image.fromarray(values).save(tmp_path / "xray.png")
    image = ImageList([{"image": str(tmp_path / "xray.png"), "label": 0}], T.PILToTensor())[0]["image"]
    assert image.shape == (3, 16, 64) and int(image.min()) == 0 and int(image.max()) == 255
    assert int(image[0, 0, 32]) == round(32 * 255 / 63)  # stretched by the image's own range
