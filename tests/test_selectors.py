"""FPS and GPS against independent brute-force computations of their published scores."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medseg_peft as mp
from medseg_peft.selection.supcon import supcon_loss
from test_rules import brute_topk_rows


def _layer_inputs(model, batches):
    """Every full input of every Linear / patch-embed conv over the batches (kept whole, unlike FPS)."""
    store = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, name=name: store.setdefault(name, []).append(a[0].detach().double())))
    with torch.no_grad():
        model.eval()
        for x, _ in batches:
            model(x)
    for h in hooks:
        h.remove()
    return store


def _unfold_patches(x, p):
    """Non-overlapping p x p patches as rows [B*L, C*p*p], written with reshapes (no F.unfold)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c * p * p)


@pytest.mark.parametrize("k", [1, 3])
def test_fps_matches_brute_force(vit, vit_batches, k):
    sel = mp.FPS(k=k).select(vit, vit_batches)
    inputs = _layer_inputs(vit, vit_batches)
    params = dict(vit.named_parameters())
    checked = 0
    for name, e in sel.entries.items():
        if e.layout != "rows":
            continue
        module = name.rsplit(".", 1)[0]
        w = params[name].detach().double()
        if w.ndim == 4:
            x = torch.cat([_unfold_patches(t, w.shape[-1]) for t in inputs[module]])
        else:
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[module]])
        # E over tokens of |w_jk * x_k|, without using the factorisation FPS relies on
        score = (w.reshape(w.shape[0], 1, -1).abs() * x.abs().unsqueeze(0)).mean(1)
        assert e.index.tolist() == brute_topk_rows(score, k), name
        checked += 1
    assert checked == 9  # patch embed + 4 linears x 2 blocks


def test_fps_runs_no_backward_and_leaves_the_model_as_it_was(vit, vit_batches):
    flags = {n: p.requires_grad for n, p in vit.named_parameters()}
    vit.train()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    mp.FPS(k=1).select(vit, vit_batches)
    assert all(p.grad is None for p in vit.parameters())
    assert {n: p.requires_grad for n, p in vit.named_parameters()} == flags
    assert vit.training
    assert all(torch.equal(before[n], p) for n, p in vit.named_parameters())
    assert all(not m._forward_pre_hooks for m in vit.modules())


def test_selection_counts_follow_the_presets(vit, sam, vit_batches, sam_batches):
    sel = mp.FPS(k=2).select(vit, vit_batches)
    params = dict(vit.named_parameters())
    rows = sum(params[n].shape[0] for n, e in sel.entries.items() if e.layout == "rows")
    whole = sum(params[n].numel() for n, e in sel.entries.items() if e.layout == "whole")
    assert sel.num_trainable == 2 * rows + whole
    assert set(sel.masks()) == set(sel.entries)
    assert not any("norm" in n or "pos_embed" in n or "cls_token" in n for n in sel.entries)

    sam_sel = mp.FPS(k=1).select(sam, sam_batches)
    sam_params = dict(sam.named_parameters())
    enc_rows = sum(p.shape[0] for n, p in sam_params.items()
                   if n.startswith("image_encoder.") and p.ndim >= 2 and "pos" not in n)
    selected = [n for n, e in sam_sel.entries.items() if e.layout == "rows"]
    assert all(n.startswith("image_encoder.") for n in selected)
    assert sum(sam_sel[n].count for n in selected) == enc_rows
    decoder = [n for n in sam_params if n.startswith(("mask_decoder.", "prompt_encoder."))]
    assert all(sam_sel[n].layout == "whole" for n in decoder)


def test_fps_conv_scores_use_each_kernel_tap(sam, sam_batches):
    """The 3x3 neck conv is scored on its unfolded input, so taps of one channel get different scores."""
    sel = mp.FPS(k=1).select(sam, sam_batches)
    idx = sel["image_encoder.neck.2.weight"].index.flatten()
    taps = idx % 9
    assert len(set(taps.tolist())) > 1


def _brute_gps(model, batches, loss_fn, k):
    names = [n for n, r in mp.selection.assign_roles(model, "auto").items() if r == "select"]
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(model(x), y), [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g.double()  # signed sum over batches, as the reference accumulates .grad
    return {n: brute_topk_rows(total[n].abs(), k) for n in names}


def test_gps_task_loss_matches_brute_force(vit, vit_batches):
    sel = mp.GPS(k=2, loss="ce", train_mode=False).select(vit, vit_batches)
    want = _brute_gps(vit, vit_batches, F.cross_entropy, 2)
    assert {n: sel[n].index.tolist() for n in want} == want
    assert all(p.grad is None for p in vit.parameters())


def test_gps_custom_loss_on_sam(sam, sam_batches):
    loss = lambda out, y: F.binary_cross_entropy_with_logits(out, y)
    sel = mp.GPS(k=1, loss=loss, train_mode=False).select(sam, sam_batches)
    pairs = [(b["image"], b["label"]) for b in sam_batches]
    want = _brute_gps(sam, pairs, loss, 1)
    assert {n: sel[n].index.tolist() for n in want} == want


def test_gps_supcon_is_deterministic_per_seed(vit, vit_batches):
    a = mp.GPS(k=1, seed=7).select(vit, vit_batches)
    b = mp.GPS(k=1, seed=7).select(vit, vit_batches)
    c = mp.GPS(k=1, seed=8).select(vit, vit_batches)
    assert all(torch.equal(a[n].mask(), b[n].mask()) for n in a)
    assert any(not torch.equal(a[n].mask(), c[n].mask()) for n in a if a[n].layout == "rows")


def test_gps_supcon_accepts_two_view_batches(vit, vit_batches):
    two_view = [([x, x.flip(-1)], y) for x, y in vit_batches]
    sel = mp.GPS(k=1).select(vit, two_view)
    assert sel.num_trainable > 0


def test_gps_needs_targets_for_a_task_loss(vit):
    with pytest.raises(ValueError, match="needs targets"):
        mp.GPS(k=1, loss="ce").select(vit, [torch.randn(2, 3, 32, 32)])


def test_bad_selector_arguments(vit, vit_batches):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        mp.FPS(k=0)
    with pytest.raises(ValueError, match="GPS loss must be"):
        mp.GPS(loss="hinge")
    wide = mp.FPS(k=33).select(vit, vit_batches)  # rows of 32 entries: K = 33 takes them whole
    assert wide["blocks.0.attn.qkv.weight"].layout == "whole"
    with pytest.raises(ValueError, match="unknown eligibility preset"):
        mp.FPS(k=1, eligibility="resnet").select(vit, vit_batches)
    with pytest.raises(ValueError, match="batches are empty"):
        mp.FPS(k=1).select(vit, [])


def test_supcon_matches_hand_computation():
    # two samples, two views, 2-d features; labels differ, so each anchor's only positive is its other view
    f = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [-1.0, 0.0]]])
    t = 0.5
    z = [f[0, 0], f[1, 0], f[0, 1], f[1, 1]]  # view-major order
    ids = [0, 1, 0, 1]
    total = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        denom = sum(torch.exp(z[i] @ z[j] / t) for j in others)
        pos = [j for j in others if ids[j] == ids[i]]
        total += -sum(torch.log(torch.exp(z[i] @ z[j] / t) / denom) for j in pos) / len(pos)
    expected = total / 4  # temperature == base temperature
    assert torch.allclose(supcon_loss(f, torch.tensor([0, 1]), temperature=t, base_temperature=t), expected, atol=1e-6)
    # same label for both samples: three positives per anchor
    assert supcon_loss(f, torch.tensor([3, 3]), 0.5, 0.5) != supcon_loss(f, torch.tensor([0, 1]), 0.5, 0.5)
