"""Inputs inference cannot segment, refused before any model work with one line naming the file, printed last:
through the bundles/organ/inference.json layer, and the rule the exported bundle's copy (scripts/bundle_errors.py) uses."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ORGAN, bundle_files  # noqa: E402
from medseg_peft.data import bundle_errors
from medseg_peft.data.volume_io import VolumeDataError, check_volumes


def nifti(path: Path, shape: tuple[int, ...]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    return path


def test_check_volumes_refuses_a_2d_image_and_unchosen_channels_naming_the_file(tmp_path):
    volume, flat, four = nifti(tmp_path / "ct.nii.gz", (8, 8, 3)), nifti(tmp_path / "xray.nii.gz", (8, 8)), nifti(tmp_path / "mr.nii.gz", (8, 8, 3, 4))
    assert check_volumes([volume]) == [volume] and check_volumes([four], channel=2) == [four]
    with pytest.raises(VolumeDataError, match=r"xray.nii.gz has 2 axes, shape \(8, 8\)"):
        check_volumes([volume, flat])
    with pytest.raises(VolumeDataError, match=r"mr.nii.gz has 4 channels"):
        check_volumes([four])


def _raised(outer: BaseException, *inner: BaseException) -> BaseException:
    """``outer`` raised from ``inner[0]``, raised from ``inner[1]``, ...: a chain as ``raise ... from`` leaves it."""
    chain = [outer, *inner]
    for a, b in zip(chain, chain[1:]):
        a.__cause__ = b
    return outer


def test_the_line_shown_is_the_outermost_message_naming_a_file_past_monai_wrappers():
    wrapped = _raised(RuntimeError("Failed to evaluate ConfigExpression: '$check(@dataset_dir)'"),
                      RuntimeError("applying transform <monai.transforms.io.dictionary.LoadImaged object>"),
                      VolumeDataError("/data/case_1.nii.gz: the voxel data cannot be read"), zlib.error("incorrect header check"))
    assert bundle_errors.error_line(wrapped) == "VolumeDataError: /data/case_1.nii.gz: the voxel data cannot be read"
    unnamed = _raised(RuntimeError("Failed to instantiate component 'x' with keywords: a"), ValueError("bad value"), ZeroDivisionError("x"))
    assert bundle_errors.error_line(unnamed) == "ZeroDivisionError: x"  # nothing names a file: where it began
    try:
        try:
            raise KeyError("the inner one")
        except KeyError:
            raise ValueError("box file\n /b/c.boxes.json is empty") from None
    except ValueError as err:
        assert bundle_errors.error_chain(err) == [err]  # a suppressed context is not followed
        assert bundle_errors.error_line(err) == "ValueError: box file /b/c.boxes.json is empty"  # one line


def test_the_short_error_printer_is_installed_under_monai_bundle_only(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    bundle_errors.short_errors(["pytest"])
    assert sys.excepthook is sys.__excepthook__
    bundle_errors.short_errors(["/x/monai/bundle/__main__.py", "run"])
    assert sys.excepthook is bundle_errors._excepthook


def test_a_2d_image_given_to_inference_json_is_one_last_line_naming_it(tmp_path):
    flat = nifti(tmp_path / "in" / "slice_2d.nii.gz", (30, 26))
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle_files([*ORGAN, "organ/inference.json"])),
                           "--dataset_dir", str(flat.parent), "--classes", "['liver']", "--run_dir", str(tmp_path / "run"),
                           "--output_dir", str(tmp_path / "labels")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(lines) < 6, done.stderr[-3000:]
    assert str(flat) in lines[-1] and "shape (30, 26)" in lines[-1] and "VolumeDataError" in lines[-1]
    assert not (tmp_path / "labels").exists()
