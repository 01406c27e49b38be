"""The LoRA baseline and LoRA deltas share the selection methods' life cycle."""

import copy

import pytest
import torch

import medseg_peft as mp
from conftest import train_steps
from medseg_peft.entries import Selection
from medseg_peft.selection.lora import LoRA


def test_lora_selects_qkv_and_head(vit, vit_batches):
    sel = LoRA(rank=2).select(vit, vit_batches)
    lora = {n for n, e in sel.entries.items() if e.layout == "lora"}
    assert lora == {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"}
    assert {n for n, e in sel.entries.items() if e.layout == "whole"} == {"head.weight", "head.bias"}
    assert sel["blocks.0.attn.qkv.weight"].count == 2 * (96 + 32)
    assert "lora r=2" in sel.summary()


def test_lora_on_sam_trains_the_decoder_whole(sam, sam_batches):
    from medseg_peft.models import sam_segmenter

    net = sam_segmenter("tiny")
    sel = LoRA(rank=2).select(net)
    assert all(n.startswith("sam.image_encoder.blocks.") for n, e in sel.entries.items() if e.layout == "lora")
    assert all(e.layout == "whole" for n, e in sel.entries.items() if not n.startswith("sam.image_encoder."))
    assert any(n.startswith("sam.mask_decoder.") for n in sel.entries)


def test_lora_life_cycle_is_exact(vit, vit_batches, tmp_path):
    base = copy.deepcopy(vit)
    model = LoRA(rank=2)(vit, vit_batches)
    x = vit_batches[0][0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base.eval()(x))  # B = 0: starts as the base model
    model.train()
    train_steps(model, vit_batches)
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    path = mp.save_delta(model, tmp_path / "lora.safetensors")
    fresh = mp.load_delta(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    mp.merge(model)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear and not model.blocks[0].attn.qkv._forward_hooks
    with torch.no_grad():  # (W + BA) x vs W x + B(A x): the same function, rounded differently
        torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])}
    assert changed == {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "head.weight", "head.bias"}
    assert list(model.state_dict()) == list(base.state_dict())  # parameter order restored too
    mp.unmerge(model)
    mp.detach(model)
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_lora_selection_file_round_trip(vit, vit_batches, tmp_path):
    sel = LoRA(rank=3).select(vit, vit_batches)
    back = Selection.load(sel.save(tmp_path / "s.safetensors"))
    assert back["blocks.1.attn.qkv.weight"].rank == 3 and back.num_trainable == sel.num_trainable


def test_lora_is_reproducible_per_seed(vit, vit_batches):
    a = LoRA(rank=2, seed=1)(copy.deepcopy(vit), vit_batches)
    b = LoRA(rank=2, seed=1)(copy.deepcopy(vit), vit_batches)
    assert all(torch.equal(p, q) for p, q in zip(mp.trainable_parameters(a), mp.trainable_parameters(b)))


def test_lora_bad_arguments(vit):
    with pytest.raises(ValueError, match="positive integer"):
        LoRA(rank=0)
    with pytest.raises(ValueError, match="match no weight"):
        LoRA(targets=r"nothing_here").select(vit)
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        LoRA(rank=64).select(vit)
