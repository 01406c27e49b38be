"""Partial fine-tuning: manual strategies name exactly their layers; the angle probe leaves the model untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F

import medseg_peft as mp
from medseg_peft.selection.partial import Partial


def _trained(sel, model):
    return {n for n in sel.entries}


def _block_params(prefix, block, part, names):
    return {n for n in names if n.startswith(f"{prefix}blocks.{block}.{part}.")}


@pytest.mark.parametrize(
    "strategy,units",
    [("attn", [(0, "attn"), (1, "attn")]), ("ffn", [(0, "mlp"), (1, "mlp")]), ("attn_first_half", [(0, "attn")]),
     ("attn_last_half", [(1, "attn")]), ("ffn_first_half", [(0, "mlp")]), ("ffn_last_half", [(1, "mlp")])],
)
def test_named_strategies_on_vit_and_sam(vit, strategy, units):
    from medseg_peft.models import sam_segmenter

    for model, prefix, always in ((vit, "", {"head.weight", "head.bias"}), (sam_segmenter("tiny"), "sam.image_encoder.", None)):
        names = [n for n, _ in model.named_parameters()]
        expected = set().union(*(_block_params(prefix, b, p, names) for b, p in units))
        if always is None:
            always = {n for n in names if not n.startswith("sam.image_encoder.")}
        sel = Partial(strategy=strategy).select(model)
        assert _trained(sel, model) == expected | always, (strategy, prefix)
        assert all(e.layout == "whole" for e in sel.entries.values())


def test_other_strategies_and_globs(vit):
    names = [n for n, _ in vit.named_parameters()]
    last = Partial(strategy="last_blocks:1", train_head=False).select(vit)
    assert set(last.entries) == {n for n in names if n.startswith("blocks.1.")}
    nb = Partial(strategy="norm_bias", train_head=False).select(vit)
    assert set(nb.entries) == {n for n in names if "norm" in n or n.endswith(".bias")}
    globs = Partial(strategy=["blocks.0.mlp.fc1.*"], train_head=False).select(vit)
    assert set(globs.entries) == {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias"}
    assert isinstance(mp.selector("partial", strategy="ffn", k=3, loss="ce", seed=0), Partial)


def test_bad_strategies(vit):
    with pytest.raises(ValueError, match="unknown partial strategy 'mlp_only'"):
        Partial(strategy="mlp_only").select(vit)
    with pytest.raises(ValueError, match="match no parameter"):
        Partial(strategy=["decoder.*"]).select(vit)
    with pytest.raises(ValueError, match="exactly one of"):
        Partial()
    with pytest.raises(ValueError, match="exactly one of"):
        Partial(strategy="attn", angle_top=2)
    with pytest.raises(ValueError, match="has 2 blocks"):
        Partial(strategy="last_blocks:3").select(vit)


def test_angle_probe_leaves_the_model_and_ranks_the_moving_unit_first(vit, vit_batches):
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    with torch.no_grad():  # make block 1's MLP tiny, so the probe turns it the most
        vit.blocks[1].mlp.fc1.weight.mul_(1e-3)
        vit.blocks[1].mlp.fc2.weight.mul_(1e-3)
    shrunk = {n: p.detach().clone() for n, p in vit.named_parameters()}
    part = Partial(angle_top=1, probe_steps=5, probe_lr=1e-2)
    sel = part.select(vit, vit_batches)
    assert all(torch.equal(p, shrunk[n]) for n, p in vit.named_parameters())
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    assert max(part.angles, key=part.angles.get) == "block 1 mlp"
    assert {n for n in sel.entries if n.startswith("blocks.")} == {n for n in before if n.startswith("blocks.1.mlp.")}
    smallest = Partial(angle_top=1, probe_steps=5, probe_lr=1e-2, order="smallest").select(vit, vit_batches)
    assert {n for n in smallest.entries if n.startswith("blocks.")} != {n for n in sel.entries if n.startswith("blocks.")}


def test_partial_trains_only_its_layers(vit, vit_batches):
    base = copy.deepcopy(vit)
    model = Partial(strategy="attn")(vit, vit_batches)
    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-2)
    for x, y in vit_batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    mp.merge(model)
    for (name, p), p0 in zip(model.named_parameters(), base.parameters()):
        moved = not torch.equal(p, p0)
        assert moved == (".attn." in name or name.startswith("head.")), name
