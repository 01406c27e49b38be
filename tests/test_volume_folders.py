"""3D data set layouts (MSD dataset.json, plain images/ + labels/) and the synthetic CT organ set.

Layout tests use tiny 6x5x4 NIfTI volumes, or empty placeholder files where only names matter
(the layout code never reads voxels); the synthetic set is generated once per module, small.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_peft.data import synthetic_organs
from medseg_peft.data.cache import DONE_MARKER
from medseg_peft.data.synthetic_organs import ORGAN_CLASSES, make_synthetic_organs, synthetic_organs_name
from medseg_peft.data.volume_folders import class_names, volume_datalists
from medseg_peft.data.volume_io import VolumeDataError

SHAPE = (6, 5, 4)


def nifti(path: Path, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, dtype), np.diag([0.8, 0.8, 3.0, 1.0])), path)
    return path


def write_msd(root: Path, n: int = 5, junk: bool = True) -> dict:
    """An MSD task folder with ``n`` training pairs, one test image and (optionally) macOS ``._`` junk."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        nifti(root / "imagesTr" / f"case_{i}.nii.gz")
        nifti(root / "labelsTr" / f"case_{i}.nii.gz", np.uint8)
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    nifti(root / "imagesTs" / "case_9.nii.gz")
    if junk:  # what the official archives carry next to every volume; not NIfTI at all
        (root / "imagesTr" / "._case_0.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X")
        (root / "imagesTr" / "._junk.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    spec = {"name": "Task99", "description": "test", "tensorImageSize": "3D", "modality": {"0": "T2", "1": "ADC"},
            "labels": {"0": "background", "2": "tumour", "1": "organ"}, "numTraining": n, "numTest": 1,
            "training": training, "test": ["./imagesTs/case_9.nii.gz"]}
    write_spec(root, spec)
    return spec


def write_spec(root: Path, spec: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(spec))


def names(items: list[dict], key: str = "image") -> set[str]:
    return {Path(it[key]).name for it in items}


# ---------------------------------------------------------------------------------------------- MSD


def test_msd_pairs_classes_test_list_and_modality(tmp_path):
    write_msd(tmp_path)
    data = volume_datalists(tmp_path, val_fraction=0.2, seed=0)
    assert data["layout"] == "msd" and data["source"] == str(tmp_path)
    assert data["classes"] == {1: "organ", 2: "tumour"} and list(data["classes"]) == [1, 2]
    assert data["modality"] == {"0": "T2", "1": "ADC"}
    assert data["test"] == [{"image": str(tmp_path / "imagesTs" / "case_9.nii.gz")}]
    items = data["train"] + data["val"]
    assert names(items) == {f"case_{i}.nii.gz" for i in range(5)}  # the ._ files are not volumes
    for item in items:
        assert set(item) == {"image", "label"}
        assert Path(item["image"]).parent.name == "imagesTr" and Path(item["label"]).parent.name == "labelsTr"
        assert Path(item["image"]).name == Path(item["label"]).name and Path(item["image"]).is_file()


def test_msd_split_is_seeded_disjoint_complete_and_order_free(tmp_path):
    spec = write_msd(tmp_path, n=6)
    data = volume_datalists(tmp_path, val_fraction=0.34, seed=1)
    train, val = names(data["train"]), names(data["val"])
    assert len(val) == 2 and not train & val and len(train | val) == 6
    assert volume_datalists(tmp_path, val_fraction=0.34, seed=1) == data
    write_spec(tmp_path, dict(spec, training=spec["training"][::-1]))  # listing order must not matter
    again = volume_datalists(tmp_path, val_fraction=0.34, seed=1)
    assert names(again["val"]) == val and names(again["train"]) == train
    splits = {frozenset(names(volume_datalists(tmp_path, val_fraction=0.34, seed=s)["val"])) for s in range(8)}
    assert len(splits) > 1  # the seed does choose the split


def test_at_least_one_validation_volume_and_two_volumes_needed(tmp_path):
    write_msd(tmp_path / "two", n=2)
    data = volume_datalists(tmp_path / "two", val_fraction=0.01)
    assert len(data["val"]) == 1 and len(data["train"]) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        volume_datalists(tmp_path / "two", val_fraction=0.0)
    write_msd(tmp_path / "one", n=1)
    with pytest.raises(VolumeDataError, match="1 labelled volume.*at least 2"):
        volume_datalists(tmp_path / "one")


def test_explicit_classes_override_dataset_json(tmp_path):
    write_msd(tmp_path)
    assert volume_datalists(tmp_path, classes=["liver", "spleen", "kidneys"])["classes"] == {1: "liver", 2: "spleen", 3: "kidneys"}
    assert volume_datalists(tmp_path, classes={3: "c", 1: "a"})["classes"] == {1: "a", 3: "c"}
    assert list(volume_datalists(tmp_path, classes={"2": "b", "1": " a "})["classes"].items()) == [(1, "a"), (2, "b")]
    with pytest.raises(ValueError, match="background"):
        volume_datalists(tmp_path, classes={0: "background", 1: "a"})


@pytest.mark.parametrize("bad, pattern", [
    ("liver", "string"),
    ([], "empty"),
    ({0: "background"}, "start at 1"),
    ({-2: "x"}, "start at 1"),
    ({1: ""}, "non-empty name"),
    ({1: 7}, "non-empty name"),
    ({"one": "liver"}, "not an integer"),
    ({1.5: "liver"}, "not an integer"),
    ({True: "liver"}, "not an integer"),
    (["liver", "liver"], "distinct"),
    ({1: "a", "1": "b"}, "given twice"),
])
def test_invalid_classes_are_rejected(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        class_names(bad)


def test_class_names_normalises_and_sorts():
    assert class_names(("a", "b")) == {1: "a", 2: "b"}
    assert list(class_names({np.int64(3): "c", "1": "a"})) == [1, 3]


@pytest.mark.parametrize("breakage, pattern", [
    (lambda s: s.pop("training"), r"dataset\.json has no 'training' key \(expected a list"),
    (lambda s: s.pop("labels"), r"dataset\.json has no 'labels' key \(expected a dict"),
    (lambda s: s.update(labels=["background", "organ"]), r"dataset\.json: 'labels' must be a dict, got list"),
    (lambda s: s["training"][1].pop("label"), r"dataset\.json: training\[1\] must have 'image' and 'label'"),
    (lambda s: s["training"].append("./imagesTr/case_0.nii.gz"), r"training\[5\] must have 'image' and 'label'"),
    (lambda s: s["labels"].update(x="other"), r"dataset\.json: 'labels' must map label values.*'x' is not an integer"),
    (lambda s: s.update(test=["./imagesTs/gone.nii.gz"]), r"dataset\.json lists 1 test images that do not exist: \['.*gone\.nii\.gz'\]"),
])
def test_msd_errors_name_the_file_and_the_key(tmp_path, breakage, pattern):
    spec = write_msd(tmp_path, junk=False)
    breakage(spec)
    write_spec(tmp_path, spec)
    with pytest.raises((VolumeDataError, FileNotFoundError), match=pattern) as err:
        volume_datalists(tmp_path)
    assert str(tmp_path / "dataset.json") in str(err.value)


def test_msd_missing_files_are_counted_and_the_first_few_listed(tmp_path):
    spec = write_msd(tmp_path, junk=False)
    spec["training"] += [{"image": f"./imagesTr/gone_{i}.nii.gz", "label": f"./labelsTr/gone_{i}.nii.gz"} for i in range(4)]
    write_spec(tmp_path, spec)
    with pytest.raises(FileNotFoundError, match=r"lists 8 training files that do not exist: \['.*gone_0\.nii\.gz', .*\] \.\.\. and 3 more") as err:
        volume_datalists(tmp_path)
    assert str(tmp_path / "dataset.json") in str(err.value)


def test_msd_invalid_json_names_file_and_position(tmp_path):
    write_msd(tmp_path, junk=False)
    (tmp_path / "dataset.json").write_text('{\n  "labels": {"0": "background"},\n  "training": [,]\n}')
    with pytest.raises(VolumeDataError, match=r"dataset\.json is not valid JSON: .* line 3, column \d+"):
        volume_datalists(tmp_path)


# ---------------------------------------------------------------------------------------------- plain folders


def plain(root: Path, images: list[str], labels: list[str]) -> Path:
    """``images/`` and ``labels/`` with empty placeholder files of the given names (only names matter here)."""
    for sub, files in (("images", images), ("labels", labels)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name in files:
            (root / sub / name).write_bytes(b"")
    return root


def test_plain_layout_pairs_by_stem_across_suffixes(tmp_path, caplog):
    plain(tmp_path, ["a.nii.gz", "b.nrrd", "c.nii", "e.mha", "._a.nii.gz", "notes.txt"],
          ["a.nii.gz", "b.seg.nrrd", "c.nii.gz", "e.nhdr", "orphan.nii.gz"])
    nifti(tmp_path / "images" / "a.nii.gz")  # a real one among the placeholders: nothing is read either way
    (tmp_path / "images" / "series_d").mkdir()
    (tmp_path / "images" / "series_d" / "IM0001.dcm").write_bytes(b"")  # a DICOM series given as a folder
    (tmp_path / "labels" / "series_d.nii.gz").write_bytes(b"")
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "imagesTs" / "new.mhd").write_bytes(b"")
    (tmp_path / "imagesTs" / ".DS_Store").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="medseg_peft"):
        data = volume_datalists(tmp_path, classes=["liver"], val_fraction=0.4, seed=2)
    assert data["layout"] == "folders" and data["classes"] == {1: "liver"} and data["modality"] == {}
    pairs = {Path(it["image"]).name: Path(it["label"]).name for it in data["train"] + data["val"]}
    assert pairs == {"a.nii.gz": "a.nii.gz", "b.nrrd": "b.seg.nrrd", "c.nii": "c.nii.gz", "e.mha": "e.nhdr",
                     "series_d": "series_d.nii.gz"}
    assert len(data["val"]) == 2
    assert data["test"] == [{"image": str(tmp_path / "imagesTs" / "new.mhd")}]
    assert "orphan" in caplog.text and "no image" in caplog.text


def test_plain_layout_test_folder_is_optional_and_may_be_empty(tmp_path):
    plain(tmp_path, ["a.nii.gz", "b.nii.gz"], ["a.nii.gz", "b.nii.gz"])
    assert volume_datalists(tmp_path, classes=["x"])["test"] == []
    (tmp_path / "test").mkdir()
    assert volume_datalists(tmp_path, classes=["x"])["test"] == []
    (tmp_path / "test" / "z.nii").write_bytes(b"")
    assert volume_datalists(tmp_path, classes=["x"])["test"] == [{"image": str(tmp_path / "test" / "z.nii")}]


def test_plain_images_without_labels_are_listed(tmp_path):
    stems = [f"img{i}" for i in range(8)]
    plain(tmp_path, [f"{s}.nii.gz" for s in stems], ["img0.nii.gz"])
    with pytest.raises(VolumeDataError, match=r"7 image\(s\) in .*images have no label .*: \['img1', 'img2', 'img3', 'img4', 'img5'\] \.\.\. and 2 more"):
        volume_datalists(tmp_path, classes=["liver"])


def test_plain_layout_needs_classes(tmp_path):
    plain(tmp_path, ["a.nii.gz", "b.nii.gz"], ["a.nii.gz", "b.nii.gz"])
    with pytest.raises(VolumeDataError, match=r"does not name its classes.*--classes"):
        volume_datalists(tmp_path)


def test_plain_layout_folder_errors(tmp_path):
    plain(tmp_path / "empty", ["readme.txt", "._x.nii.gz"], [])
    with pytest.raises(VolumeDataError, match=r"empty/images holds no volumes"):
        volume_datalists(tmp_path / "empty", classes=["a"])
    plain(tmp_path / "dup", ["a.nii.gz", "a.nrrd", "b.nii"], ["a.nii.gz", "b.nii"])
    with pytest.raises(VolumeDataError, match=r"two volumes share the stem 'a'"):
        volume_datalists(tmp_path / "dup", classes=["a"])
    (tmp_path / "half" / "images").mkdir(parents=True)
    with pytest.raises(VolumeDataError, match=r"has images/ but no labels/.*dataset\.json"):
        volume_datalists(tmp_path / "half", classes=["a"])
    (tmp_path / "other" / "scans").mkdir(parents=True)
    with pytest.raises(VolumeDataError, match=r"neither .*dataset\.json.*images/ and labels/.*found \['scans'\]"):
        volume_datalists(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        volume_datalists(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- synthetic organs


@pytest.fixture(scope="module")
def organs(tmp_path_factory) -> Path:
    return make_synthetic_organs(tmp_path_factory.mktemp("cache"), n_train=3, n_test=1, seed=0)


def load(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of the voxels in ``mask``."""
    return nib.affines.apply_affine(affine, np.argwhere(mask))


def test_synthetic_organs_dataset_json_is_msd(organs):
    assert organs.name == synthetic_organs_name(3, 1, 0) and (organs / DONE_MARKER).is_file()
    spec = json.loads((organs / "dataset.json").read_text())
    assert {"name", "description", "reference", "licence", "tensorImageSize", "modality", "labels",
            "numTraining", "numTest", "training", "test"} <= set(spec)
    assert spec["tensorImageSize"] == "3D" and spec["modality"] == {"0": "CT"}
    assert spec["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "kidneys"}
    assert spec["numTraining"] == 3 and spec["numTest"] == 1 and spec["test"] == ["./imagesTs/organs_003.nii.gz"]
    assert spec["training"][0] == {"image": "./imagesTr/organs_000.nii.gz", "label": "./labelsTr/organs_000.nii.gz"}
    assert not (organs / "labelsTr" / "organs_003.nii.gz").exists()
    data = volume_datalists(organs, val_fraction=0.34)
    assert data["classes"] == ORGAN_CLASSES and data["layout"] == "msd"
    assert len(data["train"]) == 2 and len(data["val"]) == 1 and len(data["test"]) == 1


def test_synthetic_organs_content(organs):
    values, flipped, mean_hu = set(), 0, {c: [] for c in ORGAN_CLASSES}
    for i in range(3):
        hu, affine = load(organs / "imagesTr" / f"organs_{i:03d}.nii.gz")
        lab, lab_affine = load(organs / "labelsTr" / f"organs_{i:03d}.nii.gz")
        assert hu.shape == lab.shape and np.array_equal(affine, lab_affine) and lab.dtype == np.uint8
        assert 88 <= hu.shape[0] <= 112 and 88 <= hu.shape[1] <= 112 and 24 <= hu.shape[2] <= 36
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        assert np.all((0.7 <= spacing[:2]) & (spacing[:2] <= 0.9)) and 2.5 <= spacing[2] <= 5.0
        flipped += int(affine[0, 0] < 0 and affine[1, 1] < 0)
        values |= set(np.unique(lab).tolist())
        assert ((lab > 0).sum(axis=(0, 1)) == 0).any()  # some axial slices hold no organ
        assert -1030 <= hu.min() < -950 and np.median(hu[:3, :3]) < -950  # air in the corners
        assert 300 < hu.max() < 700  # the spine: bright, but nowhere near metal
        for c in ORGAN_CLASSES:
            mean_hu[c].append(float(hu[lab == c].mean()))
        body = world(affine, hu > -500)[:, 1].mean()
        spine = world(affine, (hu > 300) & (lab == 0))[:, 1].mean()
        assert spine < body  # in world space the spine is posterior (-y), whichever way the array is stored
    assert values == {0, 1, 2, 3}
    assert flipped >= 1
    assert np.mean(mean_hu[1]) < np.mean(mean_hu[2]) < np.mean(mean_hu[3])
    assert 30 < np.mean(mean_hu[1]) < 90 and 110 < np.mean(mean_hu[3]) < 190


def test_synthetic_organs_are_seeded(organs, tmp_path):
    same = make_synthetic_organs(tmp_path, n_train=3, n_test=1, seed=0)
    assert same != organs
    for rel in ("imagesTr/organs_001.nii.gz", "labelsTr/organs_002.nii.gz", "imagesTs/organs_003.nii.gz"):
        (a, affine_a), (b, affine_b) = load(organs / rel), load(same / rel)
        assert np.array_equal(a, b) and np.array_equal(affine_a, affine_b)
    other = make_synthetic_organs(tmp_path, n_train=3, n_test=1, seed=1)
    assert other.name == synthetic_organs_name(3, 1, 1)
    a, b = load(organs / "imagesTr/organs_000.nii.gz")[0], load(other / "imagesTr/organs_000.nii.gz")[0]
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_synthetic_organs_cache_is_reused_without_rewriting(organs, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in (organs / "dataset.json", organs / "imagesTr" / "organs_000.nii.gz")}

    def no_build(*args, **kwargs):
        raise AssertionError("a finished set was generated again")

    monkeypatch.setattr(synthetic_organs, "_write_set", no_build)
    assert make_synthetic_organs(organs.parent, n_train=3, n_test=1, seed=0) == organs
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_interrupted_build_is_not_reused(tmp_path):
    name = synthetic_organs_name(2, 0, 5)
    half = tmp_path / name  # a folder where the set should be, but without the done marker
    (half / "imagesTr").mkdir(parents=True)
    (half / "imagesTr" / "organs_000.nii.gz").write_bytes(b"truncated")
    leftover = tmp_path / f".{name}.abc123.tmp"  # a temporary build a killed process left behind
    (leftover / "imagesTr").mkdir(parents=True)
    root = make_synthetic_organs(tmp_path, n_train=2, n_test=0, seed=5)
    assert root == half and (root / DONE_MARKER).is_file()
    assert json.loads((root / DONE_MARKER).read_text())["seed"] == 5
    hu, _ = load(root / "imagesTr" / "organs_000.nii.gz")  # rebuilt: a real volume, not the truncated bytes
    assert hu.ndim == 3 and hu.min() < -900
    assert len(volume_datalists(root)["train"] + volume_datalists(root)["val"]) == 2
    assert leftover.exists() and not (leftover / DONE_MARKER).exists()  # left alone (it may be another process's), never used


def test_synthetic_organs_parameters_are_validated(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        make_synthetic_organs(tmp_path, n_train=1)
    with pytest.raises(ValueError, match="n_test"):
        make_synthetic_organs(tmp_path, n_train=2, n_test=-1)
    assert not list(tmp_path.iterdir())
