"""Every method on TinyViT-SAM (the encoder of LiteMedSAM and MobileSAM), with the reference semantics.

TinyViT differs from the ViTs the methods were written for in ways that matter to them: convolutions
(1x1, depthwise 3x3) with BatchNorms instead of biases, attention-bias tables instead of position
embeddings, stages of blocks (``layers.S.blocks.N``) with patch mergings between them, and a fused
``qkv`` whose rows are laid out per head rather than as q | k | v blocks. These tests pin how each
method treats those parts, and that the whole cycle (select, attach, train, merge) stays exact.
"""

import pytest
import torch
import torch.nn.functional as F

import medseg_peft as mp
from medseg_peft.entries import LORA, ROWS, WHOLE, row_view_shape
from medseg_peft.models import sam_segmenter
from medseg_peft.selection.base import METHODS
from medseg_peft.selection.eligibility import always_trained, assign_roles, is_sam, is_tiny_vit
from medseg_peft.selection.registry import _import_methods

_import_methods()  # every registered method, so a new one is exercised here too

BCE = F.binary_cross_entropy_with_logits
ENC = "sam.image_encoder."
K = 2
SETTINGS = {"fps": {"k": K}, "gps": {"k": K, "loss": BCE}, "random": {"k": K}, "spt": {"budget": 3000, "loss": BCE},
            "lora": {"rank": 2}, "partial": {"strategy": "attn"}, "full": {}, "decoder": {}}
TOP_K = {"fps", "gps", "random"}
BRANCHES = {"lora", "spt"}  # merged to float rounding, not bit for bit
IN_PLACE = {"full", "decoder"}  # unfreeze the model itself: nothing to merge


def tiny_lite(seed: int = 0):
    torch.manual_seed(seed)
    return sam_segmenter("tiny_lite")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are a few thousand weights: one thread runs them faster than several contending for a
    busy machine's cores (seconds per step otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(2, 3, 64, 64, generator=g) * 255, (torch.rand(2, 1, 64, 64, generator=g) > 0.6).float()) for _ in range(2)]


def test_every_registered_method_is_exercised():
    assert set(METHODS) == set(SETTINGS)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_life_cycle_on_tiny_vit_sam(method, batches):
    """Select on two batches, attach, two AdamW steps, merge: the merged plain model computes what the tuned
    one did, only selected entries moved, and the BatchNorm statistics were never touched."""
    net = tiny_lite()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    stats = {n: b.clone() for n, b in net.named_buffers() if "running" in n or "num_batches" in n}
    selector = mp.selector(method, **SETTINGS[method])
    selection = selector.select(net, batches)
    roles = assign_roles(net, "auto")
    if method in TOP_K:  # K entries in every row of every selected tensor; rows shorter than K whole
        for name, role in roles.items():
            if role != "select":
                continue
            e = selection.entries[name]
            rows, cols = row_view_shape(e.shape)
            if cols < K:
                assert e.layout == WHOLE, name
            else:
                assert e.layout == ROWS and e.index.shape == (rows, K), name
                assert (e.mask().view(rows, cols).sum(1) == K).all(), name
    model = selector.apply(net, selection)
    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-2)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        BCE(model(x), y).backward()
        opt.step()
    model.eval()
    assert all(torch.equal(b, stats[n]) for n, b in net.named_buffers() if n in stats)
    x = batches[0][0]
    with torch.no_grad():
        tuned = model(x)
        plain = model if method in IN_PLACE else mp.merge(model)
        merged = plain(x)
    if method in BRANCHES:
        torch.testing.assert_close(merged, tuned, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(merged, tuned)
    masks = selection.masks()
    after = dict(plain.named_parameters())
    for name, old in before.items():
        moved = after[name].detach() != old
        assert not (moved & ~masks.get(name, torch.zeros_like(moved))).any(), f"{name} moved outside the selection"
    if method != "decoder":
        assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith(ENC)), "the encoder did not train"


def test_preset_roles_of_each_kind_of_parameter():
    net = tiny_lite()
    assert is_sam(net) and is_tiny_vit(net) and not is_tiny_vit(sam_segmenter("tiny"))
    roles = assign_roles(net, "auto")
    assert roles == assign_roles(net, "sam_tiny_vit")
    expected = {
        "patch_embed.seq.0.c.weight": "select",  # patch-embedding convolution
        "layers.0.blocks.0.conv1.c.weight": "select",  # MBConv 1x1
        "layers.0.blocks.0.conv2.c.weight": "select",  # MBConv depthwise 3x3
        "layers.0.downsample.conv2.c.weight": "select",  # patch merging
        "layers.1.blocks.0.attn.qkv.weight": "select",
        "layers.1.blocks.0.attn.proj.weight": "select",
        "layers.1.blocks.0.mlp.fc1.weight": "select",
        "layers.1.blocks.0.mlp.fc2.weight": "select",
        "layers.1.blocks.0.local_conv.c.weight": "select",  # local depthwise convolution
        "neck.0.weight": "select",
        "neck.2.weight": "select",
        "layers.1.blocks.0.attn.qkv.bias": "train",
        "layers.0.blocks.0.conv2.bn.bias": "train",  # a BatchNorm shift: its convolution's bias
        "layers.1.blocks.0.local_conv.bn.bias": "train",
        "neck.1.bias": "train",
        "layers.0.blocks.0.conv2.bn.weight": "freeze",  # a BatchNorm scale: a norm
        "patch_embed.seq.2.bn.weight": "freeze",
        "layers.1.blocks.0.attn.norm.weight": "freeze",
        "layers.1.blocks.0.mlp.norm.bias": "freeze",
        "layers.1.blocks.0.attn.attention_biases": "freeze",  # the position tables
        "neck.1.weight": "freeze",
    }
    assert {n: roles[ENC + n] for n in expected} == expected
    outside = {n: r for n, r in roles.items() if not n.startswith(ENC)}
    assert outside and set(outside.values()) == {"train"}
    assert always_trained(net) == list(outside)
    mobile = assign_roles(sam_segmenter("vit_t", image_size=64), "auto")  # MobileSAM's unused ImageNet head
    assert {mobile[ENC + n] for n in ("head.weight", "head.bias", "norm_head.weight", "norm_head.bias")} == {"freeze"}
    sam = sam_segmenter("tiny")  # a ViT-SAM still gets the SAM preset
    assert assign_roles(sam, "auto") == assign_roles(sam, "sam")


def test_fps_scores_grouped_convolutions_on_their_own_channels(batches):
    """FPS's activation mean of a depthwise 3x3 convolution is per channel and tap, from its unfolded input."""
    net = tiny_lite().eval()
    conv = net.sam.image_encoder.layers[0].blocks[0].conv2.c
    name = ENC + "layers.0.blocks.0.conv2.c.weight"
    seen = []
    handle = conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    handle.remove()
    cols = torch.cat([F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, conv.in_channels * 9) for x in seen])
    expected = conv.weight.detach().abs() * cols.abs().mean(0).view(conv.weight.shape)
    fps = mp.FPS(k=K)
    stats = fps.statistics(net, batches, [name])
    score = dict(fps.scores(net, stats, [name]))[name]
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-7)


def test_gps_gradients_reach_every_kind_of_selected_weight(batches):
    net = tiny_lite()
    gps = mp.GPS(k=K, loss=BCE)
    selectable = [n for n, r in assign_roles(net, "auto").items() if r == "select"]
    grads = gps.statistics(net, batches, selectable)
    for part in ("patch_embed.seq.0.c", "layers.0.blocks.0.conv2.c", "layers.2.downsample.conv1.c", "layers.3.blocks.0.local_conv.c",
                 "layers.3.blocks.0.attn.qkv", "layers.3.blocks.0.mlp.fc2"):
        assert grads[f"{ENC}{part}.weight"].abs().sum() > 0, part
    assert all(p.grad is None for p in net.parameters())  # the model's gradients are left as they were


def test_spt_keeps_the_per_head_qkv_one_unit():
    """SPT's units split ViT's q | k | v rows but not TinyViT's per-head ones: a structured qkv gets one LoRA
    branch over all its rows."""
    from medseg_peft.selection.spt import units_of

    tiny, vit = ENC + "layers.1.blocks.0.attn.qkv.weight", ENC + "blocks.0.attn.qkv.weight"
    assert units_of(tiny, (48, 16)) == [(tiny, 0, 48)]
    assert [(a, b) for _, a, b in units_of(vit, (48, 16))] == [(0, 16), (16, 32), (32, 48)]
    assert units_of(tiny.replace("weight", "bias"), (48,)) == [(tiny.replace("weight", "bias"), 0, 48)]
    scores = {tiny: torch.rand(48, 16, generator=torch.Generator().manual_seed(0)) + 1, ENC + "neck.0.weight": torch.zeros(8, 8)}
    entries = mp.SPT(budget=128, rank=2).choose(iter(scores.items()))  # cost 2 * (16 + 48): the whole budget
    assert entries[tiny].layout == LORA and entries[tiny].blocks is None and entries[tiny].row_blocks() == ((0, 48),)
    split = mp.SPT(budget=128, rank=2).choose(iter({vit: scores[tiny]}.items()))
    assert split[vit].layout == LORA and split[vit].blocks is not None  # ViT-SAM: branches per q / k / v block


def test_spt_preset_and_adapters_on_tiny_vit(batches):
    net = tiny_lite()
    spt = mp.SPT(budget=2000, loss=BCE, structured="adapter", alpha=1000, max_batches=1)
    roles = assign_roles(net, spt.rules(net))
    expected = {
        "layers.1.blocks.0.attn.qkv.weight": "select", "layers.1.blocks.0.mlp.fc2.weight": "select",
        "layers.1.blocks.0.attn.norm.weight": "select", "layers.0.blocks.0.conv1.bn.weight": "select",
        "layers.0.blocks.0.conv1.bn.bias": "select",  # vectors compete, as norms and biases do in SPT
        "layers.0.blocks.0.conv1.c.weight": "freeze", "layers.1.blocks.0.local_conv.c.weight": "freeze",  # convolutions: no unit
        "layers.1.blocks.0.attn.attention_biases": "freeze", "patch_embed.seq.0.c.weight": "freeze", "neck.0.weight": "freeze",
    }
    assert {n: roles[ENC + n] for n in expected} == expected
    mobile_sam = sam_segmenter("vit_t", image_size=64)
    mobile = assign_roles(mobile_sam, spt.rules(mobile_sam))
    assert mobile[ENC + "norm_head.weight"] == "freeze" and mobile[ENC + "head.bias"] == "freeze"
    model = spt(net, batches)  # a low alpha makes every chosen matrix a unit with an adapter
    adapted = [n for n, e in mp.tuning.tuning_state(model).selection.entries.items() if e.layout == "adapter"]
    assert adapted and all(".attn." in n or ".mlp." in n for n in adapted)
    BCE(model(batches[0][0]), batches[0][1]).backward()


def test_lora_on_tiny_vit_qkv_and_proj(batches):
    """LoRA's default targets find TinyViT's qkv; one branch spans all its rows, whatever their layout."""
    net = tiny_lite()
    selection = mp.LoRA(rank=2).select(net)
    lora = {n: e for n, e in selection.entries.items() if e.layout == LORA}
    assert sorted(lora) == sorted(n for n, _ in net.named_parameters() if n.endswith("attn.qkv.weight"))
    assert all(e.blocks is None for e in lora.values())
    model = mp.LoRA(rank=2, targets=r"attn\.(qkv|proj)\.weight$")(net)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.fill_(0.01)
        tuned = model(batches[0][0])
        merged = mp.merge(model)
        change = merged.sam.image_encoder.layers[1].blocks[0].attn.qkv.weight - tiny_lite().sam.image_encoder.layers[1].blocks[0].attn.qkv.weight
        torch.testing.assert_close(merged(batches[0][0]), tuned, rtol=1e-5, atol=1e-5)
    assert (change.abs().sum(1) > 0).all()  # every head's q, k and v rows


ATTN_PARTS = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "attn.attention_biases"}
MLP_PARTS = {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
TRANSFORMER_BLOCKS = ["layers.1.blocks.0", "layers.2.blocks.0", "layers.2.blocks.1", "layers.3.blocks.0"]  # tiny_lite's


def test_partial_finds_tiny_vit_blocks_and_units():
    from medseg_peft.selection.partial import Partial, strategy_names, units_of

    net = tiny_lite()
    names = [n for n, _ in net.named_parameters()]
    within = lambda blocks, parts: {f"{ENC}{b}.{p}" for b in blocks for p in parts}
    assert set(strategy_names(net, "attn")) == within(TRANSFORMER_BLOCKS, ATTN_PARTS)  # pre-norms stay out, as ViT's norm1
    assert set(strategy_names(net, "ffn")) == within(TRANSFORMER_BLOCKS, MLP_PARTS)
    assert set(strategy_names(net, "ffn_last_half")) == within(TRANSFORMER_BLOCKS[2:], MLP_PARTS)
    assert set(strategy_names(net, "last_blocks:1")) == {n for n in names if n.startswith(f"{ENC}layers.3.blocks.0.")}
    every = set(strategy_names(net, "last_blocks:5"))  # the MBConv block is the fifth from the end
    assert {n for n in names if n.startswith(f"{ENC}layers.0.blocks.0.")} <= every
    assert not any(".downsample." in n for n in every)  # patch mergings are no block
    with pytest.raises(ValueError, match=r"N must be in 1\.\.5"):
        strategy_names(net, "last_blocks:6")
    norm_bias = set(strategy_names(net, "norm_bias"))
    assert ENC + "layers.0.blocks.0.conv1.bn.weight" in norm_bias and ENC + "layers.0.blocks.0.conv1.bn.bias" in norm_bias
    units = units_of(net)
    assert list(units)[:4] == [f"{ENC}layers.0.blocks.0", f"{ENC}layers.1.blocks.0.attn", f"{ENC}layers.1.blocks.0.local_conv",
                               f"{ENC}layers.1.blocks.0.mlp"]
    assert len(units) == 1 + 3 * len(TRANSFORMER_BLOCKS)
    selection = Partial(strategy="attn").select(net)
    assert set(selection.entries) == within(TRANSFORMER_BLOCKS, ATTN_PARTS) | set(always_trained(net))


def test_partial_angle_probe_ranks_tiny_vit_units(batches):
    from medseg_peft.selection.partial import Partial, units_of

    net = tiny_lite()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    partial = Partial(angle_top=3, probe_steps=2, loss=BCE)
    selection = partial.select(net, batches)
    assert set(partial.angles) == set(units_of(net)) and all(a > 0 for a in partial.angles.values())
    top = sorted(partial.angles, key=partial.angles.get, reverse=True)[:3]
    assert {n for u in top for n in units_of(net)[u]} <= set(selection.entries)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_selection_table_and_picture_show_tiny_vit_stages(batches, tmp_path):
    from medseg_peft.workflows.pictures import base_numels, block_label, draw_selection, selection_table

    net = tiny_lite()
    selection = mp.selector("random", k=K).select(net)
    table = selection_table(selection, base_numels(net))
    assert [block_label(b) for b in table["blocks"]] == ["stage 0 block 0", "stage 1 block 0", "stage 2 block 0", "stage 2 block 1",
                                                          "stage 3 block 0"]
    assert table["kinds"] == ["attention", "mlp", "conv", "bias", "norm"]
    assert table["cells"][(0, 0), "conv"][0] == sum(e.count for n, e in selection.entries.items() if ".layers.0.blocks.0.conv" in n
                                                    and n.endswith(".c.weight"))
    assert table["cells"][(2, 1), "norm"] == [0, sum(p.numel() for n, p in net.named_parameters()
                                                     if ".layers.2.blocks.1." in n and (".norm." in n or n.endswith("bn.weight")))]
    assert [g for g in table["groups"] if "merge" in g] == [f"image_encoder.merge after stage {s}" for s in range(3)]
    assert sum(t for t, _ in table["groups"].values()) == selection.num_trainable
    printed = str(selection)
    assert f"{ENC}layers.0.blocks.0.conv2.c.weight" in printed and "top-2/row" in printed
    sam = sam_segmenter("tiny")  # ViT-SAM keeps its plain block rows
    vit_table = selection_table(mp.selector("random", k=K).select(sam), base_numels(sam))
    assert [block_label(b) for b in vit_table["blocks"]] == ["block 0", "block 1"] and "conv" not in vit_table["kinds"]
    path = draw_selection(selection, tmp_path / "selection.png", base_numels(net))
    assert path.stat().st_size > 1000
