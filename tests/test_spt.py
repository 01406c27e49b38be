"""SPT against an independent brute-force computation of its rule, and its tuning life cycle."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import medseg_peft as mp
from medseg_peft.selection.spt import SPT


def eligible_names(model):
    """SPT's ViT eligibility, written out by hand: block matrices and every norm / bias vector."""
    out = []
    for n, p in model.named_parameters():
        if re.search(r"head|cls_token|patch_embed|pos_embed", n):
            continue
        if (p.ndim == 2 and re.search(r"blocks\.\d+\.(attn|mlp)\.", n)) or (p.ndim == 1 and re.search(r"norm|bias", n)):
            out.append(n)
    return out


def sensitivities(model, batches, names):
    """Sum over batches of the squared CE gradient, in float64 (eval mode: deterministic)."""
    params = dict(model.named_parameters())
    sens = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for x, y in batches:
        for n, g in zip(names, torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])):
            sens[n] += g.double() ** 2
    return sens


def reference_units(sens):
    """SPT's model has separate q, k, v Linears: split every fused qkv weight and bias in three, as its
    loader splits the checkpoint's qkv kernel."""
    units = {}
    for n, s in sens.items():
        if re.search(r"qkv\.(weight|bias)$", n):
            d = s.shape[0] // 3
            for i, part in enumerate("qkv"):
                units[f"{n}[{part}]"] = s[i * d : (i + 1) * d]
        else:
            units[n] = s
    return units


def reference_search(units, budget, rank, alpha, beta, step, cls_count):
    """ziplab/SPT engine.py written out: for n = step, 2 step, ... take the global top-n, decide per
    unit, total = unstructured + structured + whole vectors + cls token; keep the n closest to the
    budget, later n winning ties (``<=``)."""
    flat = sorted(((float(v), u, i) for u, s in units.items() for i, v in enumerate(s.reshape(-1).tolist())), key=lambda t: -t[0])
    best = None
    n = step
    while n <= len(flat):
        counts = dict.fromkeys(units, 0)
        for _, u, _ in flat[:n]:
            counts[u] += 1
        kinds, total = {}, cls_count
        for u, c in counts.items():
            shape = tuple(units[u].shape)
            cost = rank * (shape[0] + shape[1]) if len(shape) == 2 else None
            if c == 0:
                kinds[u] = "none"
            elif cost is not None and c >= cost / alpha:
                kinds[u], total = "structured", total + cost
            elif cost is None and c >= shape[0] / beta:
                kinds[u], total = "whole", total + shape[0]
            else:
                kinds[u], total = "sparse", total + c
        if best is None or abs(total - budget) <= abs(best[1] - budget):
            best = (n, total, kinds, {(u, i) for _, u, i in flat[:n]})
        n += step
    return best


def test_spt_matches_the_reference_rule_with_split_qkv_and_its_budget_grid(vit, vit_batches):
    budget, rank, step = 3000, 2, 250
    spt = SPT(budget=budget, rank=rank, step=step, train_mode=False)
    sel = spt.select(vit, vit_batches)
    names = eligible_names(vit)
    units = reference_units(sensitivities(vit, vit_batches, names))
    n, total, kinds, picked = reference_search(units, budget, rank, 10, 5, step, vit.cls_token.numel())
    assert spt.n_selected == n and spt.total == total and spt.n_selected % step == 0
    assert spt.decisions == kinds
    assert sum(k == "structured" for k in kinds.values()) >= 2  # the test exercises branches
    params = dict(vit.named_parameters())
    for name in names:  # the per-tensor entries assembled from the units
        parts = [u for u in units if u == name or u.startswith(name + "[")]
        rows_per_unit = units[parts[0]].shape[0]
        cols = params[name][0].numel()
        blocks, single = [], set()
        for j, u in enumerate(parts):
            offset = j * rows_per_unit * cols
            if kinds[u] == "structured":
                blocks.append((j * rows_per_unit, (j + 1) * rows_per_unit))
            elif kinds[u] == "whole":
                single |= {offset + i for i in range(units[u].numel())}
            elif kinds[u] == "sparse":
                single |= {offset + i for (v, i) in picked if v == u}
        e = sel.entries.get(name)
        if blocks:
            assert e.layout == "lora" and e.rank == rank, name
            assert e.row_blocks() == tuple(blocks), name
            assert (e.index.tolist() if e.index is not None else []) == sorted(single), name
        elif not single:
            assert e is None, name
        elif len(single) == params[name].numel():
            assert e.layout == "whole", name
        else:
            assert e.layout == "flat" and e.index.tolist() == sorted(single), name
    assert sum(e.count for name, e in sel.entries.items() if name in names) + vit.cls_token.numel() == total
    assert {n for n, e in sel.entries.items() if n not in names} == {"head.weight", "head.bias", "cls_token"}  # trained whole, as in the reference
    assert "lora" in sel.summary() and "by layout" in sel.summary()


def test_spt_q_k_v_decisions_differ_within_one_fused_weight(vit, vit_batches):
    """A fused qkv gets per-part decisions and costs: a LoRA on v alone costs rank * (d + d), not rank * (3d + d)."""
    sel = SPT(budget=3000, rank=2, step=250, train_mode=False).select(vit, vit_batches)
    qkv = [e for n, e in sel.entries.items() if n.endswith("qkv.weight") and e.layout == "lora"]
    assert qkv
    for e in qkv:
        d = e.shape[0] // 3
        assert all(b - a == d for a, b in e.row_blocks())
        branches = 2 * (d + e.shape[1]) * len(e.row_blocks())
        assert e.count == branches + (0 if e.index is None else e.index.numel())


def test_spt_exact_search_option(vit, vit_batches):
    """step=None (ours): the count whose total is closest to the budget over every count, not a grid."""
    spt = SPT(budget=3000, rank=2, step=None, train_mode=False)
    spt.select(vit, vit_batches)
    units = reference_units(sensitivities(vit, vit_batches, eligible_names(vit)))
    gaps = {}
    for m in (spt.n_selected - 1, spt.n_selected + 1):
        gaps[m] = abs(reference_search(units, 3000, 2, 10, 5, m, vit.cls_token.numel())[1] - 3000) if m > 0 else None
    assert all(g is None or abs(spt.total - 3000) <= g for g in gaps.values())
    grid = SPT(budget=3000, rank=2, train_mode=False)
    assert grid.grid_step() == 150 and SPT(budget=400_000).grid_step() == 20_000  # the reference's 0.02 M steps


def test_spt_splits_sam_qkv_too(sam, sam_batches):
    from medseg_peft.selection.spt import units_of

    qkv = next(n for n, _ in sam.named_parameters() if n.endswith("image_encoder.blocks.0.attn.qkv.weight"))
    shape = tuple(dict(sam.named_parameters())[qkv].shape)
    assert [u for u, _, _ in units_of(qkv, shape)] == [f"{qkv}[q]", f"{qkv}[k]", f"{qkv}[v]"]
    spt = SPT(budget=2000, rank=2, step=100, loss=lambda out, y: F.binary_cross_entropy_with_logits(out, y))
    spt.select(sam, sam_batches)
    assert {f"{qkv}[q]", f"{qkv}[k]", f"{qkv}[v]"} <= set(spt.decisions)
    assert spt.counted_outside == 0  # no cls token in SAM


def test_spt_tunes_and_round_trips(vit, vit_batches, tmp_path):
    base = copy.deepcopy(vit)
    model = SPT(budget=3000, rank=2)(vit, vit_batches)
    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-2)
    for x, y in vit_batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x = vit_batches[0][0]
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    fresh = mp.load_delta(copy.deepcopy(base), mp.save_delta(model, tmp_path / "spt.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    mp.merge(model)
    with torch.no_grad():  # the branches folded into the weights: the same function, rounded differently
        torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)


def test_spt_bad_arguments():
    with pytest.raises(ValueError, match="positive integer"):
        SPT(budget=0)
    with pytest.raises(ValueError, match="structured must be one of"):
        SPT(structured="prefix")


def test_spt_moves_only_what_it_selected_and_unmerges_exactly(vit, vit_batches):
    base = copy.deepcopy(vit)
    model = SPT(budget=3000, rank=2)(vit, vit_batches)
    sel = mp.tuning.tuning_state(model).selection
    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-2)
    for x, y in vit_batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    mp.merge(model)
    after, masks = dict(model.named_parameters()), sel.masks()
    for name, p0 in base.named_parameters():
        m = masks.get(name, torch.zeros_like(p0, dtype=torch.bool))
        assert torch.equal(after[name][~m], p0[~m]), name
    mp.unmerge(model)
    mp.detach(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_spt_budget_larger_than_the_eligible_count(vit, vit_batches):
    with pytest.raises(ValueError, match="larger than the .* eligible entries"):
        SPT(budget=10**7).select(vit, vit_batches)


def test_spt_adapters_train_save_load_and_refuse_merge(vit, vit_batches, tmp_path):
    base = copy.deepcopy(vit)
    spt = SPT(budget=3000, rank=2, structured="adapter")
    model = spt(vit, vit_batches)
    sel = mp.tuning.tuning_state(model).selection
    adapters = [n for n, e in sel.entries.items() if e.layout == "adapter"]
    assert adapters
    for n in adapters:  # per row block: down + bias, up + bias (on the projection, down reads its input)
        e = sel[n]
        single = 0 if e.index is None else e.index.numel()
        assert e.on_input == bool(re.search(r"attn\.proj\.weight$", n))
        per_block = [(2 * e.shape[1] + 2 + 2 * (b - a) + (b - a)) if e.on_input else (2 * 2 * (b - a) + 2 + (b - a)) for a, b in e.row_blocks()]
        assert e.count == single + sum(per_block)
    x = vit_batches[0][0]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), base.eval()(x))  # up = 0: starts as the base model
    model.train()
    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-2)
    for xb, yb in vit_batches:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    assert not torch.equal(tuned, base(x))
    fresh = mp.load_delta(copy.deepcopy(base), mp.save_delta(model, tmp_path / "a.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    with pytest.raises(ValueError, match="adapters are not mergeable"):
        mp.merge(model)
    mp.detach(model)
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    assert list(model.state_dict()) == list(base.state_dict())
