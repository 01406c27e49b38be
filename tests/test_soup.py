"""Model soups average what each tuned run changed, over a shared base."""

import copy

import pytest
import torch
import torch.nn.functional as F

import medseg_peft as mp
from conftest import train_steps


def _tuned(base, batches, method, seed, steps=2):
    model = method(copy.deepcopy(base), batches)
    torch.manual_seed(seed)
    train_steps(model, batches, steps)
    return model


def _merged_params(model):
    m = copy.deepcopy(model)
    mp.merge(m)
    return dict(m.named_parameters())


def test_uniform_soup_averages_changes(vit, vit_batches, tmp_path):
    a = _tuned(vit, vit_batches, mp.FPS(k=2), seed=1)
    b = _tuned(vit, vit_batches, mp.GPS(k=2, loss="ce", seed=3), seed=2)  # other entries: changes still mix
    base = dict(vit.named_parameters())
    pa, pb = _merged_params(a), _merged_params(b)
    soup = mp.soup([a, b])
    assert not mp.tuning.is_attached(soup)
    for name, p in soup.named_parameters():
        expected = base[name] + (0.5 * (pa[name] - base[name]) + 0.5 * (pb[name] - base[name]))
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    # delta files with the base model give the same soup
    files = [mp.save_delta(m, tmp_path / f"{i}.safetensors") for i, m in enumerate((a, b))]
    from_files = mp.soup(files, base=vit)
    assert all(torch.equal(p, q) for p, q in zip(from_files.parameters(), soup.parameters()))
    weighted = mp.soup([a, b], weights=[1.0, 0.0])
    assert all(torch.allclose(weighted.state_dict()[k], pa[k], atol=1e-6) for k in pa)


def test_greedy_soup_keeps_only_helpful_ingredients(vit, vit_batches):
    good = _tuned(vit, vit_batches, mp.FPS(k=2), seed=1)
    bad = mp.FPS(k=2)(copy.deepcopy(vit), vit_batches)
    with torch.no_grad():
        for p in mp.trainable_parameters(bad):
            p.normal_(0, 5.0)  # a ruined run
    x, y = vit_batches[0]
    score = lambda m: -F.cross_entropy(m.eval()(x), y).item()
    soup = mp.soup([bad, good], evaluate=score)
    pg = _merged_params(good)
    assert all(torch.allclose(soup.state_dict()[k], pg[k], atol=1e-6) for k in pg)


def test_soup_bad_input(vit, vit_batches, tmp_path):
    a = _tuned(vit, vit_batches, mp.FPS(k=1), seed=1, steps=1)
    with pytest.raises(ValueError, match="pass base="):
        mp.soup([mp.save_delta(a, tmp_path / "a.safetensors")])
    with pytest.raises(ValueError, match="carries no deltas"):
        mp.soup([vit])
    with pytest.raises(ValueError, match="2 weights for 1"):
        mp.soup([a], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="at least one"):
        mp.soup([])


def test_soup_refuses_ingredients_of_another_base(vit, vit_batches):
    from conftest import tiny_vit

    a = _tuned(vit, vit_batches, mp.FPS(k=1), seed=1, steps=1)
    other = _tuned(tiny_vit(seed=42), vit_batches, mp.FPS(k=1), seed=1, steps=1)
    with pytest.raises(ValueError, match="another base model"):
        mp.soup([a, other])
