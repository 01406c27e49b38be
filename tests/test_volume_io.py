"""Volume IO: geometry survives read -> orient -> invert -> write in every format, the SimpleITK reader
keeps MONAI's conventions (pinned against nibabel), and bad pairs are refused with messages that name the files."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImage, LoadImaged, Orientationd

from medseg_peft.data.volume_io import (
    SimpleITKReader,
    VolumeDataError,
    VolumeGeometry,
    check_volume_pair,
    itk_affine,
    read_geometry,
    write_label_volume,
)

SHAPE = (7, 6, 5)  # (x, y, z)
LPS_ORIGIN = (-10.0, -20.0, 30.0)
LPS_SPACING = (0.7, 0.8, 2.5)
LPS_DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # x runs along P, y along R: not axis-aligned with RAS


def oblique_affine() -> np.ndarray:
    """A rotation about z by 30 degrees, anisotropic spacing and an offset origin."""
    t = math.radians(30)
    rotation = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-31.0, 12.5, 40.0]
    return affine


def volume(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def nifti(path, array, affine=None, qform_code=1, sform_code=2):
    affine = oblique_affine() if affine is None else affine
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def itk_volume(path, array_xyz, field="kept", **geometry):
    """A volume written by SimpleITK in LPS, from an (x, y, z[, c]) array; returns the in-memory image."""
    array = np.asarray(array_xyz)
    zyx = np.moveaxis(array, [0, 1, 2], [2, 1, 0])
    img = sitk.GetImageFromArray(np.ascontiguousarray(zyx), isVector=array.ndim == 4)
    img.SetOrigin(geometry.get("origin", LPS_ORIGIN))
    img.SetSpacing(geometry.get("spacing", LPS_SPACING))
    img.SetDirection(geometry.get("direction", LPS_DIRECTION))
    img.SetMetaData("my_field", field)
    sitk.WriteImage(img, str(path))
    return img


def orient_and_back(path, reader=None):
    """What 3D inference does to geometry: load, orient to RAS, 'predict' there, invert, back on the file's grid."""
    load = LoadImaged("image", reader=reader, image_only=False) if reader else LoadImaged("image", image_only=False)
    pre = Compose([load, EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")])
    data = pre({"image": str(path)})
    data["pred"] = (data["image"] > 0).float()
    return Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]


def lps_series(folder, array_zyx, series_uid="1.2.826.0.1.3680043.2.1125.7", origin=(-5.0, -6.0, 7.0)):
    """A DICOM CT series, one file per slice: GDCM writes position, orientation and spacing from the geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = sitk.GetImageFromArray(array_zyx)
    vol.SetSpacing((0.8, 0.9, 2.5))
    vol.SetOrigin(origin)
    c, s = math.cos(0.3), math.sin(0.3)
    vol.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array_zyx.shape[0]):
        sl = vol[:, :, k : k + 1]  # a 3D slab keeps the slice's 3D position
        for tag, value in {"0008|0060": "CT", "0020|000e": series_uid, "0020|000d": series_uid + ".0",
                           "0020|0013": str(k + 1)}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k}.dcm"))
        writer.Execute(sl)
    return vol


# ------------------------------------------------------------------------------------------ round trips


def test_nifti_oblique_round_trip_keeps_the_header(tmp_path):
    array = volume()
    src = nifti(tmp_path / "ct.nii.gz", array)
    data, meta = LoadImage(image_only=False)(str(src))
    np.testing.assert_allclose(np.asarray(meta["affine"]), oblique_affine(), atol=1e-5)
    out = write_label_volume(orient_and_back(src), src, tmp_path / "out")
    assert out == tmp_path / "out" / "ct_seg.nii.gz"
    ref, got = nib.load(src), nib.load(out)
    assert got.shape == SHAPE and got.get_data_dtype() == np.uint8
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    for key in ("sform_code", "qform_code", "pixdim", "xyzt_units", "srow_x", "quatern_b", "qoffset_x"):
        np.testing.assert_array_equal(got.header[key], ref.header[key], err_msg=key)
    labels = np.asanyarray(got.dataobj)
    np.testing.assert_array_equal(labels, (array > 0).astype(np.uint8))  # voxel for voxel
    for voxel in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        assert labels[voxel] == int(array[voxel] > 0)


def test_lps_nrrd_reads_as_ras_and_writes_back_with_its_header(tmp_path):
    array = volume(seed=1)
    src = tmp_path / "ct.nrrd"
    img = itk_volume(src, array)
    data, meta = LoadImage(reader=SimpleITKReader(), image_only=False)(str(src))
    np.testing.assert_array_equal(np.asarray(data), sitk.GetArrayFromImage(img).transpose())  # (x, y, z)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block([
        [np.reshape(LPS_DIRECTION, (3, 3)) @ np.diag(LPS_SPACING), np.reshape(LPS_ORIGIN, (3, 1))], [np.zeros((1, 3)), 1.0]])
    np.testing.assert_allclose(np.asarray(meta["affine"]), expected, atol=1e-12)
    np.testing.assert_allclose(np.asarray(meta["affine"])[:3, 3], [10.0, 20.0, 30.0])
    assert meta["space"] == "RAS" and meta["filename_or_obj"] == str(src) and meta["my_field"] == "kept"
    assert tuple(meta["spatial_shape"]) == SHAPE and math.isnan(meta["original_channel_dim"])
    np.testing.assert_allclose(np.asarray(meta["original_affine"]), expected, atol=1e-12)

    back = orient_and_back(src, SimpleITKReader())
    assert tuple(back.shape) == (1, *SHAPE)
    np.testing.assert_array_equal(back[0].numpy(), (array > 0).astype(np.float32))  # the inverse undid the reorientation

    out = write_label_volume(back, src, tmp_path / "out")
    written = sitk.ReadImage(str(out))
    assert out.name == "ct_seg.nrrd" and written.GetPixelID() == sitk.sitkUInt8
    assert written.GetOrigin() == img.GetOrigin() and written.GetSpacing() == img.GetSpacing()
    assert written.GetDirection() == img.GetDirection()
    assert written.GetMetaData("my_field") == "kept"
    labels = sitk.GetArrayFromImage(written).transpose()
    np.testing.assert_array_equal(labels, (array > 0).astype(np.uint8))
    for voxel in [(0, 0, 0), (6, 5, 4), (2, 4, 1)]:
        assert labels[voxel] == int(array[voxel] > 0)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_simpleitk_reader_agrees_with_nibabel_on_the_same_physical_volume(tmp_path, suffix):
    array = volume(seed=2)
    img = itk_volume(tmp_path / f"a{suffix}", array)
    nifti(tmp_path / "a.nii.gz", array, itk_affine(img.GetOrigin(), img.GetSpacing(), img.GetDirection()))
    x1, m1 = LoadImage(reader=SimpleITKReader(), image_only=False)(str(tmp_path / f"a{suffix}"))
    x2, m2 = LoadImage(image_only=False)(str(tmp_path / "a.nii.gz"))  # MONAI's default: nibabel
    assert "sform_code" in m2 and "sform_code" not in m1
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
    np.testing.assert_allclose(np.asarray(m1["affine"]), np.asarray(m2["affine"]), atol=1e-6)
    assert math.isnan(m1["original_channel_dim"]) and math.isnan(m2["original_channel_dim"])  # MONAI's "no channel"


def test_nifti_given_to_the_simpleitk_reader_still_goes_to_nibabel(tmp_path):
    src = nifti(tmp_path / "ct.nii.gz", volume())
    reader = SimpleITKReader()
    assert not reader.verify_suffix(str(src)) and not reader.verify_suffix(tmp_path / "ct.NII")
    assert reader.verify_suffix(tmp_path / "ct.NRRD") and reader.verify_suffix([tmp_path / "a.mhd", tmp_path / "b.nhdr"])
    with pytest.raises(VolumeDataError, match="NibabelReader"):
        reader.read(str(src))
    _, meta = LoadImage(reader=reader, image_only=False)(str(src))
    assert "sform_code" in meta  # nibabel's header, not ITK's NIfTI reading
    np.testing.assert_allclose(np.asarray(meta["affine"]), oblique_affine(), atol=1e-5)


def test_mha_and_mhd_round_trips(tmp_path):
    array = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 4).astype(np.int16)
    for name in ("mr.mha", "mr2.mhd"):
        img = itk_volume(tmp_path / name, array, field=name)
        labels = LoadImage(reader=SimpleITKReader())(str(tmp_path / name))
        np.testing.assert_array_equal(labels.numpy(), array)
        out = write_label_volume(labels.to(torch.int64), tmp_path / name, tmp_path / "out", postfix="pred")
        written = sitk.ReadImage(str(out))
        assert out.name == name.split(".")[0] + "_pred.mha"
        assert (written.GetOrigin(), written.GetSpacing(), written.GetDirection()) == (img.GetOrigin(), img.GetSpacing(), img.GetDirection())
        assert written.GetMetaData("my_field") == name and written.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written).transpose(), array)


def test_vector_nrrd_keeps_components_last(tmp_path):
    array = volume((*SHAPE, 3), seed=4)
    img = itk_volume(tmp_path / "rgb.nrrd", array)
    data, meta = LoadImage(reader=SimpleITKReader(), image_only=False)(str(tmp_path / "rgb.nrrd"))
    assert tuple(data.shape) == (*SHAPE, 3) and meta["original_channel_dim"] == -1 and tuple(meta["spatial_shape"]) == SHAPE
    np.testing.assert_array_equal(np.asarray(data), np.moveaxis(sitk.GetArrayFromImage(img), [0, 1, 2], [2, 1, 0]))
    first = LoadImage(reader=SimpleITKReader(), ensure_channel_first=True)(str(tmp_path / "rgb.nrrd"))
    np.testing.assert_array_equal(first[1].numpy(), array[..., 1])
    assert read_geometry(tmp_path / "rgb.nrrd").channels == 3


def test_dicom_series_reads_and_writes_nifti(tmp_path):
    zyx = (np.arange(3 * 5 * 4).reshape(3, 5, 4) * 7 - 20).astype(np.int16)
    vol = lps_series(tmp_path / "series", zyx)
    reader = SimpleITKReader()
    assert reader.verify_suffix(tmp_path / "series") and not reader.verify_suffix(tmp_path)
    data, meta = LoadImage(reader=reader, image_only=False, dtype=None)(str(tmp_path / "series"))
    np.testing.assert_array_equal(np.asarray(data), zyx.transpose())
    expected = itk_affine(vol.GetOrigin(), vol.GetSpacing(), vol.GetDirection())
    np.testing.assert_allclose(np.asarray(meta["affine"]), expected, atol=1e-4)  # DICOM keeps 16-character decimals
    geometry = read_geometry(tmp_path / "series")
    assert geometry.shape == (4, 5, 3) and geometry.channels == 1
    np.testing.assert_allclose(geometry.spacing, (0.8, 0.9, 2.5), atol=1e-4)
    out = write_label_volume((np.asarray(data) > 0).astype(np.uint8)[None], tmp_path / "series", tmp_path / "out")
    assert out.name == "series_seg.nii.gz"
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, geometry.affine, atol=1e-6)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), (zyx.transpose() > 0).astype(np.uint8))


def test_folder_with_two_dicom_series_is_refused_by_name(tmp_path):
    zyx = np.zeros((2, 4, 3), np.int16)
    lps_series(tmp_path / "mixed", zyx, series_uid="1.2.3.111")
    lps_series(tmp_path / "mixed", zyx, series_uid="1.2.3.222", origin=(0.0, 0.0, 50.0))
    with pytest.raises(VolumeDataError, match=r"mixed holds 2 DICOM series") as caught:
        read_geometry(tmp_path / "mixed")
    assert "1.2.3.111" in str(caught.value) and "1.2.3.222" in str(caught.value)
    with pytest.raises(VolumeDataError, match="2 DICOM series"):
        SimpleITKReader().read(str(tmp_path / "mixed"))


# --------------------------------------------------------------------------------------------- geometry


def test_read_geometry_matches_the_full_load(tmp_path):
    nifti(tmp_path / "ct.nii.gz", volume())
    nifti(tmp_path / "mr4.nii.gz", volume((*SHAPE, 4)))
    itk_volume(tmp_path / "ct.nrrd", volume())
    for name, reader, channels in [("ct.nii.gz", None, 1), ("mr4.nii.gz", None, 4), ("ct.nrrd", SimpleITKReader(), 1)]:
        geometry = read_geometry(tmp_path / name)
        data, meta = LoadImage(reader=reader, image_only=False)(str(tmp_path / name))
        assert geometry.shape == tuple(data.shape[:3]) == tuple(int(s) for s in meta["spatial_shape"]) == SHAPE
        assert geometry.channels == channels and geometry.path == str(tmp_path / name)
        np.testing.assert_allclose(geometry.affine, np.asarray(meta["affine"]), atol=1e-6)
    assert read_geometry(tmp_path / "ct.nrrd").spacing == pytest.approx(LPS_SPACING)
    assert read_geometry(tmp_path / "ct.nii.gz").spacing == pytest.approx((0.7, 0.9, 2.5))
    assert read_geometry(tmp_path / "ct.nrrd") == read_geometry(tmp_path / "ct.nrrd")
    assert len({read_geometry(tmp_path / "ct.nrrd")}) == 1  # hashable despite the array


def test_read_geometry_refuses_what_is_not_a_volume(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 3), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(VolumeDataError, match=r"flat\.nii\.gz has 2 axes"):
        read_geometry(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image(4, 3, sitk.sitkUInt8), str(tmp_path / "flat.mha"))
    with pytest.raises(VolumeDataError, match=r"flat\.mha is a 2D image"):
        read_geometry(tmp_path / "flat.mha")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(VolumeDataError, match=r"scan\.png.*\.nii\.gz.*\.nrrd.*\.mha.*DICOM"):
        read_geometry(tmp_path / "scan.png")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\nnonsense\n")
    with pytest.raises(VolumeDataError, match=r"bad\.nrrd could not be read by SimpleITK"):
        read_geometry(tmp_path / "bad.nrrd")
    geometry = read_geometry(nifti(tmp_path / "ct.nii.gz", volume()))
    with pytest.raises(ValueError):
        geometry.affine[0, 0] = 5.0
    assert isinstance(geometry, VolumeGeometry)


# ------------------------------------------------------------------------------------------ pair checks


@pytest.fixture
def image(tmp_path):
    return nifti(tmp_path / "img.nii.gz", np.zeros(SHAPE, np.float32))


def test_a_good_pair_returns_the_image_geometry(tmp_path, image):
    label = nifti(tmp_path / "lab.nii.gz", np.ones(SHAPE, np.uint8))
    geometry = check_volume_pair(image, label, classes=[0, 1])
    assert geometry.path == str(image) and geometry.shape == SHAPE and geometry.channels == 1
    np.testing.assert_allclose(geometry.affine, oblique_affine(), atol=1e-5)
    near = oblique_affine()
    near[0, 3] += 5e-4  # a rounding difference between writers is not a misalignment
    assert check_volume_pair(image, nifti(tmp_path / "near.nii.gz", np.ones(SHAPE, np.uint8), near)) == geometry


@pytest.mark.parametrize("name, array, affine, pattern", [
    ("shape", np.zeros((7, 6, 4), np.uint8), None, r"img\.nii\.gz.*shape\.nii\.gz.*\(7, 6, 5\) vs \(7, 6, 4\)"),
    ("moved", np.zeros(SHAPE, np.uint8), np.eye(4), r"img\.nii\.gz.*moved\.nii\.gz.*affine"),
    ("value", np.full(SHAPE, 7, np.uint8), None, r"value\.nii\.gz.*\[7\].*\[0, 1\]"),
    ("half", np.full(SHAPE, 0.5, np.float32), None, r"half\.nii\.gz.*non-integer.*0\.5"),
    ("multi", np.zeros((*SHAPE, 2), np.uint8), None, r"multi\.nii\.gz has 2 channels"),
])
def test_bad_labels_are_refused_by_name(tmp_path, image, name, array, affine, pattern):
    label = nifti(tmp_path / f"{name}.nii.gz", array, affine)
    with pytest.raises(VolumeDataError, match=pattern):
        check_volume_pair(image, label, classes=[0, 1])


def test_a_4d_image_needs_a_channel(tmp_path):
    four_d = nifti(tmp_path / "mr4.nii.gz", np.zeros((*SHAPE, 4), np.float32))
    label = nifti(tmp_path / "lab.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(VolumeDataError, match=r"mr4\.nii\.gz has 4 channels.*pipeline.*`channel`.*0\.\.3.*--channel 0"):
        check_volume_pair(four_d, label)
    with pytest.raises(VolumeDataError, match=r"channel 4 is out of range.*mr4\.nii\.gz"):
        check_volume_pair(four_d, label, channel=4)
    assert check_volume_pair(four_d, label, classes=[0], channel=3).channels == 4


def test_unreadable_and_missing_files_are_named(tmp_path, image):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume at all")
    with pytest.raises(VolumeDataError, match=r"broken\.nii\.gz could not be read as NIfTI"):
        check_volume_pair(image, tmp_path / "broken.nii.gz")
    with pytest.raises(FileNotFoundError, match=r"gone\.nrrd"):
        check_volume_pair(image, tmp_path / "gone.nrrd")


# -------------------------------------------------------------------------------------- writer guards


def test_the_writer_refuses_labels_that_would_land_wrong(tmp_path, image):
    with pytest.raises(VolumeDataError, match=r"\(5, 6, 7\).*img\.nii\.gz.*\(7, 6, 5\)"):
        write_label_volume(np.zeros((5, 6, 7), np.uint8), image, tmp_path / "out")
    with pytest.raises(VolumeDataError, match="0..65535"):
        write_label_volume(np.full(SHAPE, -1), image, tmp_path / "out")
    with pytest.raises(VolumeDataError, match="fractional"):
        write_label_volume(np.full(SHAPE, 0.5), image, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_many_classes_are_written_as_uint16_and_tensors_are_accepted(tmp_path, image):
    labels = torch.zeros((1, *SHAPE), dtype=torch.int64)
    labels[0, 1, 2, 3] = 300
    out = write_label_volume(labels, image, tmp_path / "out", postfix="many")
    written = nib.load(out)
    assert out.name == "img_many.nii.gz" and written.get_data_dtype() == np.uint16
    assert np.asanyarray(written.dataobj)[1, 2, 3] == 300 and np.asanyarray(written.dataobj).sum() == 300
    assert sorted(p.name for p in out.parent.iterdir()) == ["img_many.nii.gz"]  # no temporary file left


def test_get_data_takes_one_image(tmp_path):
    itk_volume(tmp_path / "a.mha", volume())
    reader = SimpleITKReader()
    img = reader.read(str(tmp_path / "a.mha"))
    array, _ = reader.get_data([img])
    assert array.shape == SHAPE
    with pytest.raises(NotImplementedError, match="one image"):
        reader.get_data([img, img])
    with pytest.raises(NotImplementedError, match="one volume"):
        reader.read([str(tmp_path / "a.mha")] * 2)
