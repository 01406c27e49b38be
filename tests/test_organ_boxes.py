"""MedSAM's box protocol for volumes: per-slice boxes from labels, the organ bundle with boxes, box files
mapped through orientation onto the right slices and axes, the exported bundle with boxes, bad box files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.engines import PrepareBatchExtraInput

from conftest import ORGAN, error_chain, run_workflow
from medseg_peft.data.box_prompts import medsam_jitter, object_boxes, read_box_file
from medseg_peft.data.volume_boxes import BoxSliceInferer, box_datalist, box_file_for, grid_boxes, read_volume_boxes
from medseg_peft.data.volume_transforms import SliceBoxesd, slice_sampling
from medseg_peft.models import SamSegmenter, build_sam
from medseg_peft.workflows.organ import organ_activation

# stored axes (i, j, k) -> world (A, -S, R): after orientation to RAS the slices (S) run along stored j, reversed,
# a slice's height (R) is stored k and its width (A) stored i
PERMUTED = np.array([[0.0, 0.0, 1.0, -5.0], [1.0, 0.0, 0.0, 3.0], [0.0, -1.0, 0.0, 20.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def organ_label() -> torch.Tensor:
    """``[1, R=20, A=16, S=6]``: organ 1 on slices 1-3 (two pieces on slice 2), organ 2 on slices 3-4."""
    label = torch.zeros(1, 20, 16, 6)
    label[0, 2:6, 3:9, 1:4] = 1
    label[0, 12:15, 10:14, 2] = 1  # a second piece of organ 1 on slice 2 only
    label[0, 8:18, 1:4, 3:5] = 2
    return label


def test_per_slice_boxes_one_per_component_per_class():
    box = SliceBoxesd()({"label": organ_label()})["box"]
    assert box.shape == (6, 16, 5)
    rows = lambda k: sorted(tuple(r) for r in box[k].tolist() if r[0] >= 0)  # noqa: E731
    assert rows(0) == rows(5) == []
    # x along A (the slice's width), y along R (its height); fifth column: class - 1
    assert rows(1) == [(3, 2, 8, 5, 0)]
    assert rows(2) == [(3, 2, 8, 5, 0), (10, 12, 13, 14, 0)]
    assert rows(3) == [(1, 8, 3, 17, 1), (3, 2, 8, 5, 0)]
    assert rows(4) == [(1, 8, 3, 17, 1)]


def test_training_slices_get_jittered_boxes_of_their_own_label():
    size = 256
    sampler = slice_sampling(2, size, samples_per_volume=12, background_ratio=0.0, prompt="box")
    sampler.set_random_state(0)
    samples = sampler({"image": torch.rand(1, 20, 16, 6), "label": organ_label()})
    jitter, grown = medsam_jitter(size), []
    for s in samples:
        exact = object_boxes(np.asarray(s["label"][0]).astype(np.int64), classes=True)
        rows = [r for r in s["box"].tolist() if r[0] >= 0]
        assert s["box"].shape == (16, 5) and len(rows) == len(exact) >= 1
        for (x1, y1, x2, y2, c), (ex1, ey1, ex2, ey2, value) in zip(rows, exact):
            assert c == value - 1
            grown += [ex1 - x1, ey1 - y1, x2 - ex2, y2 - ey2]
    assert min(grown) >= 0 and max(grown) <= jitter and max(grown) > 0  # pushed outwards by up to MedSAM's jitter


def test_box_prompts_imply_sigmoid_and_refuse_softmax():
    assert organ_activation(None, "none") == "softmax" and organ_activation(None, "box") == "sigmoid"
    assert organ_activation("sigmoid", "none") == "sigmoid"
    with pytest.raises(ValueError, match="prompt 'box' needs activation 'sigmoid'.*activation is 'softmax'") as info:
        organ_activation("softmax", "box")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="prompt must be one of"):
        organ_activation(None, "points")


def test_organ_bundle_trains_and_validates_with_boxes(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_lite.pth"
    torch.save(build_sam("tiny_lite").state_dict(), ckpt)
    out = tmp_path / "run"
    # MedSAM's own recipe (boxes, the image encoder frozen, prompt encoder and mask decoder trained), and the quickest method here
    wf = run_workflow([*ORGAN, "methods/decoder.json"], output_dir=str(out), sam_variant="tiny_lite", sam_checkpoint=str(ckpt),
                      prompt="box", epochs=1, val_interval=1, synthetic_volumes=4, volumes_per_batch=2, slices_per_volume=4, select_batches=1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "decoder" and metrics["settings"]["prompt"] == "box" and metrics["settings"]["activation"] == "sigmoid"
    assert [h["epoch"] for h in metrics["history"]] == [0, 1] and 0 <= metrics["best"]["mDice"] <= 1
    assert wf.parser.get_parsed_content("network_def").num_outputs == 3  # one sigmoid channel per class, no background
    item = wf.parser.get_parsed_content("validate#dataset")[0]
    assert item["box"].shape == (item["label"].shape[-1], 16, 5)  # every slice of the validation volume, its exact boxes
    assert isinstance(wf.parser.get_parsed_content("validate#inferer"), BoxSliceInferer)
    assert isinstance(wf.parser.get_parsed_content("validate#evaluator").prepare_batch, PrepareBatchExtraInput)


class Painter(torch.nn.Module):
    """Logit +20 inside each box on its class channel, -20 elsewhere: shows where every box lands."""

    def __init__(self, channels: int = 2):
        super().__init__()
        self.channels, self.slices = channels, 0
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, boxes):
        self.slices += x.shape[0]
        out = torch.full((x.shape[0], self.channels, *x.shape[-2:]), -20.0)
        for n, rows in enumerate(boxes.tolist()):
            for x1, y1, x2, y2, c in rows:
                if x1 >= 0:
                    out[n, int(c), int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = 20.0
        return out


def write_volume(path: Path, shape=(12, 9, 7), affine=PERMUTED) -> Path:
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(40, 100, shape).astype(np.float32), affine), path)
    return path


def write_boxes(volume: Path, boxes) -> Path:
    path = box_file_for(volume)
    path.write_text(json.dumps({"boxes": boxes}))
    return path


def test_box_files_land_on_the_right_slices_and_axes_through_orientation(tmp_path):
    """Asymmetric boxes in stored voxel indices of a permuted, flipped volume come back exactly where they were drawn."""
    folder = tmp_path / "volumes"
    folder.mkdir()
    volume = write_volume(folder / "case.nii.gz")
    boxes = [[1, 2, 0, 4, 6, 3], {"box": [7, 0, 4, 10, 1, 6], "label": 2}]
    write_boxes(volume, boxes)
    expected = np.zeros((12, 9, 7), dtype=np.uint8)
    expected[1:5, 2:7, 0:4] = 1
    expected[7:11, 0:2, 4:7] = 2

    painter = Painter()
    wf = run_workflow([*ORGAN, "organ/inference.json"], dataset_dir=str(folder), classes=["a", "b"], prompt="box", network=painter,
                      output_dir=str(tmp_path / "labels"), intensity="minmax", sw_batch_size=2)
    written = nib.load(tmp_path / "labels" / "case_seg.nii.gz")
    assert np.array_equal(np.asanyarray(written.dataobj), expected) and np.allclose(written.affine, PERMUTED)
    assert painter.slices == 7  # stored j 2..6 and 0..1 are oriented slices 2..6 and 7..8: slices 0 and 1 never run
    item = wf.parser.get_parsed_content("dataset")[0]
    assert item["image"].shape == (1, 7, 12, 9) and item["box"].shape == (9, 2, 5)  # [C, R = k, A = i, S = j reversed]
    assert item["box"][2, 0].tolist() == [1, 0, 4, 3, 0]  # x over A = stored i 1..4, y over R = stored k 0..3
    assert item["box"][8].tolist() == [[-1] * 5, [7, 4, 10, 6, 1]]


def test_boxes_follow_in_plane_resampling():
    """Voxels of 1 mm resampled to 2 mm in plane: the new voxels whose centres the box covers, at least one, clipped."""
    target = np.diag([2.0, 2.0, 1.0, 1.0])
    boxes = [{"box": [2, 0, 1, 5, 0, 3], "label": 1}, {"box": [0, 8, 0, 1, 9, 0], "label": 2}]
    assert grid_boxes(boxes, np.eye(4), target, (5, 5, 4)) == [([1, 0, 1], [2, 0, 3], 1), ([0, 4, 0], [0, 4, 0], 2)]


def test_box_slice_inferer_without_boxes_is_the_slice_inferer():
    from monai.inferers import SliceInferer

    volume = torch.rand(1, 1, 10, 9, 7)
    net = lambda x: x * 2  # noqa: E731
    ours = BoxSliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=3, progress=False)(volume, net)
    torch.testing.assert_close(ours, SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=3, progress=False)(volume, net))
    with pytest.raises(ValueError, match="whole slices"):
        BoxSliceInferer(roi_size=(4, 4), spatial_dim=2)(volume, Painter(), boxes=torch.full((1, 7, 1, 5), -1.0))


def test_bad_box_files_name_the_file_in_one_line(tmp_path):
    volume = write_volume(tmp_path / "case.nii.gz")  # stored shape (12, 9, 7)
    cases = {
        "outside": {"boxes": [[0, 0, 0, 12, 3, 3]]},
        "empty": {"boxes": [[5, 0, 0, 4, 3, 3]]},
        "shape": {"boxes": [[0, 0, 4, 4]]},
        "label": {"boxes": [{"box": [0, 0, 0, 1, 1, 1], "label": 3}]},
        "none": {"boxes": []},
    }
    for name, content in cases.items():
        box_dir = tmp_path / name
        box_dir.mkdir()
        (box_dir / "case.boxes.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=rf"box file {box_dir / 'case.boxes.json'}") as info:
            box_datalist([volume], prompt="box", box_dir=box_dir, num_classes=2, activation="sigmoid")
        assert "\n" not in str(info.value)
        if name != "label":  # the same rules as the 2D / volume reader of box_prompts
            with pytest.raises(ValueError):
                read_box_file(box_dir / "case.boxes.json", (12, 9, 7))
    (tmp_path / "case.boxes.json").write_text("{not json")
    for missing_or_broken in (tmp_path / "absent", tmp_path):
        with pytest.raises(ValueError, match="box file .*case.boxes.json") as info:
            box_datalist([volume], prompt="box", box_dir=missing_or_broken, num_classes=2)
        assert "\n" not in str(info.value)
    good = write_boxes(volume, [[0, 0, 0, 11, 8, 6], {"box": [1, 2, 3, 4, 5, 6], "label": 2}])
    assert read_volume_boxes(good, (12, 9, 7)) == read_box_file(good, (12, 9, 7))
    assert box_datalist([volume], prompt="box") == [{"image": volume, "box_file": str(good)}]
    assert box_datalist([volume]) == [{"image": volume}]
    with pytest.raises(ValueError, match="activation is 'softmax'"):
        box_datalist([volume], prompt="box", activation="softmax")


def test_inference_bundle_checks_box_files_before_building_the_network(tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    volume = write_volume(folder / "case.nii.gz")
    write_boxes(volume, [[0, 0, 0, 4, 4, 9]])
    with pytest.raises(Exception) as info:  # the box check comes first: the missing checkpoint is never looked for
        run_workflow([*ORGAN, "organ/inference.json"], dataset_dir=str(folder), classes=["a"], prompt="box", output_dir=str(tmp_path / "out"),
                     sam_variant="tiny", sam_checkpoint=str(tmp_path / "no_such.pth"))
    assert f"box file {folder / 'case.boxes.json'}: box 0 [0, 0, 0, 4, 4, 9] lies outside" in error_chain(info.value)
    assert not (tmp_path / "out").exists()


def always_positive_organ_sam(classes: int = 2) -> SamSegmenter:
    """A tiny per-class sigmoid SAM whose every mask logit is positive: a prompted slice is all its box's class."""
    torch.manual_seed(0)
    net = SamSegmenter(build_sam("tiny"), num_outputs=classes, in_channels=1, input_scale=255.0).eval()
    decoder = net.sam.mask_decoder
    with torch.no_grad():
        decoder.output_upscaling[3].weight.zero_()
        decoder.output_upscaling[3].bias.fill_(1.0)
        for mlp in decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(1.0)
    return net


def test_exported_bundle_reads_box_files_itself_and_labels_only_the_boxes_slices(tmp_path):
    from medseg_peft.export import export_bundle

    bundle = export_bundle(tmp_path / "bundle", network=always_positive_organ_sam(), result_file=None, class_names=["a", "b"],
                           intensity="minmax", activation="sigmoid", prompt="box", sam_variant="tiny", torch_export=False)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["prompt"] == "box" and (bundle / "scripts" / "volume_boxes.py").is_file()
    folder = tmp_path / "volumes"
    folder.mkdir()
    first, second = write_volume(folder / "a.nii.gz"), write_volume(folder / "b.nii.gz")
    write_boxes(first, [[2, 1, 0, 5, 2, 3], {"box": [0, 5, 2, 3, 6, 4], "label": 2}])  # stored j 1..2 (class 1) and 5..6 (class 2)
    write_boxes(second, [[0, 0, 0, 3, 3, 3], [0, 9, 0, 1, 9, 1]])  # j = 9 is outside (9 voxels along j)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir", str(folder),
               "--output_dir", str(tmp_path / "labels")]
    blocker = tmp_path / "no_medseg_peft" / "medseg_peft"  # any import of medseg_peft in the bundle run fails
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the exported bundle imported medseg_peft')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(blocker.parent)}
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    message = f"box file {folder / 'b.boxes.json'}: box 1 [0, 9, 0, 1, 9, 1] lies outside the image (size [12, 9, 7] as i, j, k)"
    assert message in done.stderr
    assert not (tmp_path / "labels").exists()  # checked before any volume was segmented, the first one included

    write_boxes(second, [[0, 0, 0, 3, 3, 3]])
    done = subprocess.run(command, cwd=bundle, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a = np.asanyarray(nib.load(tmp_path / "labels" / "a_seg.nii.gz").dataobj)
    expected = np.zeros((12, 9, 7), dtype=np.uint8)
    expected[:, 1:3, :], expected[:, 5:7, :] = 1, 2  # stored j is the slice axis: whole slices of the box's class, none elsewhere
    assert np.array_equal(a, expected)
    b = np.asanyarray(nib.load(tmp_path / "labels" / "b_seg.nii.gz").dataobj)
    assert set(np.unique(b[:, :4, :]).tolist()) == {1} and not b[:, 4:, :].any()


def test_a_coarse_label_given_with_the_request_prompts_the_exported_bundle_called_as_monai_label_calls_it(tmp_path):
    """MONAI Label's /infer may carry a label volume (request["label"]); its bundle infer task runs the config's
    ``preprocessing`` on the request and calls ``inferer(image[None], network)``: the boxes reach the network
    through the image's metadata, one per class and slice, where the coarse label is (here a permuted, flipped grid)."""
    from monai.bundle import ConfigParser

    from medseg_peft.export import export_bundle

    bundle = export_bundle(tmp_path / "bundle", network=always_positive_organ_sam(), result_file=None, class_names=["a", "b"],
                           intensity="minmax", activation="sigmoid", prompt="box", sam_variant="tiny", torch_export=False)
    image = write_volume(tmp_path / "case.nii.gz")
    coarse = np.zeros((12, 9, 7), dtype=np.uint8)
    coarse[2:6, 1:3, 1:4], coarse[7:9, 5:7, 3:6] = 1, 2  # stored axis j holds the axial slices of this permuted grid
    nib.save(nib.Nifti1Image(coarse, PERMUTED), tmp_path / "coarse.nii.gz")

    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]
    sys.path.insert(0, str(bundle))
    try:
        config = ConfigParser()
        config.read_config(str(bundle / "configs" / "inference.json"))
        config.config.update({"bundle_root": str(bundle)})
        network = config.get_parsed_content("network_def")
        network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
        data = config.get_parsed_content("preprocessing")({"image": str(image), "label": str(tmp_path / "coarse.nii.gz")})
        inferer = config.get_parsed_content("inferer")
        with torch.no_grad():
            logits = inferer(data["image"][None], network.eval())  # as MONAI Label's run_inferer calls it
            passed = inferer(data["image"][None], network, boxes=data["box"][None])  # as the bundle's own evaluator does
    finally:
        sys.path.remove(str(bundle))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    assert "label" not in data and data["box"].shape == (9, 2, 5)
    assert torch.equal(logits, passed)
    from medseg_peft.data.volume_transforms import volume_preprocessing

    oriented = volume_preprocessing(["image", "label"], intensity="minmax")({"image": str(image), "label": str(tmp_path / "coarse.nii.gz")})
    expected = [(oriented["label"][0] == c + 1).any(0).any(0).nonzero().flatten().tolist() for c in range(2)]
    prompted = [(logits[0, c].amax(dim=(0, 1)) > 0).nonzero().flatten().tolist() for c in range(2)]
    assert prompted == expected and [len(e) for e in expected] == [2, 2]  # each class on the axial slices its coarse label is on
