"""Sparse tuning life cycle: attach, train, merge, unmerge, save, load."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import medseg_peft as mp
from conftest import tiny_vit, train_steps


def _train(model, batches, steps=4, lr=5e-2, weight_decay=0.1):
    return train_steps(model, batches, steps, lr, weight_decay)


@pytest.fixture
def tuned(vit, vit_batches):
    base = copy.deepcopy(vit)
    model = mp.FPS(k=2)(vit, vit_batches)
    opt = _train(model, vit_batches)
    return base, model, opt, vit_batches


def test_only_selected_entries_change(tuned):
    base, model, _, _ = tuned
    masks = mp.tuning.tuning_state(model).selection.masks()
    mp.merge(model)
    after = dict(model.named_parameters())
    for name, p0 in base.named_parameters():
        p1 = after[name]
        if name in masks:
            m = masks[name]
            assert torch.equal(p1[~m], p0[~m]), f"a frozen entry of {name} moved"
            assert not torch.equal(p1[m], p0[m]), f"no selected entry of {name} moved"
        else:
            assert torch.equal(p1, p0), f"frozen tensor {name} moved"


def test_base_weights_untouched_while_attached(tuned):
    base, model, _, _ = tuned
    state = mp.tuning.tuning_state(model)
    for name, p0 in base.named_parameters():
        if name in state.deltas:
            module_name, _, tname = name.rpartition(".")
            original = model.get_submodule(module_name).parametrizations[tname].original
            assert torch.equal(original, p0) and not original.requires_grad


def test_optimizer_state_only_for_deltas(tuned):
    _, model, opt, _ = tuned
    sel = mp.tuning.tuning_state(model).selection
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sel.num_trainable
    state_numel = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values())
    assert state_numel == 2 * sel.num_trainable


def test_merge_gives_a_plain_model_with_the_same_outputs(tuned):
    base, model, _, batches = tuned
    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        attached_out = model(x)
    mp.merge(model)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    plain = tiny_vit(seed=123)
    plain.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(model(x), attached_out)
        assert torch.equal(plain.eval()(x), attached_out)


def test_unmerge_restores_the_base_exactly(tuned):
    base, model, _, batches = tuned
    x = batches[0][0]
    model.eval()
    with torch.no_grad():
        attached_out = model(x)
    mp.merge(model)
    mp.unmerge(model)
    state = mp.tuning.tuning_state(model)
    for name, p0 in base.named_parameters():
        if name in state.deltas:
            module_name, _, tname = name.rpartition(".")
            assert torch.equal(model.get_submodule(module_name).parametrizations[tname].original, p0)
    with torch.no_grad():
        assert torch.equal(model(x), attached_out)
    mp.detach(model)
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), base.parameters()))


def test_save_load_reproduces_the_tuned_model(tuned, tmp_path):
    base, model, _, batches = tuned
    path = mp.save_delta(model, tmp_path / "delta.safetensors")
    fresh = mp.load_delta(copy.deepcopy(base), path)
    x = batches[0][0]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    mp.merge(model), mp.merge(fresh)
    a, b = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saving a merged model writes the same deltas
    again = mp.save_delta(model, tmp_path / "again.safetensors")
    with safe_open(str(path), "pt") as f, safe_open(str(again), "pt") as g:
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
        assert f.metadata() == g.metadata()


def test_delta_file_holds_only_the_tuned_part(tuned, tmp_path):
    _, model, _, _ = tuned
    path = mp.save_delta(model, tmp_path / "delta.safetensors")
    sel = mp.tuning.tuning_state(model).selection
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        values = sum(f.get_tensor(k).numel() for k in keys if k.endswith(".values"))
        qkv = f.get_tensor("blocks.0.attn.qkv.weight.index")
    assert values == sel.num_trainable
    assert qkv.dtype == torch.int8 and qkv.shape == (96, 2)  # [rows, K], 32 columns fit int8


def test_load_delta_rejects_another_model(tuned, tmp_path):
    _, model, _, _ = tuned
    path = mp.save_delta(model, tmp_path / "delta.safetensors")
    other_weights = tiny_vit(seed=99)
    with pytest.raises(ValueError, match="differ from those the delta was trained on"):
        mp.load_delta(other_weights, path)
    assert not mp.tuning.is_attached(other_weights)  # a failed load leaves the base as it was
    assert all(p.requires_grad for p in other_weights.parameters())
    assert mp.load_delta(other_weights, path, check_base=False) is other_weights
    with pytest.raises(KeyError, match="does not have"):
        mp.load_delta(torch.nn.Sequential(torch.nn.Linear(3, 3)), path)
    with pytest.raises(ValueError, match="disagree on parameter shapes"):
        mp.load_delta(tiny_vit(num_classes=7), path)


def test_attach_rejects_foreign_selection_and_double_attach(vit, vit_batches):
    sel = mp.FPS(k=1).select(vit, vit_batches)
    with pytest.raises(KeyError, match="does not have"):
        mp.attach(torch.nn.Linear(3, 3), sel)
    mp.attach(vit, sel)
    with pytest.raises(ValueError, match="already has attached deltas"):
        mp.attach(vit, sel)
    with pytest.raises(ValueError, match="already has attached deltas"):
        mp.FPS(k=1).select(vit, vit_batches)
    with pytest.raises(ValueError, match="no attached deltas"):
        mp.save_delta(torch.nn.Linear(2, 2), "x.safetensors")


def test_selection_file_reattaches_the_same_entries(vit, vit_batches, tmp_path):
    sel = mp.GPS(k=1, loss="ce").select(vit, vit_batches)
    back = mp.Selection.load(sel.save(tmp_path / "sel.safetensors"))
    mp.attach(vit, back)
    assert sum(p.numel() for p in mp.trainable_parameters(vit)) == sel.num_trainable


def _grads(model, x, y):
    for p in mp.trainable_parameters(model):
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in mp.trainable_parameters(model)]


def test_lean_linear_path_matches_plain_autograd(vit, vit_batches):
    from medseg_peft.tuning.delta import delta_linear_forward

    model = mp.FPS(k=3)(vit, vit_batches)
    qkv = model.blocks[0].attn.qkv
    assert type(qkv).forward is delta_linear_forward
    assert torch.nn.Linear.forward is not delta_linear_forward  # only the generated subclass changed
    with torch.no_grad():
        for p in mp.trainable_parameters(model):
            p.normal_(0, 0.02)  # non-zero deltas, so the effective weight matters
    x, y = vit_batches[0]
    x = x.clone().requires_grad_(True)
    lean = _grads(model, x, y)
    lean_x = x.grad.clone()
    x.grad = None
    linears = [m for m in model.modules() if type(m).forward is delta_linear_forward]
    for m in linears:
        del type(m).forward  # fall back to nn.Linear.forward through the parametrization
    plain = _grads(model, x, y)
    assert len(lean) == len(plain)
    for a, b in zip(lean, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lean_x, x.grad, rtol=1e-5, atol=1e-6)


def test_training_step_under_bf16_autocast(vit, vit_batches):
    model = mp.FPS(k=1)(vit, vit_batches)
    x, y = vit_batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in mp.trainable_parameters(model)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_a_deep_copy_merges_without_touching_the_original(vit, vit_batches):
    model = mp.FPS(k=1)(vit, vit_batches)
    x = vit_batches[0][0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    twin = copy.deepcopy(model)
    mp.merge(twin)
    mp.detach(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(model(x), before) and torch.equal(twin(x), before)
    mp.merge(model)
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear
