"""Multi-class SAM, intensity presets, label maps and per-class scores: the pieces the organ bundle is built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from medseg_peft.data.volume_transforms import (
    INTENSITY_PRESETS,
    instantiate,
    intensity_config,
    resolve_intensity,
    slice_sampling,
)
from medseg_peft.models import SamSegmenter, build_sam
from medseg_peft.workflows.metrics import PerClassScores, class_dice_metric, label_map
from medseg_peft.workflows.organ import num_outputs, organ_loss, organ_postprocessing


def test_batched_prompt_free_decoding_equals_image_by_image():
    torch.manual_seed(0)
    model = SamSegmenter(build_sam("tiny")).eval()
    x = torch.rand(3, 3, 64, 64) * 255
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert together.shape == (3, 1, 64, 64)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_multiclass_decoder_copies_pretrained_multimask_tokens():
    torch.manual_seed(0)
    sam = build_sam("tiny")
    old_tokens = sam.mask_decoder.mask_tokens.weight.detach().clone()
    old_mlp = [m.layers[-1].weight.detach().clone() for m in sam.mask_decoder.output_hypernetworks_mlps]
    model = SamSegmenter(sam, num_outputs=5, in_channels=1, input_scale=255.0).eval()
    dec = model.sam.mask_decoder
    assert dec.num_mask_tokens == 6 and dec.mask_tokens.weight.shape[0] == 6 and len(dec.output_hypernetworks_mlps) == 6
    assert dec.iou_prediction_head.layers[-1].out_features == 6
    for new, old in enumerate([0, 1, 2, 3, 1, 2]):  # token 0 single-mask, then the three multimask tokens in turn
        torch.testing.assert_close(dec.mask_tokens.weight[new], old_tokens[old])
        torch.testing.assert_close(dec.output_hypernetworks_mlps[new].layers[-1].weight, old_mlp[old])
    assert dec.output_hypernetworks_mlps[1] is not dec.output_hypernetworks_mlps[4]  # copies, not shared
    with torch.no_grad():
        out = model(torch.rand(2, 1, 50, 40))
    assert out.shape == (2, 5, 50, 40)
    torch.testing.assert_close(out[:, 0], out[:, 3])  # classes 1 and 4 start from the same token ...
    assert not torch.allclose(out[:, 0], out[:, 1])  # ... but differ from the others


def test_grey_input_is_the_rgb_model_on_a_repeated_channel():
    torch.manual_seed(0)
    sam = build_sam("tiny")
    grey = SamSegmenter(sam, in_channels=1, input_scale=255.0).eval()
    rgb = SamSegmenter(sam).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1) * 255))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        grey(torch.rand(1, 3, 64, 64))


def test_intensity_presets_and_custom_windows():
    assert resolve_intensity("ct_soft_tissue") == {"window": [-160.0, 240.0]}  # WL 40 / WW 400
    assert resolve_intensity({"level": 40, "width": 400}) == resolve_intensity("ct_soft_tissue")
    assert resolve_intensity("ct_abdomen") == {"window": [-125.0, 275.0]}
    assert resolve_intensity({"percentiles": [1, 99]}) == {"percentiles": [1.0, 99.0]}
    for bad in ("ct_bone", {"window": [300, 100]}, {"percentiles": [-1, 50]}, {"width": 400}):
        with pytest.raises(ValueError):
            resolve_intensity(bad)
    assert set(INTENSITY_PRESETS) >= {"ct_soft_tissue", "ct_abdomen", "ct_lung", "mr"}
    hu = torch.tensor([[[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]]])
    out = instantiate([intensity_config("ct_soft_tissue")])({"image": hu})["image"]
    torch.testing.assert_close(torch.as_tensor(out).flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    mr = torch.arange(1000.0).reshape(1, 10, 10, 10)
    scaled = torch.as_tensor(instantiate([intensity_config("mr")])({"image": mr})["image"])
    assert scaled.min() == 0 and scaled.max() == 1 and (scaled == 0).sum() > 1  # clipped below the 0.5th percentile


def test_label_map_softmax_and_sigmoid():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 5.0]])[..., None]  # [C=3, 3 voxels, 1]
    assert label_map(logits, "softmax").flatten().tolist() == [0, 1, 2]
    sig = torch.tensor([[-1.0, 2.0, 0.5], [-2.0, 1.0, 3.0]])[..., None]  # 2 classes, no background channel
    assert label_map(sig, "sigmoid").flatten().tolist() == [0, 1, 2]  # voxel 0: both below 0.5 -> background
    with pytest.raises(ValueError):
        label_map(sig, "relu")
    assert num_outputs(3, "softmax") == 4 and num_outputs(3, "sigmoid") == 3


def test_losses_take_label_maps():
    label = torch.randint(0, 3, (2, 1, 8, 8)).float()
    perfect = torch.nn.functional.one_hot(label[:, 0].long(), 3).movedim(-1, 1).float() * 20 - 10
    assert organ_loss("softmax")(perfect, label) < organ_loss("softmax")(-perfect, label)
    assert organ_loss("sigmoid")(perfect[:, 1:], label) < organ_loss("sigmoid")(-perfect[:, 1:], label)


def test_per_class_scores_from_metric_details():
    post = organ_postprocessing(2, "softmax")
    metric = class_dice_metric()
    label = torch.zeros(1, 4, 4, 2)
    label[0, :2, :, 0] = 1
    label[0, 2:, :, 1] = 2
    pred = torch.zeros(3, 4, 4, 2)
    pred[1] = (label[0] == 1).float() * 5  # class 1 exact
    pred[2, 2:3, :, 1] = 5  # class 2: half its voxels
    pred[0] = 1
    item = post({"pred": pred, "label": label})
    metric(y_pred=item["pred"][None], y=item["label"][None])
    per_volume = metric.get_buffer()
    assert per_volume.shape == (1, 2)
    torch.testing.assert_close(per_volume[0], torch.tensor([1.0, 2 * 4 / (4 + 8)]))
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {}
    engine.state.metric_details = {"mDice": torch.tensor([[1.0, 0.5], [0.0, 0.5]])}
    PerClassScores({1: "liver", 2: "spleen"})(engine)
    assert engine.state.metrics == {"Dice_liver": 0.5, "Dice_spleen": 0.5}


def test_slice_sampling_draws_foreground_and_resizes():
    label = torch.zeros(1, 20, 16, 10)
    label[0, 5:10, 4:8, 2] = 1
    label[0, 12:15, 4:8, 7] = 2
    image = torch.rand(1, 20, 16, 10)
    sampler = slice_sampling(2, 32, samples_per_volume=30, background_ratio=0.0)
    sampler.set_random_state(0)
    samples = sampler({"image": image, "label": label})
    assert len(samples) == 30
    assert all(s["image"].shape == (1, 32, 32) and s["label"].shape == (1, 32, 32) for s in samples)
    present = [set(np.unique(np.asarray(s["label"])).tolist()) for s in samples]
    assert all(p & {1.0, 2.0} for p in present)  # no background draws: every slice holds an organ
    assert any(2.0 in p for p in present) and any(1.0 in p for p in present)


@pytest.mark.parametrize("prompt,spacing", [("none", None), ("box", [1.5, 1.5])])
def test_the_organ_bundles_transform_lists_are_the_library_pipeline(prompt, spacing, tmp_path):
    """``organ_fps.json`` lists its transforms step by step (overridable by key); they equal the library's
    ``volume_preprocessing`` + ``slice_sampling`` (training) and ``validation_preprocessing`` (validation)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from conftest import ORGAN, bundle_files
    from medseg_peft.data.synthetic_organs import make_synthetic_organs
    from medseg_peft.data.volume_transforms import validation_preprocessing, volume_preprocessing

    root = make_synthetic_organs(tmp_path, n_train=2, n_test=0, seed=1)
    items = [{"image": str(p), "label": str(p.parent.parent / "labelsTr" / p.name)} for p in sorted((root / "imagesTr").glob("*.nii.gz"))]
    parser = ConfigParser()
    parser.read_config(bundle_files(ORGAN))
    parser.update({"num_classes": 3, "input_size": 32, "prompt": prompt, "spacing": spacing, "slices_per_volume": 3,
                   "train#preprocessing#transforms#9#mode": ["nearest", "nearest"]})
    steps = parser.get_parsed_content("train#preprocessing")
    assert tuple(steps.transforms[9].mode) == ("nearest", "nearest")  # one step's setting, overridden by its key
    parser["train#preprocessing#transforms#9#mode"] = ["bilinear", "nearest"]
    volumes = volume_preprocessing(["image", "label"], intensity="ct_soft_tissue", spacing=spacing)
    library_train = Compose([volumes, slice_sampling(3, 32, samples_per_volume=3, background_ratio=0.3, prompt=prompt)]).flatten()
    for bundle, library in ((parser.get_parsed_content("train#preprocessing", lazy=False), library_train),
                            (parser.get_parsed_content("validate#preprocessing"), validation_preprocessing(volumes, prompt))):
        bundle.set_random_state(3), library.set_random_state(3)
        for item in items:
            ours, theirs = bundle(dict(item)), library(dict(item))
            ours, theirs = (ours, theirs) if isinstance(theirs, list) else ([ours], [theirs])
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                assert set(a) == set(b)
                for key in ("image", "label", "box"):
                    if key in b:
                        assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
