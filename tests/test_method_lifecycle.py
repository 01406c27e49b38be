"""Every registered method through the whole life cycle on the tiny ViT (the tiny SAM where a method needs SAM):
select, make trainable, train, save, load onto a fresh base, merge, unmerge.

TinyViT-SAM has its own cycle test (``test_tiny_vit_methods``); this one adds the delta file and the way back to
the base. How exactly each method comes back is part of the parametrization:

- ``EXACT``: sparse / whole-tensor deltas. The tuned forward adds the delta into the weight the same way ``merge``
  does, so the merged model computes the tuned outputs bit for bit.
- ``ROUNDED``: LoRA branches (LoRA, SPT's structured units). The tuned forward adds ``(x A^T) B^T`` to the layer's
  output; the merged weight holds ``W + B A``: the same sum in another order, equal to float rounding.
- ``IN_PLACE``: full and decoder fine-tuning unfreeze the model's own weights instead of attaching deltas. There is
  nothing to merge or unmerge (the trained weights are the model, the base values are overwritten), and no delta
  file: the result is the whole state_dict, written by ``save_tuned`` and read back by ``load_tuned``.

For every method other than these, ``unmerge`` restores the base bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import medseg_peft as mp
from conftest import tiny_sam, tiny_vit, train_steps
from medseg_peft.selection.registry import _import_methods
from medseg_peft.tuning import is_attached, load_tuned, save_tuned

_import_methods()  # every registered method, so a new one fails the coverage test below until it is listed

EXACT, ROUNDED, IN_PLACE = "exact", "rounded", "in_place"

CASES = [
    pytest.param("fps", {"k": 2}, "vit", EXACT, id="fps"),
    pytest.param("gps", {"k": 2, "loss": "ce"}, "vit", EXACT, id="gps"),
    pytest.param("random", {"k": 2}, "vit", EXACT, id="random"),
    pytest.param("partial", {"strategy": "attn"}, "vit", EXACT, id="partial"),
    pytest.param("lora", {"rank": 2}, "vit", ROUNDED, id="lora"),
    pytest.param("spt", {"budget": 3000, "rank": 2}, "vit", ROUNDED, id="spt"),
    pytest.param("full", {}, "vit", IN_PLACE, id="full"),
    pytest.param("decoder", {}, "sam", IN_PLACE, id="decoder"),  # SAM's prompt encoder and mask decoder: SAM only
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models of a few thousand weights run faster on one thread than on several contending for a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str):
    return tiny_vit() if kind == "vit" else tiny_sam()


def _batches(kind: str, vit_batches, sam_batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return vit_batches if kind == "vit" else [(b["image"], b["label"]) for b in sam_batches]


def _train(model, batches, kind: str) -> None:
    """AdamW steps on the trainable part: conftest's loop for the classifier, the same with BCE for SAM's masks."""
    if kind == "vit":
        train_steps(model, batches, steps=2)
    else:
        opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=5e-2, weight_decay=0.01)
        model.train()
        for _ in range(2):
            for x, y in batches:
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(model(x), y).backward()
                opt.step()
    model.eval()


def _assert_only_selected_moved(params: dict[str, torch.Tensor], base: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    assert params.keys() == base.keys()
    moved_any = False
    for name, old in base.items():
        moved = params[name].detach() != old
        assert not (moved & ~masks.get(name, torch.zeros_like(moved))).any(), f"{name} moved outside the selection"
        moved_any |= bool(moved.any())
    assert moved_any, "training changed no selected entry"


def test_every_registered_method_has_a_life_cycle_case():
    assert {case.values[0] for case in CASES} == set(mp.METHODS)


@pytest.mark.parametrize("method,settings,kind,comes_back", CASES)
def test_life_cycle(method, settings, kind, comes_back, vit_batches, sam_batches, tmp_path):
    batches = _batches(kind, vit_batches, sam_batches)
    x = batches[0][0]
    model = _model(kind)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base_out = model.eval()(x)

    selector = mp.selector(method, **settings)
    selection = selector.select(model, batches)
    assert selection.method == method and selection.num_trainable > 0
    model = selector.apply(model, selection)
    assert is_attached(model) == (comes_back != IN_PLACE)
    _train(model, batches, kind)
    with torch.no_grad():
        tuned = model(x)
    assert not torch.equal(tuned, base_out)  # the training reached the outputs

    if comes_back == IN_PLACE:
        _assert_only_selected_moved(dict(model.named_parameters()), base, selection.masks())
        with pytest.raises(ValueError, match="no attached deltas"):
            mp.save_delta(model, tmp_path / "delta.safetensors")
        save_tuned(model, tmp_path / "tuned.safetensors")
        fresh = load_tuned(_model(kind), tmp_path / "tuned.safetensors").eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), tuned)
        return

    # only the deltas train; the base tensors under them stay frozen
    deltas = {id(p) for p in mp.trainable_parameters(model)}
    assert deltas and all(p.requires_grad == (id(p) in deltas) for p in model.parameters())
    mp.save_delta(model, tmp_path / "delta.safetensors")
    fresh = mp.load_delta(_model(kind), tmp_path / "delta.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)

    mp.merge(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # the plain network
    with torch.no_grad():
        merged = model(x)
    if comes_back == EXACT:
        assert torch.equal(merged, tuned)
    else:
        torch.testing.assert_close(merged, tuned, rtol=1e-5, atol=1e-5)
    # the merged weights differ from the base at selected entries only
    _assert_only_selected_moved(dict(model.named_parameters()), base, selection.masks())

    mp.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(x), tuned)  # the same deltas attached again
    mp.detach(model)  # takes the (unmerged) deltas off: what remains is the base as unmerge restored it
    after = dict(model.named_parameters())
    assert after.keys() == base.keys()
    assert all(torch.equal(after[n], base[n]) for n in base), [n for n in base if not torch.equal(after[n], base[n])]
