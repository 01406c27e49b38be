"""MedSAM's box protocol in 2D: boxes per object from the mask, jitter, the box file, the polyp bundle with
boxes, and the frozen-encoder decoder baseline with its embedding cache."""

import json

import numpy as np
import pytest
import torch

import medseg_peft as mp
from medseg_peft.data.box_prompts import BoxesFromMaskd, medsam_jitter, object_boxes, read_box_file
from medseg_peft.data.polyp_transforms import polyp_transforms
from medseg_peft.models import build_sam, sam_segmenter
from tests.conftest import run_workflow


def two_blobs():
    mask = np.zeros((1, 40, 60), dtype=np.float32)
    mask[0, 5:10, 3:8] = 1  # small object
    mask[0, 20:35, 30:55] = 1  # large object
    mask[0, 36, 0] = 1  # a single pixel (diagonal neighbours would join it; this one stands alone)
    return mask


def test_one_box_per_object_largest_first():
    boxes = object_boxes(two_blobs()[0])
    assert boxes == [(30, 20, 54, 34, 1), (3, 5, 7, 9, 1), (0, 36, 0, 36, 1)]
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[1:3, 1:3], labels[5:9, 5:9] = 2, 1
    assert object_boxes(labels, classes=True) == [(5, 5, 8, 8, 1), (1, 1, 2, 2, 2)]
    assert medsam_jitter(1024) == 20 and medsam_jitter(256) == 5 and medsam_jitter(64) == 1


def test_boxes_are_padded_jittered_outwards_and_clamped():
    exact = BoxesFromMaskd(max_boxes=4)({"label": torch.from_numpy(two_blobs())})["box"]
    assert exact.shape == (4, 4) and exact[3].tolist() == [-1, -1, -1, -1]
    jitter = BoxesFromMaskd(jitter=5, max_boxes=2)
    jitter.set_random_state(0)
    seen = torch.stack([jitter({"label": two_blobs()})["box"] for _ in range(50)])
    assert seen.shape == (50, 2, 4)  # the two largest objects kept
    grow = (seen - exact[:2]) * torch.tensor([-1, -1, 1, 1])  # outward movement of each side
    assert grow.min() >= 0 and grow.max() == 5
    assert seen[..., 0].min() >= 0 and seen[..., 2].max() <= 59 and seen[..., 3].max() <= 39
    classed = BoxesFromMaskd(classes=True, channel_offset=0)({"label": np.where(two_blobs() > 0, 2.0, 0.0)})["box"]
    assert classed.shape == (16, 5) and classed[0].tolist() == [30, 20, 54, 34, 1]


def test_box_files_are_checked_and_name_the_file(tmp_path):
    good = tmp_path / "a.boxes.json"
    good.write_text(json.dumps({"boxes": [[1, 2, 10, 20], {"box": [0, 0, 5, 5], "label": 2}]}))
    assert read_box_file(good, (30, 40)) == [{"box": [1, 2, 10, 20], "label": 1}, {"box": [0, 0, 5, 5], "label": 2}]
    cases = {"outside": [[1, 2, 50, 20]], "empty": [[10, 2, 1, 20]], "shape": [[1, 2, 3]]}
    for name, boxes in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps({"boxes": boxes}))
        with pytest.raises(ValueError, match=rf"box file .*{name}.json"):
            read_box_file(bad, (30, 40))
    volume = tmp_path / "v.json"
    volume.write_text(json.dumps({"boxes": [[0, 0, 0, 9, 9, 4]]}))
    assert read_box_file(volume, (10, 10, 5))[0]["box"][-1] == 4
    with pytest.raises(ValueError, match="lies outside"):
        read_box_file(volume, (10, 10, 4))


def test_longest_side_pipeline_pads_with_the_image_minimum(tmp_path):
    from PIL import Image

    rgb = np.full((20, 40, 3), 100, dtype=np.uint8)
    rgb[5:10, 5:15] = 200
    mask = np.zeros((20, 40), dtype=np.uint8)
    mask[5:10, 5:15] = 255
    Image.fromarray(rgb).save(tmp_path / "i.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    item = polyp_transforms(32, train=False, resize="longest_side", prompt="box")({"image": str(tmp_path / "i.png"), "label": str(tmp_path / "m.png")})
    image, label, box = item["image"], item["label"], item["box"]
    assert image.shape == (3, 32, 32) and label.shape == (1, 32, 32)
    assert torch.all(image[:, 16:] == image.min()) and torch.all(label[:, 16:] == 0)  # padded below with the image minimum
    assert box[0].tolist() == [4, 4, 11, 7]  # rows 5-9, columns 5-14 at scale 0.8 and box[1].tolist() == [-1, -1, -1, -1]


def test_polyp_bundle_trains_with_boxes_and_the_decoder_baseline(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_lite.pth"
    torch.save(build_sam("tiny_lite").state_dict(), ckpt)
    common = dict(sam_variant="tiny_lite", sam_checkpoint=str(ckpt), prompt="box", epochs=1, synthetic_images=16, batch_size=4)
    run_workflow(["polyp_fps.json"], output_dir=str(tmp_path / "fps"), k=1, **common)
    metrics = json.loads((tmp_path / "fps" / "metrics.json").read_text())
    assert metrics["method"] == "fps" and 0 <= metrics["best"]["mDice"] <= 1
    wf = run_workflow(["polyp_fps.json", "methods/decoder.json"], output_dir=str(tmp_path / "decoder"), **common)
    metrics = json.loads((tmp_path / "decoder" / "metrics.json").read_text())
    assert metrics["method"] == "decoder"
    net = wf.parser.get_parsed_content("network_def")
    assert net._embeddings and all(not p.requires_grad for p in net.sam.image_encoder.parameters())


def test_the_embedding_cache_returns_what_the_encoder_computes():
    net = sam_segmenter("tiny_lite").eval()
    mp.Decoder()(net, [])
    x = torch.rand(3, 3, 64, 64) * 255
    plain = net(x).detach()
    net.cache_embeddings()
    torch.testing.assert_close(net(x), plain, rtol=0, atol=1e-6)
    assert len(net._embeddings) == 3
    calls = []
    net.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(net(x[[2, 0]]), plain[[2, 0]], rtol=0, atol=1e-6)
    assert not calls  # served from the cache
    net.sam.image_encoder.layers[1].blocks[0].attn.qkv.weight.requires_grad_(True)  # a trainable encoder bypasses it
    net(x[:1])
    assert calls


def test_selection_sees_the_box_prompts():
    """A selector given MONAI batches with "box" runs the model with those boxes, as training will."""
    from torch.nn import functional as F

    from medseg_peft.selection.batches import ModelInputs, call_model, split_batch

    net = sam_segmenter("tiny_lite")
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(2, 3, 64, 64, generator=g) * 255, (torch.rand(2, 1, 64, 64, generator=g) > 0.7).float()
    boxes = torch.tensor([[[2.0, 2, 40, 40]], [[20.0, 10, 60, 50]]])
    inputs, _ = split_batch({"image": x, "label": y, "box": boxes})
    assert isinstance(inputs, ModelInputs) and torch.equal(call_model(net, inputs), net(x, boxes=boxes))
    bce = F.binary_cross_entropy_with_logits
    boxed = mp.GPS(k=1, loss=bce).select(net, [{"image": x, "label": y, "box": boxes}])
    free = mp.GPS(k=1, loss=bce).select(net, [{"image": x, "label": y}])
    name = "sam.image_encoder.layers.1.blocks.0.attn.qkv.weight"
    assert not torch.equal(boxed.masks()[name], free.masks()[name])
