"""SAM builders, checkpoint loading (resizing, variant checks) and the prompt-free segmenter."""

import pytest
import torch

from medseg_peft.models import SamSegmenter, build_sam, detect_variant, sam_segmenter
from medseg_peft.selection.eligibility import assign_roles


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    path = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_segmenter_shapes_and_prompts():
    net = sam_segmenter("tiny")
    x = torch.rand(3, 3, 48, 80) * 255
    assert net(x).shape == (3, 1, 48, 80)
    boxes = torch.tensor([[0, 0, 40, 24], [10, 10, 70, 40], [0, 0, 80, 48]], dtype=torch.float32)
    out = net(x, boxes=boxes)
    assert out.shape == (3, 1, 48, 80) and not torch.equal(out, net(x))
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        net(torch.rand(2, 1, 64, 64))


def test_each_image_is_decoded_on_its_own():
    net = sam_segmenter("tiny").eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        both = net(x)
        torch.testing.assert_close(both[1:], net(x[1:]), rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip(tiny_ckpt):
    sam, path = tiny_ckpt
    again = build_sam("tiny", path)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(SamSegmenter(sam).eval()(x), SamSegmenter(again).eval()(x))
    nested = path.with_name("nested.pth")
    torch.save({"model": sam.state_dict(), "epoch": 3}, nested)  # MedSAM-style nesting
    assert torch.equal(build_sam("tiny", nested).image_encoder.pos_embed, sam.image_encoder.pos_embed)


def test_checkpoint_at_another_size_is_resized(tiny_ckpt):
    sam, path = tiny_ckpt
    big = build_sam("tiny", path, image_size=128)
    assert big.image_encoder.pos_embed.shape == (1, 8, 8, 32)
    assert big.image_encoder.blocks[1].attn.rel_pos_h.shape == (15, 16)  # global block: 2 * 8 - 1
    assert torch.equal(big.image_encoder.blocks[0].attn.rel_pos_h, sam.image_encoder.blocks[0].attn.rel_pos_h)  # windowed
    assert SamSegmenter(big)(torch.rand(1, 3, 128, 128) * 255).shape == (1, 1, 128, 128)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        build_sam("tiny", image_size=100)


def test_bad_checkpoints_are_named(tiny_ckpt, tmp_path):
    _, path = tiny_ckpt
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_sam("tiny", tmp_path / "missing.pth")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match="not a SAM state_dict"):
        build_sam("tiny", other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could not be read"):
        build_sam("tiny", junk)
    with pytest.raises(ValueError, match=r"is a tiny SAM, but sam_variant='vit_b'"):
        build_sam("vit_b", path)
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_s'"):
        build_sam("vit_s")
    broken = tmp_path / "broken.pth"
    state = torch.load(path)
    state.pop("mask_decoder.iou_token.weight")
    torch.save(state, broken)
    with pytest.raises(ValueError, match="does not fit the tiny model"):
        build_sam("tiny", broken)


def test_variant_detection_on_official_shapes():
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
    assert detect_variant(fake) == "vit_l"


def test_sam_preset_on_the_segmenter():
    roles = assign_roles(sam_segmenter("tiny"), "auto")
    assert roles["sam.image_encoder.blocks.0.attn.qkv.weight"] == "select"
    assert roles["sam.mask_decoder.output_upscaling.0.weight"] == "train"
    assert roles["sam.image_encoder.pos_embed"] == "freeze"
