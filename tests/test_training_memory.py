"""Training memory: a sparse Linear / Conv2d saves only the input columns its selected entries need; activation checkpointing."""

import copy

import pytest
import torch
import torch.nn.functional as F

import medseg_peft as mp
from conftest import train_steps
from medseg_peft.entries import FLAT, ROWS, WHOLE, Entries, Selection
from medseg_peft.models import sam_segmenter
from medseg_peft.tuning import tuning_state


def _few_columns(model, layout: str, columns=(1, 5, 6), k=2, seed=0) -> Selection:
    """Every Linear weight of ``model``'s blocks trains ``k`` entries per row, all among a few input columns."""
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name, p in model.named_parameters():
        if ".blocks." in f".{name}" and name.endswith(".weight") and p.ndim == 2:
            cols = torch.tensor(columns)
            pick = torch.stack([cols[torch.randperm(len(cols), generator=g)[:k]].sort().values for _ in range(p.shape[0])])
            index = pick if layout == ROWS else (torch.arange(p.shape[0])[:, None] * p.shape[1] + pick).flatten()
            entries[name] = Entries(layout, tuple(p.shape), index)
    return Selection(entries, sum(p.numel() for p in model.parameters()), "manual", {})


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """``fn()`` and the bytes of the tensors autograd saves for backward while it runs (parameters excluded)."""
    total, seen = 0, set()

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _value_grads(model, x, y, autocast=False):
    for p in mp.trainable_parameters(model):
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in mp.trainable_parameters(model)]


@pytest.mark.parametrize("layout", [ROWS, FLAT])
@pytest.mark.parametrize("autocast", [False, True])
def test_column_gradient_equals_dense_autograd_gathered(vit, vit_batches, layout, autocast, monkeypatch):
    import medseg_peft.tuning.delta as delta_module

    x, y = vit_batches[0]
    compact = mp.attach(copy.deepcopy(vit), _few_columns(vit, layout))
    assert all(d.columns is not None and d.columns.tolist() == [1, 5, 6] for d in tuning_state(compact).deltas.values())
    with torch.no_grad():
        for p in mp.trainable_parameters(compact):
            p.normal_(0, 0.05)
    monkeypatch.setattr(delta_module, "COMPACT_BELOW", -1.0)  # the whole-input path, built the same way
    dense = mp.attach(copy.deepcopy(vit), _few_columns(vit, layout))
    assert all(d.columns is None for d in tuning_state(dense).deltas.values())
    with torch.no_grad():
        for a, b in zip(mp.trainable_parameters(dense), mp.trainable_parameters(compact)):
            a.copy_(b)
    loss_c, grads_c = _value_grads(compact, x, y, autocast)
    loss_d, grads_d = _value_grads(dense, x, y, autocast)
    assert torch.equal(loss_c, loss_d)  # the forward is untouched
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-7)
    for a, b in zip(grads_c, grads_d):
        torch.testing.assert_close(a, b, **tol)
    # and both equal plain autograd through the parametrization (no lean Linear at all), gathered at the entries
    if not autocast:
        for m in [m for m in dense.modules() if "forward" in vars(type(m)) and type(m).__name__ == "Linear" and hasattr(m, "parametrizations")]:
            del type(m).forward
        _, plain = _value_grads(dense, x, y)
        for a, b in zip(grads_c, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compact_path_saves_only_the_columns(vit, vit_batches, monkeypatch):
    import medseg_peft.tuning.delta as delta_module

    x, y = vit_batches[0]
    compact = mp.attach(copy.deepcopy(vit), _few_columns(vit, ROWS))
    _, few = _saved_bytes(lambda: F.cross_entropy(compact(x), y))
    monkeypatch.setattr(delta_module, "COMPACT_BELOW", -1.0)
    dense = mp.attach(copy.deepcopy(vit), _few_columns(vit, ROWS))
    _, full = _saved_bytes(lambda: F.cross_entropy(dense(x), y))
    tokens, fp32 = 17, 4  # 16 patches + the cls token
    linears = {n: m.in_features for n, m in dense.named_modules() if ".blocks." in f".{n}" and isinstance(m, torch.nn.Linear)}
    # qkv, fc1, fc2 keep 3 of their input columns instead of all; proj's input is attention's output, which
    # scaled-dot-product attention keeps for its own backward anyway, so there the 3 columns are an extra copy
    fewer = sum(i - 3 for n, i in linears.items() if not n.endswith("proj")) - 3 * sum(1 for n in linears if n.endswith("proj"))
    assert full - few == x.shape[0] * tokens * fp32 * fewer


def test_compact_deltas_train_only_their_entries_and_round_trip(vit, vit_batches, tmp_path):
    base = copy.deepcopy(vit)
    model = mp.attach(vit, _few_columns(vit, ROWS))
    train_steps(model, vit_batches, steps=2)
    masks = tuning_state(model).selection.masks()
    x = vit_batches[0][0]
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    path = mp.save_delta(model, tmp_path / "d.safetensors")
    mp.merge(model)
    with torch.no_grad():
        assert torch.equal(model(x), tuned)
    after = dict(model.named_parameters())
    for name, p0 in base.named_parameters():
        if name in masks:  # the block weights: only their selected entries moved
            m = masks[name]
            assert torch.equal(after[name][~m], p0[~m]) and not torch.equal(after[name][m], p0[m]), name
        else:
            assert torch.equal(after[name], p0), name
    mp.unmerge(model)
    fresh = mp.load_delta(copy.deepcopy(base), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)


# ---- Conv2d deltas: patch columns, input channels, or the whole input; never a weight copy --------------
def _conv_selection(conv, layout: str, columns, k=2, seed=0) -> Selection:
    """``k`` entries per output row of ``conv``'s weight (viewed ``[out, in * kh * kw]``) among ``columns``; the bias whole."""
    g = torch.Generator().manual_seed(seed)
    out, n_cols = conv.weight.shape[0], conv.weight[0].numel()
    cols = torch.tensor(columns)
    pick = torch.stack([cols[torch.randperm(len(cols), generator=g)[:k]].sort().values for _ in range(out)])
    index = pick if layout == ROWS else (torch.arange(out)[:, None] * n_cols + pick).flatten()
    entries = {"0.weight": Entries(layout, tuple(conv.weight.shape), index)}
    if conv.bias is not None:
        entries["0.bias"] = Entries(WHOLE, tuple(conv.bias.shape), None)
    return Selection(entries, sum(p.numel() for p in conv.parameters()), "manual", {})


def _conv_twins(conv, selection, monkeypatch):
    """The conv attached three ways, the same delta values in each: its own forward, that forward with no
    compact path (``COMPACT_BELOW`` < 0: the whole input saved), and plain autograd through the parametrization."""
    import medseg_peft.tuning.delta as delta_module

    lean = mp.attach(torch.nn.Sequential(copy.deepcopy(conv)), selection)
    monkeypatch.setattr(delta_module, "COMPACT_BELOW", -1.0)
    dense = mp.attach(torch.nn.Sequential(copy.deepcopy(conv)), selection)
    plain = mp.attach(torch.nn.Sequential(copy.deepcopy(conv)), selection)
    monkeypatch.undo()
    del type(plain[0]).forward  # nn.Conv2d.forward: F.conv2d of the effective weight, as autograd saves it
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for ps in zip(*(mp.trainable_parameters(m) for m in (lean, dense, plain))):
            noise = torch.randn(ps[0].shape, generator=g) * 0.1
            for p in ps:
                p.copy_(noise)
    return lean, dense, plain


def _conv_step(model, x, autocast=False):
    """Forward + a fixed random loss; the output, the bytes saved for backward, and the gradients of the delta values and of ``x``."""
    x = x.detach().clone().requires_grad_(True)
    for p in mp.trainable_parameters(model):
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, saved = _saved_bytes(lambda: model(x))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * weights).sum().backward()
    return out.detach(), saved, [p.grad.clone() for p in mp.trainable_parameters(model)] + [x.grad.clone()]


def _assert_same_step(results, autocast=False) -> None:
    (out_a, _, grads_a), *rest = results
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    for out_b, _, grads_b in rest:
        assert torch.equal(out_a, out_b)  # the forward is untouched: the same effective weight, bit for bit
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("layout", [ROWS, FLAT])
@pytest.mark.parametrize("autocast", [False, True])
def test_patch_conv_column_gradient_equals_the_dense_one(layout, autocast, monkeypatch):
    from medseg_peft.tuning.delta_conv import patch_like

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, kernel_size=4, stride=4)  # a patch embedding: 64 columns per row
    lean, dense, plain = _conv_twins(conv, _conv_selection(conv, layout, columns=(1, 5, 6, 17, 40)), monkeypatch)
    delta = tuning_state(lean).deltas["0.weight"]
    assert patch_like(lean[0]) and delta.columns.tolist() == [1, 5, 6, 17, 40] and tuning_state(dense).deltas["0.weight"].columns is None
    x = torch.randn(2, 4, 18, 23, generator=torch.Generator().manual_seed(1))  # rows / columns past the last whole patch
    _assert_same_step([_conv_step(m, x, autocast) for m in (lean, dense, plain)], autocast)


def test_patch_conv_saves_only_the_selected_columns(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, kernel_size=4, stride=4)
    lean, dense, plain = _conv_twins(conv, _conv_selection(conv, ROWS, columns=(1, 5, 6, 17, 40)), monkeypatch)
    x = torch.randn(2, 4, 16, 16)
    (_, few, _), (_, whole, _), (_, autograd, _) = [_conv_step(m, x) for m in (lean, dense, plain)]
    fp32, patches = 4, 2 * 4 * 4
    assert few == 5 * patches * fp32  # the 5 selected columns of each patch
    assert whole == x.numel() * fp32  # the whole input, no effective weight beside it
    assert autograd == x.numel() * fp32 + conv.weight.numel() * fp32  # plain F.conv2d also keeps the effective weight
    assert few / autograd <= 5 / 64


def test_other_convs_keep_the_whole_input_or_their_selected_channels(monkeypatch):
    from medseg_peft.tuning.delta_conv import patch_like

    fp32 = 4
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(kernel_size=3, padding=1), dict(kernel_size=4, stride=2, padding=1), dict(kernel_size=2, stride=2, padding=1),
                   dict(kernel_size=3, padding=1, groups=2)):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(8, 6, bias=False, **kwargs)
        per_channel = conv.weight[0, 0].numel()
        assert not patch_like(conv)
        # entries spread over every input channel: the dense path, the whole input saved and no weight copy
        spread = [c * per_channel for c in range(conv.weight.shape[1])]
        lean, dense, plain = _conv_twins(conv, _conv_selection(conv, ROWS, columns=spread, k=len(spread)), monkeypatch)
        results = [_conv_step(m, x) for m in (lean, dense, plain)]
        _assert_same_step(results)
        assert results[0][1] == results[1][1] == x.numel() * fp32, kwargs
        assert results[2][1] == (x.numel() + conv.weight.numel()) * fp32
        # entries in input channels 1 and 3 only (one group): those two channels are saved
        few = [1 * per_channel, 3 * per_channel + per_channel - 1]
        lean, dense, plain = _conv_twins(conv, _conv_selection(conv, FLAT, columns=few), monkeypatch)
        results = [_conv_step(m, x) for m in (lean, dense, plain)]
        _assert_same_step(results)
        assert results[1][1] == x.numel() * fp32
        assert results[0][1] == (x.numel() * 2 // 8 if conv.groups == 1 else x.numel()) * fp32, kwargs


def test_sam_conv_deltas_give_the_plain_gradients():
    """FPS on a tiny SAM: its patch embedding and neck convs train sparse entries; every gradient is plain autograd's."""
    x, y = _sam_batch()
    torch.manual_seed(0)
    model = mp.FPS(k=2)(sam_segmenter("tiny"), [(x, y)])
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if "forward" in vars(type(m)) and hasattr(m, "parametrizations"):
            del type(m).forward
    convs = [n for n, d in tuning_state(model).deltas.items() if d.index is not None and len(d.shape) == 4]
    assert any("patch_embed" in n for n in convs) and any("neck" in n for n in convs)
    with torch.no_grad():
        for a, b in zip(mp.trainable_parameters(model), mp.trainable_parameters(plain)):
            a.normal_(0, 0.02)
            b.copy_(a)
    grads = []
    for m in (model, plain):
        m.train()
        _seg_loss(m(x), y).backward()
        grads.append([p.grad for p in mp.trainable_parameters(m)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _sam_batch():
    g = torch.Generator().manual_seed(5)
    return torch.rand(2, 3, 64, 64, generator=g) * 255, (torch.rand(2, 1, 64, 64, generator=g) > 0.6).float()


def _seg_loss(out, y):
    return F.binary_cross_entropy_with_logits(out, y)


def _same_step_less_saved(plain, ckpt, x, y) -> None:
    """One training step of each: the same loss and gradients, and fewer bytes saved with checkpointing."""
    results = []
    for model in (plain, ckpt):
        model.train()
        for p in mp.trainable_parameters(model):
            p.grad = None
        torch.manual_seed(0)  # the same dropout / drop-path draws in both runs (SPT's branches)
        loss, saved = _saved_bytes(lambda: _seg_loss(model(x), y))
        loss.backward()
        results.append((loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in mp.trainable_parameters(model)], saved))
    (loss_p, grads_p, saved_p), (loss_c, grads_c, saved_c) = results
    assert torch.equal(loss_p, loss_c)
    for a, b in zip(grads_p, grads_c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert saved_c < saved_p


@pytest.mark.parametrize("mode", [True, "selective"])
@pytest.mark.parametrize("method", ["fps", "lora", "spt_adapter", "compact"])
def test_checkpointing_gives_the_same_loss_and_gradients(method, mode, vit, vit_batches):
    x, y = _sam_batch()
    torch.manual_seed(0)
    base = sam_segmenter("tiny")
    make = {
        "fps": lambda m: mp.FPS(k=2)(m, [(x, y)]),
        "lora": lambda m: mp.LoRA(rank=2)(m),
        "spt_adapter": lambda m: mp.SPT(budget=2000, rank=2, structured="adapter", loss=_seg_loss)(m, [(x, y)]),
        "compact": lambda m: mp.attach(m, _few_columns(m, ROWS, columns=(0, 3), k=1)),
    }[method]
    plain, ckpt = make(copy.deepcopy(base)), make(copy.deepcopy(base))
    with torch.no_grad():
        for a, b in zip(mp.trainable_parameters(plain), mp.trainable_parameters(ckpt)):
            a.normal_(0, 0.02)
            b.copy_(a)
    mp.activation_checkpointing(ckpt, mode)
    _same_step_less_saved(plain, ckpt, x, y)  # the blocks' insides are recomputed, not kept (selective: cached outside these hooks)
    # the base is untouched by the second forward of each block, and evaluation takes the plain path
    if method != "spt_adapter":
        mp.merge(ckpt), mp.merge(plain)
        for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
            assert torch.equal(a, b), n
    mp.activation_checkpointing(ckpt, enabled=False)
    assert all("forward" not in vars(m) for m in ckpt.modules())


def test_checkpointing_needs_blocks_and_a_known_mode():
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        mp.activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), "all")
    with pytest.raises(ValueError, match="no transformer blocks"):
        mp.activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert isinstance(mp.activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), enabled=False), torch.nn.Sequential)


# ---- a frozen base in bf16 ------------------------------------------------------------------
def _linear_base_bytes(model):
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("method", ["fps", "lora"])
def test_bf16_base_halves_the_frozen_linears_and_trains_in_fp32(vit, vit_batches, method, tmp_path):
    x, y = vit_batches[0]
    make = (lambda m: mp.FPS(k=2)(m, vit_batches)) if method == "fps" else (lambda m: mp.LoRA(rank=2)(m))
    model = make(copy.deepcopy(vit))
    linear_bytes = sum(p.numel() * 4 for n, p in vit.named_parameters() if n.endswith(".weight") and p.ndim == 2 and ".blocks." in f".{n}")
    before = sum(t.numel() * t.element_size() for t in model.parameters())
    mp.cast_base(model, "bfloat16")
    after = sum(t.numel() * t.element_size() for t in model.parameters())
    assert before - after == linear_bytes // 2  # the blocks' Linear bases (all frozen) at 2 bytes; the head trains whole
    assert all(p.dtype == torch.float32 for p in mp.trainable_parameters(model))
    # the fp32 step computes with bf16(base) + fp32 delta: the same as an fp32 model whose base was rounded once
    reference = make(copy.deepcopy(vit))
    with torch.no_grad():
        for (n, p), q in zip(reference.named_parameters(), model.parameters()):
            p.copy_(q.float())
    train_steps(model, vit_batches, steps=2)
    train_steps(reference, vit_batches, steps=2)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
        tuned = model(x)
    path = mp.save_delta(model, tmp_path / "d.safetensors")
    # merge: the fp32 result of bf16 base + delta after casting the base up (exact), or bf16 weights without
    twin = copy.deepcopy(model)
    mp.merge(mp.cast_base(model, torch.float32))
    with torch.no_grad():
        if method == "fps":
            assert torch.equal(model(x), tuned)
        else:  # (W + BA) x vs W x + B(A x): the same function, rounded differently
            torch.testing.assert_close(model(x), tuned, rtol=1e-5, atol=1e-5)
    mp.merge(twin)
    assert twin.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    # the delta file loads onto the plain fp32 base it came from (fingerprinted at bf16)
    fresh = mp.load_delta(copy.deepcopy(vit), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tuned, rtol=1e-2, atol=1e-2)


def test_bf16_base_under_autocast_and_in_the_bundle(vit, vit_batches, tmp_path, monkeypatch):
    model = mp.cast_base(mp.FPS(k=1)(vit, vit_batches))
    x, y = vit_batches[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mp.trainable_parameters(model) if p.grad is not None)
    with pytest.raises(ValueError, match="base_dtype must be one of"):
        mp.cast_base(model, "int4")

    import json

    from conftest import run_workflow

    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    wf = run_workflow("polyp_fps.json", output_dir=str(out), epochs=1, synthetic_images=16, batch_size=4, image_size=64,
                      select_batches=2, num_workers=0, base_dtype="bfloat16", checkpointing=True)
    network = wf.parser.get_parsed_content("network")
    assert network.sam.image_encoder.blocks[0].attn.qkv.parametrizations.weight.original.dtype == torch.bfloat16
    assert "forward" in vars(network.sam.image_encoder.blocks[0])  # checkpointed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["base_dtype"] == "bfloat16" and metrics["settings"]["checkpointing"] is True
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]


# ---- TinyViT (LiteMedSAM, MobileSAM) ---------------------------------------------------------
@pytest.mark.parametrize("mode", [True, "selective"])
@pytest.mark.parametrize("method", ["fps", "full"])
def test_tiny_vit_checkpointing_gives_the_same_loss_and_gradients(method, mode):
    from medseg_peft.models.tiny_vit import MBConv, PatchMerging, TinyViTBlock

    x, y = _sam_batch()
    torch.manual_seed(0)
    base = sam_segmenter("tiny_lite")
    make = (lambda m: mp.FPS(k=1)(m, [(x, y)])) if method == "fps" else (lambda m: mp.Full()(m))
    plain, ckpt = make(copy.deepcopy(base)), make(copy.deepcopy(base))
    with torch.no_grad():  # non-zero deltas (FPS), the same in both
        for a, b in zip(mp.trainable_parameters(plain), mp.trainable_parameters(ckpt)):
            a.add_(torch.randn_like(a) * 0.02)
            b.copy_(a)
    mp.activation_checkpointing(ckpt, mode)
    wrapped = {type(m) for m in ckpt.modules() if "forward" in vars(m)}
    assert wrapped == {MBConv, TinyViTBlock}  # every block of every stage; the patch mergings stay plain
    assert not any("forward" in vars(m) for m in ckpt.modules() if isinstance(m, PatchMerging))
    _same_step_less_saved(plain, ckpt, x, y)
    # BatchNorm statistics stay the pre-trained ones through the recomputed forward
    for (n, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(a, b), n
    mp.activation_checkpointing(ckpt, enabled=False)
    assert all("forward" not in vars(m) for m in ckpt.modules())
