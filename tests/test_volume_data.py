"""Volume layouts (MSD, plain), the synthetic CT set, SliceInferer over axial slices; geometry and pair checks are in test_volume_io."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import SliceInferer

from medseg_peft.data import (
    VolumeDataError,
    check_volume_pair,
    class_names,
    list_volumes,
    make_synthetic_organs,
    volume_datalists,
)

OBLIQUE = np.array([[0.7, -0.25, 0.05, -31.0], [0.24, 0.72, 0.0, 12.5], [-0.02, 0.0, 2.9, 40.0], [0.0, 0.0, 0.0, 1.0]])


def nifti(path, array, affine=OBLIQUE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def msd(root, n=4, junk=True):
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    training = []
    for i in range(n):
        nifti(root / "imagesTr" / f"c{i}.nii.gz", np.zeros((6, 5, 4), np.float32))
        nifti(root / "labelsTr" / f"c{i}.nii.gz", np.zeros((6, 5, 4), np.uint8))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    nifti(root / "imagesTs" / "t0.nii.gz", np.zeros((6, 5, 4), np.float32))
    if junk:
        (root / "imagesTr" / "._c0.nii.gz").write_bytes(b"\x00\x05macOS")
    spec = {"name": "T", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen", "2": "tumour"},
            "numTraining": n, "training": training, "test": ["./imagesTs/t0.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(spec))
    return spec


def test_msd_layout(tmp_path):
    msd(tmp_path)
    data = volume_datalists(tmp_path, val_fraction=0.25, seed=3)
    assert data["classes"] == {1: "spleen", 2: "tumour"} and data["layout"] == "msd"
    assert len(data["train"]) == 3 and len(data["val"]) == 1
    names = {d["image"] for d in data["train"] + data["val"]}
    assert len(names) == 4 and not any("._" in n for n in names)
    assert data == volume_datalists(tmp_path, val_fraction=0.25, seed=3)
    assert data["test"] == [{"image": str(tmp_path / "imagesTs" / "t0.nii.gz")}]
    assert volume_datalists(tmp_path, classes=["a", "b"])["classes"] == {1: "a", 2: "b"}
    assert list_volumes(tmp_path) == [tmp_path / "imagesTs" / "t0.nii.gz"]


@pytest.mark.parametrize("breakage, pattern", [
    (lambda s: s.pop("training"), r"dataset\.json has no 'training' key"),
    (lambda s: s.pop("labels"), r"dataset\.json has no 'labels' key"),
    (lambda s: s["training"][1].pop("label"), r"training\[1\] must have 'image' and 'label'"),
    (lambda s: s["training"].append({"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}), r"do not exist.*x\.nii\.gz"),
])
def test_msd_errors_name_file_and_key(tmp_path, breakage, pattern):
    spec = msd(tmp_path, junk=False)
    breakage(spec)
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises((VolumeDataError, FileNotFoundError), match=pattern):
        volume_datalists(tmp_path)


def test_plain_layout_and_its_errors(tmp_path):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    with pytest.raises(VolumeDataError, match="holds no volumes"):
        volume_datalists(tmp_path, classes=["liver"])
    for stem in ("a", "b", "c"):
        nifti(tmp_path / "images" / f"{stem}.nii.gz", np.zeros((4, 4, 3), np.float32))
    nifti(tmp_path / "labels" / "a.nii.gz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(VolumeDataError, match=r"have no label.*\['b', 'c'\]"):
        volume_datalists(tmp_path, classes=["liver"])
    for stem in ("b", "c"):
        nifti(tmp_path / "labels" / f"{stem}.nii.gz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(VolumeDataError, match=r"--classes"):
        volume_datalists(tmp_path)
    data = volume_datalists(tmp_path, classes={"1": "liver"})
    assert data["layout"] == "folders" and len(data["train"]) + len(data["val"]) == 3 and data["classes"] == {1: "liver"}
    with pytest.raises(VolumeDataError, match="neither"):
        volume_datalists(tmp_path / "images")
    for bad in ("liver", [], {0: "background"}, {1: ""}):
        with pytest.raises(ValueError):
            class_names(bad)


def test_synthetic_organs_are_seeded_labelled_and_cached(tmp_path):
    root = make_synthetic_organs(tmp_path, n_train=3, n_test=1, seed=0)
    data = volume_datalists(root, val_fraction=0.34)
    assert data["classes"] == {1: "liver", 2: "spleen", 3: "kidneys"} and len(data["test"]) == 1
    values, flipped, mean_hu, empty = set(), False, {1: [], 2: [], 3: []}, 0
    for item in data["train"] + data["val"]:
        geometry = check_volume_pair(item["image"], item["label"], classes=[0, 1, 2, 3])
        flipped |= geometry.affine[0, 0] < 0
        hu, lab = np.asanyarray(nib.load(item["image"]).dataobj), np.asanyarray(nib.load(item["label"]).dataobj)
        values |= set(np.unique(lab).tolist())
        empty += int(((lab > 0).sum((0, 1)) == 0).sum())
        for c in mean_hu:
            mean_hu[c].append(hu[lab == c].mean())
        assert hu.min() < -900  # air outside the body
    assert values == {0, 1, 2, 3} and flipped and empty > 0
    assert np.mean(mean_hu[1]) < np.mean(mean_hu[2]) < np.mean(mean_hu[3])
    again = make_synthetic_organs(tmp_path / "other", n_train=3, n_test=1, seed=0)
    first = data["train"][0]["image"]
    np.testing.assert_array_equal(nib.load(first).get_fdata(), nib.load(again / first.split(root.name + "/")[1]).get_fdata())
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert make_synthetic_organs(tmp_path, n_train=3, n_test=1, seed=0) == root and (root / "dataset.json").stat().st_mtime_ns == stamp
    other = make_synthetic_organs(tmp_path, n_train=3, n_test=1, seed=1)
    assert not np.array_equal(nib.load(other / "imagesTr" / "organs_000.nii.gz").get_fdata(), nib.load(root / "imagesTr" / "organs_000.nii.gz").get_fdata())


def test_slice_inferer_on_a_slice_count_not_a_multiple_of_the_batch():
    """Axial slices (last axis of a RAS volume) in batches of 4 over 7 slices: every slice seen once, in place."""
    seen = []

    def net(x):
        seen.append(x.shape[0])
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x) * 2  # per-slice value, so a misplaced slice shows

    volume = torch.arange(7, dtype=torch.float32).reshape(1, 1, 1, 1, 7).expand(1, 1, 10, 9, 7).contiguous()
    out = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=4, progress=False)(volume, net)
    assert out.shape == volume.shape and sum(seen) == 7 and max(seen) == 4
    torch.testing.assert_close(out, volume * 2)
