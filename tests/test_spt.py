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


def brute_total(ranked, n, shapes, rank, alpha, beta):
    counts = {name: 0 for name in shapes}
    for name, _ in ranked[:n]:
        counts[name] += 1
    kinds, total = {}, 0
    for name, c in counts.items():
        shape = shapes[name]
        if c == 0:
            kinds[name] = "none"
        elif len(shape) == 2 and c >= rank * (shape[0] + shape[1]) / alpha:
            kinds[name], total = "structured", total + rank * (shape[0] + shape[1])
        elif len(shape) == 1 and c >= shape[0] / beta:
            kinds[name], total = "whole", total + shape[0]
        else:
            kinds[name], total = "sparse", total + c
    return kinds, total


def test_spt_matches_brute_force(vit, vit_batches):
    budget, rank = 3000, 2
    spt = SPT(budget=budget, rank=rank, train_mode=False)
    sel = spt.select(vit, vit_batches)
    names = eligible_names(vit)
    params = dict(vit.named_parameters())
    sens = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    for x, y in vit_batches:
        for n, g in zip(names, torch.autograd.grad(F.cross_entropy(vit(x), y), [params[n] for n in names])):
            sens[n] += g.double() ** 2
    flat = [(float(v), n, i) for n in names for i, v in enumerate(sens[n].reshape(-1).tolist())]
    pos = {(n, i): j for j, (_, n, i) in enumerate(flat)}
    ranked = [(n, i) for _, n, i in sorted(flat, key=lambda t: (-t[0], pos[(t[1], t[2])]))]
    shapes = {n: tuple(params[n].shape) for n in names}
    n = spt.n_selected
    kinds, total = brute_total(ranked, n, shapes, rank, 10, 5)
    for m in (n - 1, n + 1):  # no neighbouring N is closer to the budget
        assert abs(total - budget) <= abs(brute_total(ranked, m, shapes, rank, 10, 5)[1] - budget)
    chosen = {}
    for name, i in ranked[:n]:
        chosen.setdefault(name, []).append(i)
    for name in names:
        e = sel.entries.get(name)
        if kinds[name] == "none":
            assert e is None, name
        elif kinds[name] == "structured":
            assert e.layout == "lora" and e.rank == rank, name
        elif kinds[name] == "whole":
            assert e.layout == "whole", name
        else:
            assert e.layout == "flat" and e.index.tolist() == sorted(chosen[name]), name
    budget_part = sum(e.count for name, e in sel.entries.items() if name in shapes)
    assert budget_part == total
    assert {n for n, e in sel.entries.items() if n not in shapes} == {"head.weight", "head.bias", "cls_token"}  # trained whole, as in the reference
    assert "lora" in sel.summary() and "by layout" in sel.summary()


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
    with torch.no_grad():
        assert torch.equal(model(x), tuned)


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
    assert adapters and all(sel[n].count == 2 * 2 * sel[n].shape[0] + 2 + sel[n].shape[0] for n in adapters)
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
