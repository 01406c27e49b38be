"""An exported organ bundle trained the way MONAI Label's ``monaibundle`` app trains it, with no server.

``train_request`` does what ``BundleTrainTask.__call__`` (monailabel/tasks/train/bundle.py) does for one
process: it reads ``configs/train.json`` with ``bundle_root`` set, splits the datastore items by
``val_split`` with MONAI's ``partition_dataset``, puts a ``CheckpointLoader`` of ``models/model.pt``
first in the config's own ``train#handlers`` list, and calls ``monai.bundle.run`` with the ``run`` list
only and exactly its override keys: ``bundle_root``, ``train#trainer#max_epochs``, ``train#dataset#data``,
``device``, ``train#handlers``, ``displayable_configs`` and ``validate#dataset#data``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import error_chain, export_organ_bundle

TINY = dict(epochs=1, val_interval=1, synthetic_volumes=4, volumes_per_batch=2, slices_per_volume=4, image_size=64, select_batches=2)


def train_request(bundle: Path, datalist: list[dict], request: dict) -> None:
    import monai.bundle
    from monai.bundle import ConfigParser
    from monai.data import partition_dataset

    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "train.json"))
    config.config.update({"bundle_root": str(bundle)})
    val_split = request.get("val_split", 0.2)
    if val_split > 0.0:
        train_ds, val_ds = partition_dataset(datalist, ratios=[(1 - val_split), val_split], shuffle=False)
    else:
        train_ds, val_ds = datalist, (None if val_split < 0 else [])
    handlers = config.get("train#handlers", [])
    model = bundle / "models" / "model.pt"
    if request.get("pretrained", True) and model.exists():
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(model), "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {"bundle_root": str(bundle), "train#trainer#max_epochs": request.get("max_epochs", 50), "train#dataset#data": train_ds,
                 "device": "cpu", "train#handlers": handlers}
    if config.get("displayable_configs"):
        shown = config.get_parsed_content("displayable_configs", instantiate=True)
        overrides["displayable_configs"] = {c: request[c] for c in shown.keys()}
    if val_ds is not None:
        overrides["validate#dataset#data"] = val_ds
    sys.path.insert(0, str(bundle))
    try:
        monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=str(bundle / "configs" / "metadata.json"),
                         config_file=str(bundle / "configs" / "train.json"), **overrides)
    finally:
        sys.path.remove(str(bundle))


def infer(bundle: Path, images: Path, out: Path) -> dict[str, np.ndarray]:
    """The exported inference config run as MONAI Label's infer task would load it: from the bundle, no medseg_peft needed."""
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", str(images), "--output_dir", str(out)],
                          cwd=bundle, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny organ run and its exported bundle, and the synthetic volumes as a datastore."""
    bundle, cache = export_organ_bundle(tmp_path_factory.mktemp("loop"), **TINY)
    images = sorted(cache.glob("*/imagesTr/*.nii.gz"))
    datalist = [{"image": str(p), "label": str(p.parent.parent / "labelsTr" / p.name)} for p in images][:3]
    return bundle, datalist, images[0].parent


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_two_rounds_train_from_the_datastore_and_the_next_infer_uses_them(exported, tmp_path):
    from medseg_peft.workflows.label_loop import saved_network
    from medseg_peft.workflows.run_folder import base_fingerprint

    source, datalist, images = exported
    bundle = copy_of(source, tmp_path)
    shown = json.loads((bundle / "configs" / "train.json").read_text())["displayable_configs"]
    assert shown["method"][0] == "fps" and {"method", "k", "lr"} == set(shown)
    run_lr = json.loads((source.parent / "metrics.json").read_text())["settings"]["lr"]
    assert shown["lr"] == pytest.approx(run_lr / 10)  # a round continues a tuned model on a few volumes
    exported_model = digest(bundle / "models" / "model.pt")
    zero_shot = infer(bundle, images, tmp_path / "zero_shot")

    # round 1: three volumes, none left for validation: the round keeps its last epoch and reports no score
    train_request(bundle, datalist, {"max_epochs": 3, "val_split": 0.0, "method": "fps", "k": 8, "lr": 1e-2})
    first = json.loads((bundle / "rounds" / "round_1" / "round.json").read_text())
    assert first["method"] == "fps" and not first["validated"] and first["best"] is None and first["zero_shot"] is None
    assert digest(bundle / "models" / "model.pt") != exported_model and (bundle / "models" / "delta.safetensors").is_file()
    assert digest(bundle / "rounds" / "round_1" / "previous_model.pt") == exported_model  # a round can be undone
    settings = json.loads((bundle / "configs" / "train.json").read_text())["network_settings"]
    after_one = saved_network(bundle / "models" / "model.pt", **settings)
    labels = infer(bundle, images, tmp_path / "round_1")
    assert labels.keys() == zero_shot.keys() and any((labels[k] != zero_shot[k]).any() for k in labels)

    # round 2: from round 1's merged model, another method picked in the panel, one validation volume
    train_request(bundle, datalist, {"max_epochs": 1, "val_split": 0.34, "method": "lora", "k": 4, "lr": 2e-3})
    second = json.loads((bundle / "rounds" / "round_2" / "round.json").read_text())
    assert second["method"] == "lora" and second["validated"] and second["zero_shot"]["mDice"] >= 0
    run = json.loads((bundle / "rounds" / "round_2" / "run.json").read_text())
    exported_base = json.loads((bundle / "rounds" / "round_1" / "run.json").read_text())["base_model"]
    assert run["base_model"] == base_fingerprint(after_one) != exported_base  # round 2 trained from round 1's result
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["version"] == "0.1.2"
    assert (bundle / "models" / "model.ts").is_file() and not list((bundle / "models").glob("*.pt2"))


def test_a_round_while_another_runs_is_refused_and_a_stale_lock_is_taken_over(exported, tmp_path):
    source, datalist, _ = exported
    bundle = copy_of(source, tmp_path)
    (bundle / "rounds").mkdir(exist_ok=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (bundle / "rounds" / ".lock").write_text(str(other.pid))
        with pytest.raises(Exception) as err:
            train_request(bundle, datalist, {"max_epochs": 1, "val_split": 0.0, "method": "fps", "k": 4, "lr": 1e-3})
        assert f"in use by another run (pid {other.pid})" in error_chain(err.value)
        assert not (bundle / "rounds" / "round_1").exists()
    finally:
        other.kill()
        other.wait()
    train_request(bundle, datalist[:1], {"max_epochs": 1, "val_split": 0.0, "method": "fps", "k": 4, "lr": 1e-3})  # its pid is gone
    assert json.loads((bundle / "rounds" / "round_1" / "round.json").read_text())["round"] == 1
    assert not (bundle / "rounds" / ".lock").exists()


@pytest.mark.parametrize("case,message", [
    ("empty", "no labelled volume to train on"),
    ("label value", "organs_000"),
])
def test_bad_datastore_input_is_named_before_any_training(exported, tmp_path, case, message):
    source, datalist, _ = exported
    bundle = copy_of(source, tmp_path)
    before = digest(bundle / "models" / "model.pt")
    items = []
    if case == "label value":
        label = nib.load(datalist[0]["label"])
        bad = np.asanyarray(label.dataobj).copy()
        bad[0, 0, 0] = 9  # no class 9
        path = tmp_path / "organs_000.nii.gz"
        nib.save(nib.Nifti1Image(bad, label.affine), path)
        items = [{"image": datalist[0]["image"], "label": str(path)}]
    with pytest.raises(Exception) as err:
        train_request(bundle, items, {"max_epochs": 1, "val_split": 0.0, "method": "fps", "k": 4, "lr": 1e-3})
    assert message in error_chain(err.value)
    assert digest(bundle / "models" / "model.pt") == before
    if case == "label value":  # MONAI Label runs a round in its own process: the failed round's lock must not block the next
        train_request(bundle, datalist[:1], {"max_epochs": 1, "val_split": 0.0, "method": "fps", "k": 4, "lr": 1e-3})
        assert json.loads((bundle / "rounds" / "round_2" / "round.json").read_text())["round"] == 2
        assert digest(bundle / "models" / "model.pt") != before


def test_the_multi_gpu_round_runs_as_monai_labels_torchrun_command(exported, tmp_path):
    """MONAI Label's multi-GPU path: the config with its overrides written to configs/monailabel_train.json, then
    ``torchrun -m monai.bundle run run`` over it and configs/multi_gpu_train.json (here 2 CPU processes, gloo)."""
    from monai.bundle import ConfigParser

    source, datalist, images = exported
    bundle = copy_of(source, tmp_path)
    items = [{"image": str(p), "label": str(p.parent.parent / "labelsTr" / p.name)} for p in sorted(images.glob("*.nii.gz"))]
    config = ConfigParser()
    config.read_config(str(bundle / "configs" / "train.json"))
    overrides = {"bundle_root": str(bundle), "train#trainer#max_epochs": 1, "train#dataset#data": items[:2], "device": "cpu",
                 "train#handlers": config.get("train#handlers", []), "validate#dataset#data": items[2:4],
                 "displayable_configs": {"method": "fps", "k": 4, "lr": 1e-3}}
    for key, value in overrides.items():
        config.set(value, key)
    train_path = bundle / "configs" / "monailabel_train.json"
    ConfigParser.export_config_file(config.config, str(train_path), indent=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                           "-m", "monai.bundle", "run", "run", "--meta_file", str(bundle / "configs" / "metadata.json"),
                           "--config_file", f"['{train_path}','{bundle / 'configs' / 'multi_gpu_train.json'}']",
                           "--logging_file", str(bundle / "configs" / "logging.conf")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rounds = sorted(p.name for p in (bundle / "rounds").iterdir() if not p.name.startswith("."))
    assert rounds == ["round_1"]  # one round for both processes
    summary = json.loads((bundle / "rounds" / "round_1" / "round.json").read_text())
    assert summary["validated"] and digest(bundle / "models" / "model.pt") != digest(source / "models" / "model.pt")
