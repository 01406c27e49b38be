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


@pytest.mark.parametrize("bundle", ["polyp_fps.json", "polyp_gps.json", "polyp_full.json", "polyp_lora.json", "polyp_spt.json", "polyp_partial.json"])
def test_bundle_runs_end_to_end(bundle, tmp_path):
    out = tmp_path / "run"
    wf = run_bundle(bundle, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["zero_shot"]["epoch"] == 0 and "mDice" in metrics["zero_shot"] and "mIoU" in metrics["zero_shot"]
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]
    assert metrics["best"]["epoch"] == 1 and 0.0 <= metrics["best"]["mDice"] <= 1.0
    assert (out / "val_contours.png").is_file() and (out / "selection.safetensors").is_file()
    assert any((out / "tensorboard").iterdir())
    network = wf.parser.get_parsed_content("network")
    fresh = mp.models.demo_segmenter(64)
    if bundle == "polyp_full.json":
        assert metrics["tuned_percent"] == pytest.approx(100.0)
        return
    assert metrics["tuned_percent"] < 100
    # the best delta file reproduces the tuned network bit for bit on a fresh base model
    mp.load_delta(fresh, out / "best_delta.safetensors")
    x = torch.rand(2, 3, 64, 64) * 255
    network.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), network(x))


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
        ({"method": "lottery"}, "unknown method 'lottery'"),
        ({"sam_checkpoint": "/no/such/sam.pth"}, "/no/such/sam.pth"),
        ({"sam_variant": "vit_xl", "sam_checkpoint": __file__}, "unknown SAM variant 'vit_xl'"),
    ],
)
def test_bad_input_stops_with_a_clear_message(tmp_path, overrides, message):
    with pytest.raises(Exception) as info:
        run_bundle("polyp_fps.json", tmp_path / "run", **overrides)
    assert message in error_chain(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
