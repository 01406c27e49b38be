"""The sixth method, added as README's "how to add a method" says: one module, one bundle layer, these tests."""

import json

import pytest
import torch

import medseg_peft as mp
from conftest import run_workflow
from medseg_peft.selection.random_k import RandomK


def test_random_selection_is_k_per_row_and_reproducible_from_the_seed(vit):
    sel = RandomK(k=3, seed=7).select(vit)
    fps = mp.FPS(k=3).select(vit, [(torch.randn(2, 3, 32, 32), None)])
    assert set(sel.entries) == set(fps.entries)  # the same eligibility and whole-tensor roles as FPS / GPS
    assert sel.num_trainable == fps.num_trainable
    for name, e in sel.entries.items():
        if e.index is not None:
            assert e.index.shape[1] == 3 and all(len(set(row.tolist())) == 3 for row in e.index)
    assert RandomK(k=3, seed=7).select(vit).digest() == sel.digest()
    assert RandomK(k=3, seed=8).select(vit).digest() != sel.digest()


def test_random_is_registered_and_strict():
    assert isinstance(mp.selector("random", k=2, seed=1), RandomK)
    with pytest.raises(TypeError, match=r"takes no setting\(s\) \['loss'\]"):
        mp.selector("random", k=2, loss="ce")
    with pytest.raises(ValueError, match="integer seed"):
        RandomK(k=1, seed=None)


def test_random_layer_runs_in_the_polyp_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run_workflow(["polyp_fps.json", "methods/random.json"], output_dir=str(out), epochs=1, synthetic_images=16, batch_size=4,
                 image_size=64, select_batches=2, num_workers=0)
    saved = mp.Selection.load(out / "selection.safetensors")
    assert saved.method == "random" and saved.hparams["k"] == 8 and saved.hparams["seed"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "random" and [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert (out / "best_delta.safetensors").is_file()
