"""Volumes: geometry kept through read -> orient -> invert -> write, layouts, the synthetic CT set, and the errors users hit."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.inferers import SliceInferer
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImage, LoadImaged, Orientationd

from medseg_peft.data import (
    SimpleITKReader,
    VolumeDataError,
    check_volume_pair,
    class_names,
    list_volumes,
    make_synthetic_organs,
    read_geometry,
    volume_datalists,
    write_label_volume,
)
from medseg_peft.data.volume_io import itk_affine

OBLIQUE = np.array([[0.7, -0.25, 0.05, -31.0], [0.24, 0.72, 0.0, 12.5], [-0.02, 0.0, 2.9, 40.0], [0.0, 0.0, 0.0, 1.0]])


def nifti(path, array, affine=OBLIQUE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def lps_nrrd(path, array_xyz, field="kept"):
    """An NRRD in LPS with a non-trivial direction, written as Slicer writes them (SimpleITK)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array_xyz).transpose()))
    img.SetOrigin((-10.0, -20.0, 30.0))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    img.SetMetaData("my_field", field)
    sitk.WriteImage(img, str(path))
    return img


def orient_and_back(path):
    """What the 3D inference does to geometry: load, orient to RAS, predict there, invert, write."""
    pre = Compose([LoadImaged("image", reader=SimpleITKReader()), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")])
    data = pre({"image": str(path)})
    data["pred"] = (data["image"] > 0).float()  # a "prediction" computed in RAS space
    return Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]


def test_nifti_oblique_round_trip_keeps_the_header(tmp_path):
    array = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    src = nifti(tmp_path / "ct.nii.gz", array)
    out = write_label_volume(orient_and_back(src), src, tmp_path / "out")
    assert out.name == "ct_seg.nii.gz"
    ref, got = nib.load(src), nib.load(out)
    assert got.shape == (7, 6, 5) and got.get_data_dtype() == np.uint8
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    assert int(got.header["sform_code"]) == int(ref.header["sform_code"]) and int(got.header["qform_code"]) == int(ref.header["qform_code"])
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), (array > 0).astype(np.uint8))  # voxel for voxel


def test_lps_nrrd_reads_as_ras_and_writes_back_with_its_header(tmp_path):
    array = np.random.default_rng(1).normal(size=(7, 6, 5)).astype(np.float32)
    src = tmp_path / "ct.nrrd"
    img = lps_nrrd(src, array)
    data, meta = LoadImage(reader=SimpleITKReader(), image_only=False)(str(src))
    np.testing.assert_array_equal(np.asarray(data), sitk.GetArrayFromImage(img).transpose())  # (x, y, z), as MONAI's ITKReader
    np.testing.assert_allclose(np.asarray(meta["affine"])[:3, 3], [10.0, 20.0, 30.0])  # LPS origin -> RAS
    out = write_label_volume(orient_and_back(src), src, tmp_path / "out")
    back = sitk.ReadImage(str(out))
    assert out.suffix == ".nrrd" and back.GetPixelID() == sitk.sitkUInt8
    assert back.GetOrigin() == img.GetOrigin() and back.GetSpacing() == img.GetSpacing() and back.GetDirection() == img.GetDirection()
    assert back.GetMetaData("my_field") == "kept"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(), (array > 0).astype(np.uint8))


def test_simpleitk_reader_agrees_with_nibabel_on_the_same_physical_volume(tmp_path):
    array = np.random.default_rng(2).normal(size=(5, 4, 3)).astype(np.float32)
    img = lps_nrrd(tmp_path / "a.mha", array)
    nifti(tmp_path / "a.nii.gz", array, itk_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection()))
    load = LoadImage(reader=SimpleITKReader(), image_only=False)
    (x1, m1), (x2, m2) = load(str(tmp_path / "a.mha")), load(str(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
    np.testing.assert_allclose(np.asarray(m1["affine"]), np.asarray(m2["affine"]), atol=1e-6)
    assert read_geometry(tmp_path / "a.mha").shape == read_geometry(tmp_path / "a.nii.gz").shape == (5, 4, 3)


def test_dicom_series_folder_reads_and_writes_nifti(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    array = (np.arange(4 * 5 * 3).reshape(3, 5, 4) * 10).astype(np.int16)  # z, y, x
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(3):
        sl = sitk.GetImageFromArray(array[k : k + 1])
        sl.SetSpacing((0.8, 0.9, 2.5))  # the writer derives position, orientation and pixel spacing from the geometry
        sl.SetOrigin((-5.0, -6.0, 2.5 * k))
        for tag, value in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.1", "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
                           "0020|0013": str(k + 1), "0018|0050": "2.5"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{k}.dcm"))
        writer.Execute(sl)
    geometry = read_geometry(series)
    assert geometry.shape == (4, 5, 3)
    np.testing.assert_allclose(geometry.spacing, (0.8, 0.9, 2.5), atol=1e-4)
    assert list_volumes(tmp_path) == [series]
    out = write_label_volume(np.ones((4, 5, 3), np.uint8), series, tmp_path / "out")
    assert out.name == "series_seg.nii.gz"
    np.testing.assert_allclose(nib.load(out).affine, geometry.affine, atol=1e-5)


def test_pair_checks_name_the_files(tmp_path):
    good = nifti(tmp_path / "img.nii.gz", np.zeros((6, 5, 4), np.float32))
    assert check_volume_pair(good, nifti(tmp_path / "lab.nii.gz", np.ones((6, 5, 4), np.uint8)), classes=[0, 1]).shape == (6, 5, 4)
    cases = {
        "shape": (nifti(tmp_path / "s.nii.gz", np.zeros((6, 5, 3), np.uint8)), r"img\.nii\.gz.*s\.nii\.gz.*shape"),
        "affine": (nifti(tmp_path / "a.nii.gz", np.zeros((6, 5, 4), np.uint8), np.eye(4)), r"img\.nii\.gz.*a\.nii\.gz.*affine"),
        "value": (nifti(tmp_path / "v.nii.gz", np.full((6, 5, 4), 7, np.uint8)), r"v\.nii\.gz.*\[7\].*\[0, 1\]"),
        "float": (nifti(tmp_path / "f.nii.gz", np.full((6, 5, 4), 0.5, np.float32)), r"f\.nii\.gz.*non-integer"),
    }
    for name, (label, pattern) in cases.items():
        with pytest.raises(VolumeDataError, match=pattern):
            check_volume_pair(good, label, classes=[0, 1])
    four_d = nifti(tmp_path / "mr4.nii.gz", np.zeros((6, 5, 4, 4), np.float32))
    with pytest.raises(VolumeDataError, match=r"mr4\.nii\.gz has 4 channels.*`channel`.*0\.\.3"):
        check_volume_pair(four_d, tmp_path / "lab.nii.gz")
    assert check_volume_pair(four_d, tmp_path / "lab.nii.gz", channel=2).channels == 4
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume at all")
    with pytest.raises(VolumeDataError, match=r"broken\.nii\.gz"):
        read_geometry(tmp_path / "broken.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"gone\.nrrd"):
        read_geometry(tmp_path / "gone.nrrd")


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
