"""Partial fine-tuning: manual strategies name exactly their layers (timm ViT and SAM), the angle probe
leaves the model untouched and ranks units by an angle we can recompute, and training moves only the
chosen layers."""

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medseg_peft as mp
from medseg_peft.selection.partial import Partial

# The tiny timm ViT (depth 2), written out by hand so the expectation does not reuse the code's regexes.
ATTN = lambda b: {f"blocks.{b}.attn.qkv.weight", f"blocks.{b}.attn.qkv.bias", f"blocks.{b}.attn.proj.weight", f"blocks.{b}.attn.proj.bias"}
MLP = lambda b: {f"blocks.{b}.mlp.fc1.weight", f"blocks.{b}.mlp.fc1.bias", f"blocks.{b}.mlp.fc2.weight", f"blocks.{b}.mlp.fc2.bias"}
NORMS = lambda b: {f"blocks.{b}.norm1.weight", f"blocks.{b}.norm1.bias", f"blocks.{b}.norm2.weight", f"blocks.{b}.norm2.bias"}
HEAD = {"head.weight", "head.bias"}


@pytest.fixture(scope="module")
def tiny_sam_segmenter():
    from medseg_peft.models import sam_segmenter

    torch.manual_seed(0)
    return sam_segmenter("tiny")


@pytest.mark.parametrize(
    "strategy,expected",
    [
        ("attn", ATTN(0) | ATTN(1)),
        ("ffn", MLP(0) | MLP(1)),
        ("attn_first_half", ATTN(0)),
        ("attn_last_half", ATTN(1)),
        ("ffn_first_half", MLP(0)),
        ("ffn_last_half", MLP(1)),
        ("last_blocks:1", ATTN(1) | MLP(1) | NORMS(1)),
        ("last_blocks:2", ATTN(0) | MLP(0) | NORMS(0) | ATTN(1) | MLP(1) | NORMS(1)),
        ("norm_bias", NORMS(0) | NORMS(1) | {"norm.weight", "norm.bias", "patch_embed.proj.bias", "head.bias"}
         | {n for n in ATTN(0) | MLP(0) | ATTN(1) | MLP(1) if n.endswith(".bias")}),
        (["blocks.0.mlp.fc1.*", "blocks.1.attn.proj.weight"], {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.1.attn.proj.weight"}),
        ("blocks.1.mlp.*", MLP(1)),  # one glob as a plain string (a config value)
    ],
)
def test_strategies_on_vit(vit, strategy, expected):
    assert set(Partial(strategy=strategy, train_head=False).select(vit).entries) == expected
    sel = Partial(strategy=strategy).select(vit)  # train_head=True (default): the head comes too
    assert set(sel.entries) == expected | HEAD
    assert all(e.layout == "whole" for e in sel.entries.values())
    assert sel.num_trainable == sum(p.numel() for n, p in vit.named_parameters() if n in expected | HEAD)
    assert sel.method == "partial" and sel.hparams["strategy"] == strategy and sel.hparams["train_head"] is True


@pytest.mark.parametrize("strategy,parts", [("attn", ["attn"]), ("ffn", ["mlp"]), ("last_blocks:1", None)])
def test_strategies_on_sam(tiny_sam_segmenter, strategy, parts):
    model = tiny_sam_segmenter
    names = [n for n, _ in model.named_parameters()]
    enc = "sam.image_encoder."
    depth = len({n[len(enc):].split(".")[1] for n in names if n.startswith(enc + "blocks.")})
    if parts is None:
        expected = {n for n in names if n.startswith(f"{enc}blocks.{depth - 1}.")}
    else:
        expected = {n for n in names for b in range(depth) for part in parts if n.startswith(f"{enc}blocks.{b}.{part}.")}
    decoder = {n for n in names if not n.startswith(enc)}
    assert decoder and any(n.startswith("sam.mask_decoder.") for n in decoder)
    assert set(Partial(strategy=strategy).select(model).entries) == expected | decoder
    assert set(Partial(strategy=strategy, train_head=False).select(model).entries) == expected
    if strategy == "attn":  # SAM's relative-position tables belong to its attention
        assert f"{enc}blocks.0.attn.rel_pos_h" in expected and f"{enc}blocks.0.attn.qkv.weight" in expected


def test_registry_and_saved_hparams(vit, tmp_path):
    sel = mp.selector("partial", strategy="ffn", loss="ce", seed=0)
    assert isinstance(sel, mp.Partial) and sel.strategy == "ffn"
    # another method's settings are an error naming the ones Partial takes, never silently dropped
    with pytest.raises(TypeError, match=r"takes no setting\(s\) \['budget', 'k'\].*'strategy', 'angle_top'"):
        mp.selector("partial", strategy="ffn", k=3, budget=10)
    with pytest.raises(ValueError, match="loss='ce' or a callable"):
        mp.selector("partial", strategy="attn", loss="supcon")
    saved = Partial(angle_top=2, probe_steps=3).hparams()
    assert {k: saved[k] for k in ("strategy", "angle_top", "order", "probe_steps", "probe_lr", "train_head")} == {
        "strategy": None, "angle_top": 2, "order": "largest", "probe_steps": 3, "probe_lr": 1e-3, "train_head": True}
    path = Partial(strategy=["blocks.0.*"]).select(vit).save(tmp_path / "sel.safetensors")
    back = mp.Selection.load(path)
    assert back.method == "partial" and back.hparams["strategy"] == ["blocks.0.*"]
    assert set(back.entries) == {n for n, _ in vit.named_parameters() if n.startswith("blocks.0.")} | HEAD


def test_clear_errors(vit):
    with pytest.raises(ValueError, match=r"unknown partial strategy 'mlp_only'.*attn_first_half"):
        Partial(strategy="mlp_only").select(vit)
    with pytest.raises(ValueError, match="match no parameter"):
        Partial(strategy=["decoder.*"]).select(vit)
    with pytest.raises(ValueError, match="partial strategy 'attn' matches no parameter"):
        Partial(strategy="attn").select(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="exactly one of"):
        Partial()
    with pytest.raises(ValueError, match="exactly one of"):
        Partial(strategy="attn", angle_top=2)
    with pytest.raises(ValueError, match="the model has 2 blocks"):
        Partial(strategy="last_blocks:3").select(vit)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="angle_top"):
            Partial(angle_top=bad)
    with pytest.raises(ValueError, match="order"):
        Partial(angle_top=1, order="biggest")
    with pytest.raises(ValueError, match="probe_steps"):
        Partial(angle_top=1, probe_steps=0)
    with pytest.raises(ValueError, match="loss='ce' or a callable"):
        Partial(angle_top=1, loss="supcon")
    with pytest.raises(ValueError, match="only 4 units"):
        Partial(angle_top=5).select(vit, [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="needs their targets"):
        Partial(angle_top=1, probe_steps=1).select(vit, [torch.randn(2, 3, 32, 32)])
    attached = Partial(strategy="attn")(copy.deepcopy(vit), ())
    with pytest.raises(ValueError, match="already has attached deltas"):
        Partial(strategy="attn").select(attached)


def test_angle_probe_leaves_the_model_bit_identical_and_ranks_the_moving_unit_first(vit, vit_batches, caplog):
    with torch.no_grad():  # make block 1's MLP tiny: the probe's Adam steps turn it far more than the rest
        vit.blocks[1].mlp.fc1.weight.mul_(1e-3)
        vit.blocks[1].mlp.fc2.weight.mul_(1e-3)
    vit.eval()
    vit.patch_embed.proj.weight.requires_grad_(False)
    vit.head.weight.grad = torch.full_like(vit.head.weight, 7.0)
    params = {n: p.detach().clone() for n, p in vit.state_dict().items()}
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    rng = torch.get_rng_state()

    part = Partial(angle_top=1, probe_steps=5, probe_lr=1e-2)
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        sel = part.select(vit, vit_batches)

    assert all(torch.equal(t, params[n]) for n, t in vit.state_dict().items())
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    assert torch.equal(vit.head.weight.grad, torch.full_like(vit.head.weight, 7.0))
    assert all(p.grad is None for n, p in vit.named_parameters() if n != "head.weight")
    assert not vit.training and torch.equal(torch.get_rng_state(), rng)

    assert set(part.angles) == {"blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}
    assert max(part.angles, key=part.angles.get) == "blocks.1.mlp"
    assert set(sel.entries) == MLP(1) | HEAD
    assert "blocks.1.mlp" in caplog.text and "angle" in caplog.text

    two = Partial(angle_top=2, probe_steps=5, probe_lr=1e-2).select(vit, vit_batches)
    assert len({n.rsplit(".", 2)[0] for n in two.entries if n.startswith("blocks.")}) == 2
    smallest = Partial(angle_top=1, probe_steps=5, probe_lr=1e-2, order="smallest")
    picked = {n for n in smallest.select(vit, vit_batches).entries if n.startswith("blocks.")}
    unit = min(smallest.angles, key=smallest.angles.get)
    assert unit != "blocks.1.mlp" and picked == {n for n in params if n.startswith(unit + ".")}


def test_angles_match_an_independent_fine_tune(vit, vit_batches):
    part = Partial(angle_top=1, probe_steps=4, probe_lr=5e-3, seed=3)
    part.select(vit, vit_batches)
    tuned = copy.deepcopy(vit)
    tuned.train()
    opt = torch.optim.Adam(tuned.parameters(), lr=5e-3)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        for step in range(4):
            x, y = vit_batches[step % len(vit_batches)]
            opt.zero_grad()
            F.cross_entropy(tuned(x), y).backward()
            opt.step()
    base, ft = dict(vit.named_parameters()), dict(tuned.named_parameters())
    for unit, got in part.angles.items():
        names = [n for n in base if n.startswith(unit + ".")]
        a = torch.cat([base[n].detach().double().flatten() for n in names])
        b = torch.cat([ft[n].detach().double().flatten() for n in names])
        want = math.acos(float(torch.clamp(a @ b / (a.norm() * b.norm()), -1, 1)))
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), unit
        assert got > 0


def test_angle_probe_on_sam_with_a_segmentation_loss(tiny_sam_segmenter, sam_batches):
    model = tiny_sam_segmenter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bce = lambda out, y: F.binary_cross_entropy_with_logits(out, y)
    part = Partial(angle_top=2, probe_steps=2, loss=bce, max_batches=1)
    sel = part.select(model, sam_batches)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(part.angles) == 4 and all(u.startswith("sam.image_encoder.blocks.") for u in part.angles)
    encoder = {n for n in sel.entries if n.startswith("sam.image_encoder.")}
    top = sorted(part.angles, key=part.angles.get, reverse=True)[:2]
    assert encoder == {n for n in before if any(n.startswith(u + ".") for u in top)}
    assert {n for n in before if not n.startswith("sam.image_encoder.")} <= set(sel.entries)


def test_partial_trains_only_its_layers(vit, vit_batches, tmp_path):
    base = copy.deepcopy(vit)
    model = mp.Partial(strategy="attn")(vit, vit_batches)
    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-2)
    for x, y in vit_batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    mp.save_delta(model, tmp_path / "delta.safetensors")
    mp.merge(model)
    for (name, p), (name0, p0) in zip(model.named_parameters(), base.named_parameters()):
        assert name == name0
        assert (not torch.equal(p, p0)) == (name in ATTN(0) | ATTN(1) | HEAD), name
    reloaded = mp.merge(mp.load_delta(copy.deepcopy(base), tmp_path / "delta.safetensors"))
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), model.parameters()))


def test_angle_to_a_given_finetuned_model_matches_a_hand_computation(vit, tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from medseg_peft.selection.partial import units_of

    tuned = copy.deepcopy(vit)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, (name, p) in enumerate(tuned.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * (1 + i % 5))  # units turn by different amounts
    path = tmp_path / "finetuned.safetensors"
    save_file({n: p.detach().contiguous() for n, p in tuned.named_parameters()}, str(path))

    sel = Partial(angle_top=2, finetuned=str(path))
    chosen = sel.select(vit)
    base, after = dict(vit.named_parameters()), dict(tuned.named_parameters())
    hand = {}
    for unit, names in units_of(vit).items():  # arccos of the cosine of the concatenated, flattened parameters
        a = np.concatenate([base[n].detach().numpy().ravel() for n in names]).astype(np.float64)
        b = np.concatenate([after[n].detach().numpy().ravel() for n in names]).astype(np.float64)
        hand[unit] = float(np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)))
    assert sel.angles == pytest.approx(hand, abs=1e-9)
    top = sorted(hand, key=hand.get, reverse=True)[:2]
    assert {n for u in top for n in units_of(vit)[u]} <= set(chosen.entries)
    assert "fine-tuned model" in sel.ranked_by and sel.hparams()["finetuned"] == str(path)
    with pytest.raises(ValueError, match="needs angle_top"):
        Partial(strategy="attn", finetuned=str(path))
    with pytest.raises(FileNotFoundError, match="best_delta.safetensors"):
        Partial(angle_top=1, finetuned=str(tmp_path)).select(vit)
