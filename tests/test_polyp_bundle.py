"""The polyp bundles end to end at a tiny size: synthetic data, the demo model, 64 px, one or two epochs."""

import json
from pathlib import Path

import pytest
import torch

import medseg_peft as mp
from conftest import error_chain, run_workflow


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_bundle(name: str, output_dir: Path, **overrides):
    settings = dict(epochs=1, synthetic_images=16, batch_size=4, image_size=64, select_batches=2, num_workers=0)
    settings.update(overrides)
    return run_workflow(name, output_dir=str(output_dir), **settings)


METHOD_LAYERS = {  # layer -> (selector class, settings the saved selection must record)
    None: (mp.FPS, {"k": 8}),
    "methods/fps.json": (mp.FPS, {"k": 8}),
    "methods/gps.json": (mp.GPS, {"k": 8, "loss": "DiceCELoss"}),
    "methods/full.json": (mp.Full, {}),
    "methods/lora.json": (mp.LoRA, {"rank": 4}),
    "methods/spt.json": (mp.SPT, {"budget": 50000, "rank": 4, "loss": "DiceCELoss"}),
    "methods/partial.json": (mp.Partial, {"strategy": "attn", "angle_top": None}),
}


@pytest.mark.parametrize("layer", list(METHOD_LAYERS))
def test_bundle_runs_each_method_layer_end_to_end(layer, tmp_path):
    out = tmp_path / "run"
    wf = run_bundle(["polyp_fps.json"] + ([layer] if layer else []), out)
    cls, settings = METHOD_LAYERS[layer]
    # the method that ran is the layer's: its selector, the saved selection's method and settings
    assert type(wf.parser.get_parsed_content("selector")) is cls
    saved = mp.Selection.load(out / "selection.safetensors")
    assert saved.method == cls.method and {k: saved.hparams[k] for k in settings} == settings
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == cls.method and metrics["settings"]["selector"] == saved.hparams
    assert metrics["zero_shot"]["epoch"] == 0 and "mDice" in metrics["zero_shot"] and "mIoU" in metrics["zero_shot"]
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    # the untuned model is the first candidate, so the best is never worse than zero-shot
    assert metrics["best"]["epoch"] in (0, 1) and metrics["best"]["mDice"] >= metrics["zero_shot"]["mDice"]
    assert (out / "val_contours.png").is_file() and (out / "selection.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())
    network = wf.parser.get_parsed_content("network")
    fresh = mp.models.demo_segmenter(64)
    if cls is mp.Full:
        assert metrics["tuned_percent"] == pytest.approx(100.0)
        return
    assert metrics["tuned_percent"] < 100
    # the best delta file reproduces the network of its epoch bit for bit on a fresh base model
    mp.load_delta(fresh, out / "best_delta.safetensors")
    x = torch.rand(2, 3, 64, 64) * 255
    reference = network if metrics["best"]["epoch"] == 1 else mp.models.demo_segmenter(64)
    reference.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), reference(x))


def test_method_settings_are_the_methods_own(tmp_path):
    # a setting the method does not take is an error, not silently dropped
    with pytest.raises(Exception) as info:
        run_bundle(["polyp_fps.json", "methods/lora.json"], tmp_path / "run", **{"selector#k": 2})
    assert "unexpected keyword argument 'k'" in error_chain(info.value)
    # --method does not switch a method silently: it names the layer to use
    with pytest.raises(Exception) as info:
        run_bundle("polyp_fps.json", tmp_path / "run2", method="gps")
    assert "bundles/methods/gps.json" in error_chain(info.value)
    assert not (tmp_path / "run2" / "selection.safetensors").exists()


def test_bundle_resumes_with_the_same_selection(tmp_path):
    out = tmp_path / "run"
    run_bundle("polyp_fps.json", out, epochs=1)
    selection_bytes = (out / "selection.safetensors").read_bytes()
    wf = run_bundle("polyp_fps.json", out, epochs=2)
    assert (out / "selection.safetensors").read_bytes() == selection_bytes
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_shot"]["epoch"] == 0
    assert [h["epoch"] for h in metrics["history"]][-1] == 2
    assert sum(1 for h in metrics["history"] if h["epoch"] == 0) == 1  # zero-shot measured once
    epochs = [h["epoch"] for h in metrics["history"]]
    assert len(set(epochs)) == len(epochs)  # the re-validation at resume replaces, not repeats, its epoch


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"dataset_dir": "/no/such/folder"}, "/no/such/folder"),
        ({"selector#_target_": "medseg_peft.Lottery"}, "medseg_peft.Lottery"),
        ({"sam_checkpoint": "/no/such/sam.pth"}, "/no/such/sam.pth"),
        ({"sam_variant": "vit_xl", "sam_checkpoint": __file__}, "unknown SAM variant 'vit_xl'"),
    ],
)
def test_bad_input_stops_with_a_clear_message(tmp_path, overrides, message):
    with pytest.raises(Exception) as info:
        run_bundle("polyp_fps.json", tmp_path / "run", **overrides)
    assert message in error_chain(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
