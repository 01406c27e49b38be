"""LoRA and adapter branches: row blocks of a fused qkv, SPT's placement, its dropout / drop-path, exact merge."""

import copy

import pytest
import torch
import torch.nn.functional as F

import medseg_peft as mp
from conftest import train_steps
from medseg_peft.entries import ADAPTER, LORA, Entries, Selection
from medseg_peft.selection.spt import SPT


def _selection(model, entries):
    return Selection(entries, sum(p.numel() for p in model.parameters()), "manual")


def _randomise(model, scale=0.2):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mp.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _qkv_input(vit):
    return torch.randn(4, 17, vit.embed_dim, generator=torch.Generator().manual_seed(4))


def test_lora_blocks_add_to_their_rows_only(vit):
    qkv = vit.blocks[0].attn.qkv
    w, b = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    name = "blocks.0.attn.qkv.weight"
    mp.attach(vit, _selection(vit, {name: Entries(LORA, tuple(w.shape), rank=2, blocks=((0, 32), (64, 96)))}))
    _randomise(vit)
    x = _qkv_input(vit)
    branch = qkv.peft_branch
    expected = x @ w.T + b
    for (a, stop), f in zip([(0, 32), (64, 96)], branch.factors):  # q and v get their own factors; k stays the base
        expected[..., a:stop] += x @ f.lora_A.T @ f.lora_B.T
    vit.eval()
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), expected, rtol=1e-5, atol=1e-6)
    assert set(mp.tuning.tuning_state(vit).deltas[name].tensors()) == {"lora_A.0", "lora_B.0", "lora_A.1", "lora_B.1"}


def test_branch_dropout_and_drop_path_act_in_training_and_vanish_in_the_merge(vit, vit_batches):
    name = "blocks.0.attn.qkv.weight"
    shape = tuple(vit.blocks[0].attn.qkv.weight.shape)
    base = copy.deepcopy(vit)
    mp.attach(vit, _selection(vit, {name: Entries(LORA, shape, rank=2, blocks=((64, 96),))}), dropout=0.0, drop_path=0.5)
    _randomise(vit)
    qkv = vit.blocks[0].attn.qkv
    x = _qkv_input(vit)
    with torch.no_grad():
        vit.eval()
        clean = qkv(x) - base.blocks[0].attn.qkv(x)  # the branch's eval contribution
        vit.train()
        torch.manual_seed(0)
        noisy = qkv(x) - base.blocks[0].attn.qkv(x)
    # drop-path is per sample: each sample's branch is dropped (0) or kept and scaled by 1 / (1 - 0.5)
    kept = [torch.allclose(noisy[i], 2 * clean[i], atol=1e-5) for i in range(x.shape[0])]
    dropped = [torch.allclose(noisy[i], torch.zeros_like(noisy[i]), atol=1e-6) for i in range(x.shape[0])]
    assert all(k or d for k, d in zip(kept, dropped)) and any(kept) and any(dropped)
    assert torch.count_nonzero(clean[..., :64]) == 0  # q and k rows untouched

    # dropout on the branch input: training outputs vary with the seed, eval ones do not
    model = copy.deepcopy(base)
    mp.attach(model, _selection(model, {name: Entries(LORA, shape, rank=2)}), dropout=0.1, drop_path=0.1)
    _randomise(model)
    xb = vit_batches[0][0]
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(xb)
        torch.manual_seed(2)
        b = model(xb)
        assert not torch.allclose(a, b)
        model.eval()
        branch_eval = model(xb)
        assert torch.equal(branch_eval, model(xb))
    mp.merge(model)
    assert not any("peft_branch" in n for n, _ in model.named_modules()) and not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(xb), branch_eval, rtol=1e-5, atol=1e-5)  # merged = the branch model in eval


def test_spt_regularises_branches_as_the_reference(vit, vit_batches):
    """SPT: Dropout(0.1) on branch inputs except the attention projection's, DropPath(0.1) on every branch output."""
    from timm.layers import DropPath

    spt = SPT(budget=3000, rank=2, step=250, train_mode=False)
    sel = spt.select(vit, vit_batches)
    shape = {n: tuple(p.shape) for n, p in vit.named_parameters()}
    sel.entries["blocks.1.attn.proj.weight"] = Entries(LORA, shape["blocks.1.attn.proj.weight"], rank=2)
    model = spt.apply(vit, sel)
    branches = {n: d for n, d in mp.tuning.tuning_state(model).deltas.items() if d.layout == LORA}
    assert "blocks.1.attn.proj.weight" in branches and len(branches) >= 2
    for name, d in branches.items():
        if name.endswith("attn.proj.weight"):
            assert isinstance(d.dropout, torch.nn.Identity)
        else:
            assert isinstance(d.dropout, torch.nn.Dropout) and d.dropout.p == 0.1
        assert all(isinstance(m, DropPath) and m.drop_prob == 0.1 for m in d.drop_paths)
    assert SPT().dropout == 0.1 and SPT().drop_path == 0.1 and mp.LoRA().dropout == 0.0


def test_adapters_sit_where_the_reference_puts_them(vit):
    proj, qkv = vit.blocks[0].attn.proj, vit.blocks[0].attn.qkv
    wp, bp, wq, bq = (t.detach().clone() for t in (proj.weight, proj.bias, qkv.weight, qkv.bias))
    entries = {
        "blocks.0.attn.proj.weight": Entries(ADAPTER, tuple(wp.shape), rank=2, on_input=True),
        "blocks.0.attn.qkv.weight": Entries(ADAPTER, tuple(wq.shape), rank=2, blocks=((64, 96),)),
    }
    mp.attach(vit, _selection(vit, entries))
    ap, aq = proj.peft_branch.factors[0], qkv.peft_branch.factors[0]
    bound = 1 / wp.shape[1] ** 0.5  # nn.Linear's default bias init on the down projection; up starts at zero
    assert ap.down_bias.abs().max() <= bound and ap.down_bias.abs().sum() > 0
    assert not ap.up.any() and not ap.up_bias.any()
    _randomise(vit)
    x = _qkv_input(vit)
    vit.eval()
    with torch.no_grad():
        # projection: parallel, reading the projection's input
        adapter = F.linear(F.gelu(F.linear(x, ap.down, ap.down_bias)), ap.up, ap.up_bias)
        torch.testing.assert_close(proj(x), x @ wp.T + bp + adapter, rtol=1e-5, atol=1e-6)
        # v of the fused qkv: sequential on its slice of the output
        y = x @ wq.T + bq
        v = y[..., 64:96]
        y[..., 64:96] = v + F.linear(F.gelu(F.linear(v, aq.down, aq.down_bias)), aq.up, aq.up_bias)
        torch.testing.assert_close(qkv(x), y, rtol=1e-5, atol=1e-6)


def test_single_entries_beside_branches_train_merge_and_round_trip(vit, vit_batches, tmp_path):
    name = "blocks.0.attn.qkv.weight"
    shape = tuple(vit.blocks[0].attn.qkv.weight.shape)
    with pytest.raises(ValueError, match="outside its branches' row blocks"):
        Entries(LORA, shape, torch.tensor([70 * 32]), rank=2, blocks=((64, 96),))
    single = torch.tensor([0, 5, 33 * 32 + 1])  # in q's and k's rows; v has a LoRA
    entries = {name: Entries(LORA, shape, single, rank=2, blocks=((64, 96),)), "head.weight": Entries("whole", (5, 32))}
    sel = _selection(vit, entries)
    assert sel[name].count == 3 + 2 * (32 + 32) and "+3 single" in sel[name].describe()
    base = copy.deepcopy(vit)
    model = mp.attach(vit, sel)
    train_steps(model, vit_batches)
    x = vit_batches[0][0]
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    path = mp.save_delta(model, tmp_path / "mixed.safetensors")
    fresh = mp.load_delta(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
    mp.merge(model)
    changed = (model.blocks[0].attn.qkv.weight != base.blocks[0].attn.qkv.weight).nonzero()
    rows = set(changed[:, 0].tolist())
    assert rows - set(range(64, 96)) <= {0, 33} and {0, 33} <= rows  # the singles and v's rows moved, nothing else
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)
    mp.unmerge(model)
    mp.detach(model)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    back = Selection.load(sel.save(tmp_path / "sel.safetensors"))
    assert back[name].blocks == ((64, 96),) and back[name].index.tolist() == single.tolist()
