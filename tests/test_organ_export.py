"""The exported bundle: strict plain weights, TorchScript equal to the merged model without medseg_peft, metadata, inference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medseg_peft as mp
from medseg_peft.export import export_bundle
from medseg_peft.models import SamSegmenter, build_sam
from medseg_peft.tuning import merge, save_delta

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {1: "liver", 2: "spleen"}


def organ_sam(seed: int = 0) -> SamSegmenter:
    torch.manual_seed(seed)
    return SamSegmenter(build_sam("tiny"), num_outputs=3, in_channels=1, input_scale=255.0).eval()


def run(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny organ SAM tuned by FPS with non-zero deltas, its result file, and the exported folder."""
    tmp = tmp_path_factory.mktemp("export")
    net = organ_sam()
    slices = [(torch.rand(4, 1, 64, 64), torch.randint(0, 3, (4, 1, 64, 64)).float()) for _ in range(2)]
    tuned = mp.FPS(k=2)(net, slices)
    with torch.no_grad():
        for p in mp.trainable_parameters(tuned):
            p.add_(torch.randn_like(p) * 0.05)
    result = save_delta(tuned, tmp / "best_delta.safetensors")
    reference = merge(tuned).eval()
    bundle = export_bundle(tmp / "bundle", network=organ_sam(), result_file=result, class_names=CLASSES,
                           intensity="ct_abdomen", sam_variant="tiny")
    return {"bundle": bundle, "reference": reference, "tmp": tmp}


def test_model_pt_is_a_plain_state_dict_of_the_merged_model(exported):
    state = torch.load(exported["bundle"] / "models" / "model.pt", weights_only=True)
    plain = organ_sam(seed=1)
    assert set(state) == set(plain.state_dict())  # no delta, parametrization or PEFT keys
    plain.load_state_dict(state, strict=True)
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), exported["reference"](x))


def test_exported_configs_and_torchscript_need_no_medseg_peft(exported):
    """Build network_def from the exported inference.json, load model.pt strictly, and load model.ts with torch alone."""
    bundle, tmp = exported["bundle"], exported["tmp"]
    x = torch.rand(3, 1, 48, 40)
    torch.save(x, tmp / "x.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(bundle)!r})
from monai.bundle import ConfigParser
parser = ConfigParser(); parser.read_config({str(bundle / 'configs' / 'inference.json')!r})
net = parser.get_parsed_content("network_def").eval()
net.load_state_dict(torch.load({str(bundle / 'models' / 'model.pt')!r}, weights_only=True), strict=True)
ts = torch.jit.load({str(bundle / 'models' / 'model.ts')!r})
x = torch.load({str(tmp / 'x.pt')!r})
out = {{"pt": net(x), "ts": ts(x)}}
import os
import re
if os.path.exists({str(bundle / 'models' / 'model.pt2')!r}):
    out["pt2"] = torch.export.load({str(bundle / 'models' / 'model.pt2')!r}).module()(x)
assert not any(m.startswith("medseg_peft") for m in sys.modules), "medseg_peft was imported"
torch.save({{k: v.detach() for k, v in out.items()}}, {str(tmp / 'out.pt')!r})
"""
    with torch.no_grad():
        expected = exported["reference"](x)
    run(["-c", script], cwd=tmp, PYTHONPATH="")
    outs = torch.load(tmp / "out.pt")
    assert outs["pt"].shape == (3, 3, 48, 40)
    for name, out in outs.items():
        assert (out - expected).abs().max() < 1e-4, name
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert "any batch and in-plane size" in meta["torchscript_input_policy"]


def test_metadata_verifies_offline_against_the_shipped_schema(exported):
    run(["-m", "monai.bundle", "verify_metadata", "--meta_file", str(exported["bundle"] / "configs" / "metadata.json"),
         "--filepath", str(ROOT / "bundles" / "schema.json")], cwd=exported["tmp"])


def test_exported_inference_writes_label_volumes_with_the_inputs_geometry(exported):
    """NIfTI in -> NIfTI out and NRRD (LPS) in -> NRRD out, same shape and geometry, by ``monai.bundle run``."""
    tmp = exported["tmp"]
    volumes = tmp / "volumes"
    volumes.mkdir()
    rng = np.random.default_rng(0)
    affine = np.array([[0.8, 0.1, 0.0, -20.0], [-0.1, 0.8, 0.0, 15.0], [0.0, 0.0, 3.0, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.normal(40, 100, (30, 26, 7)).astype(np.float32), affine), volumes / "case_a.nii.gz")
    img = sitk.GetImageFromArray(rng.normal(40, 100, (5, 20, 24)).astype(np.float32))  # z, y, x
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-10.0, -20.0, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(volumes / "case_b.nrrd"))
    out = tmp / "labels"
    run(["-m", "monai.bundle", "run", "--config_file", str(exported["bundle"] / "configs" / "inference.json"),
         "--dataset_dir", str(volumes), "--output_dir", str(out), "--sw_batch_size", "3"], cwd=exported["bundle"], PYTHONPATH="")
    a = nib.load(out / "case_a_seg.nii.gz")
    assert a.shape == (30, 26, 7) and np.allclose(a.affine, affine) and a.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(a.dataobj))) <= {0, 1, 2}
    b = sitk.ReadImage(str(out / "case_b_seg.nrrd"))
    assert b.GetSize() == img.GetSize() and b.GetOrigin() == img.GetOrigin()
    assert np.allclose(b.GetSpacing(), img.GetSpacing()) and np.allclose(b.GetDirection(), img.GetDirection())
    assert b.GetPixelID() == sitk.sitkUInt8


def test_export_refuses_a_result_file_of_another_model(exported, tmp_path):
    other = SamSegmenter(build_sam("tiny"), num_outputs=5, in_channels=1, input_scale=255.0)
    with pytest.raises(ValueError):
        export_bundle(tmp_path / "b", network=other, result_file=exported["tmp"] / "best_delta.safetensors",
                      class_names=["a", "b", "c", "d"], sam_variant="tiny")


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_failed_export_leaves_no_bundle_and_keeps_the_previous_one(damage, exported, tmp_path):
    """No result file, or a truncated one: an error naming it, no partial bundle; a previous export stays whole."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run_dir / "best_delta.safetensors"
    if damage == "truncated":
        raw = (exported["tmp"] / "best_delta.safetensors").read_bytes()
        result.write_bytes(raw[: len(raw) // 2])
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(result))):
        export_bundle(run_dir / "bundle", network=organ_sam(), result_file=result, class_names=CLASSES, sam_variant="tiny")
    assert _siblings(run_dir) == (["best_delta.safetensors"] if damage == "truncated" else [])

    previous = export_bundle(run_dir / "bundle", network=organ_sam(), result_file=None, class_names=CLASSES, sam_variant="tiny",
                             torch_export=False)
    files = {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(str(result))):
        export_bundle(run_dir / "bundle", network=organ_sam(), result_file=result, class_names=CLASSES, sam_variant="tiny")
    assert {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()} == files
    assert _siblings(run_dir) == sorted(["bundle"] + (["best_delta.safetensors"] if damage == "truncated" else []))


def test_an_export_replaces_a_previous_one_whole(exported, tmp_path):
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    (tmp_path / "bundle" / "models" / "stale.pt").write_bytes(b"an older export's file")
    bundle = export_bundle(tmp_path / "bundle", network=organ_sam(), result_file=exported["tmp"] / "best_delta.safetensors",
                           class_names=CLASSES, sam_variant="tiny", torch_export=False)
    assert _siblings(tmp_path) == ["bundle"] and _siblings(bundle / "models") == ["model.pt", "model.ts"]
    assert _siblings(bundle) == ["LICENSE", "configs", "docs", "models", "scripts"]


def test_an_export_failing_while_it_writes_leaves_the_previous_bundle_and_no_partial_folder(tmp_path, monkeypatch):
    from medseg_peft import export

    previous = export_bundle(tmp_path / "bundle", network=organ_sam(), result_file=None, class_names=CLASSES, sam_variant="tiny",
                             torch_export=False)
    files = {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_trace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_bundle(tmp_path / "bundle", network=organ_sam(seed=1), result_file=None, class_names=CLASSES, sam_variant="tiny")
    assert _siblings(tmp_path) == ["bundle"] and {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()} == files


def test_a_2d_image_given_to_the_exported_bundle_is_one_last_line_naming_it(exported):
    """Checked from its header before any model work; the one line is the last a Slicer user sees."""
    tmp = exported["tmp"]
    flat = tmp / "flat" / "slice_2d.nii.gz"
    flat.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((30, 26), np.float32), np.eye(4)), flat)
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", str(flat.parent), "--output_dir", str(tmp / "flat_labels")],
                          cwd=exported["bundle"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(lines) < 6, done.stderr[-3000:]
    assert str(flat) in lines[-1] and "shape (30, 26)" in lines[-1] and lines[-1].startswith("error: VolumeDataError")
    assert not (tmp / "flat_labels").exists()
