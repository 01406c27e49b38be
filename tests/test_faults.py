"""Reliability probes: each fault reproduced on the tiny model, and the behaviour that handles it asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import medseg_peft as mp
from conftest import BUNDLES, error_chain, run_workflow
from conftest import ORGAN as ORGAN_BUNDLE
from medseg_peft.workflows.cli import check_cli_keys, unknown_keys
from medseg_peft.workflows.handlers import FiniteLoss
from medseg_peft.workflows.run_folder import RunLock

TINY = dict(epochs=1, synthetic_images=16, batch_size=4, image_size=64, select_batches=2, num_workers=0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def kvasir(root: Path, n: int = 10, mask_value: int = 255, mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True), (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"c{i}.png")
        m = np.zeros((64, 64), np.uint8)
        m[16:40, 20:44] = mask_value
        img = Image.fromarray(m)
        if mode == "RGB":  # a red mask: grey 76 after the colour-to-grey conversion
            rgb = np.zeros((64, 64, 3), np.uint8)
            rgb[16:40, 20:44, 0] = 255
            img = Image.fromarray(rgb)
        img.save(root / "masks" / f"c{i}.png")
    return root


# 1. masks whose foreground vanishes, and validation sets that measure nothing
@pytest.mark.parametrize("value,mode", [(100, "L"), (255, "RGB")])
def test_masks_that_would_binarise_to_nothing_are_refused(tmp_path, value, mode):
    data = kvasir(tmp_path / "data", mask_value=value, mode=mode)
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(tmp_path / "run"), dataset_dir=str(data), **TINY)
    assert "none above the foreground threshold" in error_chain(info.value) and "c0.png" in error_chain(info.value)
    assert not (tmp_path / "run" / "selection.safetensors").exists()


def test_an_all_empty_validation_set_is_an_error(tmp_path):
    data = kvasir(tmp_path / "data", mask_value=0)
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(tmp_path / "run"), dataset_dir=str(data), **TINY)
    assert "masks of the training set is empty" in error_chain(info.value) or "is empty: the scores would measure nothing" in error_chain(info.value)


# 2. a non-finite loss stops the run at that step, naming the inputs
def test_a_non_finite_loss_stops_naming_the_step_and_files():
    from monai.data import MetaTensor

    image = MetaTensor(torch.zeros(1, 1, 2, 2), meta={"filename_or_obj": ["/data/ct_007.nii.gz"]})
    engine = SimpleNamespace(state=SimpleNamespace(output={"loss": torch.tensor(float("nan"))}, batch={"image": image}, epoch=3, iteration=41))
    with pytest.raises(FloatingPointError, match=r"epoch 3, iteration 41; inputs: /data/ct_007.nii.gz"):
        FiniteLoss()(engine)
    engine.state.output = {"loss": torch.tensor(0.5)}
    FiniteLoss()(engine)  # a finite loss passes


# 3. checkpoints: atomic, a corrupt one is named and set aside, deleting them starts a fresh history
def test_checkpoints_survive_a_torn_write_and_a_corrupt_file_is_set_aside(tmp_path):
    out = tmp_path / "run"
    run_workflow("polyp_fps.json", output_dir=str(out), **TINY)
    ckpts = out / "checkpoints"
    assert [p.name for p in ckpts.glob("*.pt")] == ["checkpoint_epoch=1.pt"]
    (ckpts / ".checkpoint_epoch=2.pt.tmp").write_bytes(b"half a checkpoint")  # a kill during the next write leaves this
    wf = run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "epochs": 2})
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2  # resumed from epoch 1, the torn file ignored
    assert [p.name for p in ckpts.glob("*.pt")] == ["checkpoint_epoch=2.pt"]  # the previous one removed only after
    (ckpts / "checkpoint_epoch=2.pt").write_bytes(b"\x00" * 100)  # a damaged disk
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "epochs": 3})
    assert "checkpoint_epoch=2.pt cannot be loaded" in error_chain(info.value) and "set aside" in error_chain(info.value)
    assert (ckpts / "checkpoint_epoch=2.pt.corrupt").is_file()
    run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "epochs": 1})  # not a dead end: starts again
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]  # a fresh history, not appended to the old one


# 4. stale state under changed settings; the checkpoint carries its indices
def test_a_rerun_with_other_settings_stops_and_says_what_differs(tmp_path):
    out = tmp_path / "run"
    run_workflow("polyp_fps.json", output_dir=str(out), **TINY)
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "k": 1})
    message = error_chain(info.value)
    assert "holds a run made with other settings" in message and "selector" in message and "'k': 8" in message
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "select_batches": 1})
    assert "select_batches: 2 in the folder, 1 now" in error_chain(info.value)


def test_a_checkpoint_is_never_loaded_onto_other_entries(vit, vit_batches):
    from medseg_peft.workflows import TunedState

    a = mp.FPS(k=2)(vit, vit_batches)
    state = TunedState(a).state_dict()
    assert any(k.endswith(".index") for k in state)
    from conftest import tiny_vit

    b = mp.FPS(k=2)(tiny_vit(seed=5), vit_batches)  # another model: other entries
    with pytest.raises(ValueError, match="differ from the attached selection's"):
        TunedState(b).load_state_dict(state)


# 5. the last epoch is always validated
def test_a_run_whose_val_interval_skips_the_last_epoch_still_has_a_result(tmp_path):
    out = tmp_path / "run"
    run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "epochs": 2, "val_interval": 5})
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 2] and metrics["best"]["epoch"] in (0, 2)
    assert (out / "best_delta.safetensors").is_file()


# 6. one run per folder
def test_two_runs_in_one_folder_the_second_stops(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"from medseg_peft.workflows.run_folder import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
                               "import time; print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {holder.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the holder is gone: its stale lock is taken over
    assert lock.held and (tmp_path / ".lock").read_text() == str(os.getpid())
    lock.release()


# 7. misspelt command-line keys
def test_unknown_command_line_keys_name_the_nearest_valid_one():
    config = json.loads((BUNDLES / "polyp_fps.json").read_text())
    bad = unknown_keys(["epoch", "epochs", "selector#k", "train#trainer#max_epochs", "train#preprocessing#transforms#7#prob",
                        "config_file"], config)
    assert list(bad) == ["epoch"] and bad["epoch"][0] == "epochs"
    argv = ["/x/monai/bundle/__main__.py", "run", "--config_file", str(BUNDLES / "polyp_fps.json"), "--epoch", "1", "--lr=0.1"]
    with pytest.raises(ValueError, match=r"unknown setting\(s\) for this bundle: --epoch \(did you mean --epochs"):
        check_cli_keys(argv)
    check_cli_keys(argv[:4] + ["--epochs", "1"])  # valid keys pass
    check_cli_keys(["pytest", "--epoch"])  # not the MONAI command line: nothing to check


def test_the_cli_stops_a_misspelt_key_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / "polyp_fps.json"),
                           "--epoch", "1", "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "did you mean --epochs" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "selection.safetensors").exists()


# 8. errors that name the culprit, before any work, printed last
def test_truncated_images_and_impossible_settings_stop_before_selection(tmp_path):
    data = kvasir(tmp_path / "data")
    raw = (data / "images" / "c3.png").read_bytes()
    (data / "images" / "c3.png").write_bytes(raw[: len(raw) // 2])  # a truncated download
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(tmp_path / "run"), dataset_dir=str(data), **TINY)
    assert "c3.png" in error_chain(info.value) and "truncated or damaged" in error_chain(info.value)
    for overrides, message in (({"lr": "abc"}, "setting 'lr' must be a number"), ({"lr": -1}, "setting 'lr' must be positive"),
                               ({"batch_size": 64}, "the selection loader yields no batch")):
        with pytest.raises(Exception) as info:
            run_workflow("polyp_fps.json", output_dir=str(tmp_path / "run2"), **{**TINY, **overrides})
        assert message in error_chain(info.value), overrides
        assert not (tmp_path / "run2" / "selection.safetensors").exists()


def test_a_read_only_output_dir_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/medseg_peft_cannot_write_here")  # root writes anywhere else
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(target), **TINY)
    assert f"output_dir {target} is not writable" in error_chain(info.value)


def test_the_cause_is_the_last_line_a_user_sees(tmp_path):
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / "polyp_fps.json"),
                           "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode != 0
    assert len(lines) == 1 or "Traceback" not in done.stderr
    assert "nowhere does not exist" in lines[-1] and lines[-1].startswith("medseg-peft: FileNotFoundError")
    assert "Traceback" not in done.stderr  # kept at DEBUG; MEDSEG_PEFT_TRACEBACK=1 shows it


# 9. smaller: checksums, random state, the zero-shot model as the first best, cache permissions
def test_a_flipped_byte_in_a_delta_file_is_refused(vit, vit_batches, tmp_path):
    model = mp.FPS(k=1)(vit, vit_batches)
    with torch.no_grad():
        for p in mp.trainable_parameters(model):
            p.normal_(0, 0.01)
    path = mp.save_delta(model, tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # a value's byte, near the end of the tensor data
    (tmp_path / "bad.safetensors").write_bytes(bytes(raw))
    from conftest import tiny_vit

    with pytest.raises(ValueError, match="checksum: the file is damaged"):
        mp.load_delta(tiny_vit(), tmp_path / "bad.safetensors")
    mp.load_delta(tiny_vit(), path)  # the intact file loads


def test_random_state_round_trips_through_a_checkpoint():
    import random

    from medseg_peft.workflows.checkpoints import RandomState

    saved = RandomState().state_dict()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(1)  # move on
    buffer = __import__("io").BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    RandomState().load_state_dict(torch.load(buffer, weights_only=True))  # as MONAI's loader reads checkpoints
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_generated_data_folders_are_readable_by_others(tmp_path):
    from medseg_peft.data.cache import build_once

    target = build_once(tmp_path / "set", {"n": 1}, lambda folder: (folder / "x.txt").write_text("1"))
    assert target.stat().st_mode & 0o055 == 0o055 & ~os.umask(os.umask(0))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """Stopped after epoch 1 of 2 and run again: the same selection, the same random draws (global
    generators and the transforms' own), the same schedule, hence the same metrics."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from conftest import bundle_files

    settings = {**TINY, "synthetic_images": 24, "epochs": 2}
    run_workflow("polyp_fps.json", output_dir=str(tmp_path / "straight"), **settings)

    stopped = ConfigWorkflow(config_file=bundle_files("polyp_fps.json"), meta_file=str(BUNDLES / "metadata.json"),
                             logging_file=str(BUNDLES / "logging.conf"), workflow_type=None, output_dir=str(tmp_path / "resumed"), **settings)
    stopped.initialize()
    trainer = stopped.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())  # the kill, at an epoch's end
    stopped.run()
    stopped.finalize()
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    run_workflow("polyp_fps.json", output_dir=str(tmp_path / "resumed"), **settings)

    straight, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "resumed"))
    assert (tmp_path / "straight" / "selection.safetensors").read_bytes() == (tmp_path / "resumed" / "selection.safetensors").read_bytes()
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a == pytest.approx(b, abs=1e-6)
    # and the trained values themselves, which see every draw of the second epoch
    final = [torch.load(tmp_path / d / "checkpoints" / "checkpoint_epoch=2.pt", weights_only=True)["deltas"] for d in ("straight", "resumed")]
    assert final[0].keys() == final[1].keys()
    for key in final[0]:
        torch.testing.assert_close(final[0][key], final[1][key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


# 1 and 2 on volumes: all-background labels; NaN voxels stop the run naming the volume
ORGAN_SETTINGS = dict(epochs=1, val_interval=1, volumes_per_batch=2, slices_per_volume=4, image_size=64, select_batches=1, sw_batch_size=8)


def _organ_copy(tmp_path: Path) -> Path:
    import shutil

    from medseg_peft.data.synthetic_organs import make_synthetic_organs

    src = make_synthetic_organs(n_train=4, seed=0)
    return Path(shutil.copytree(src, tmp_path / "organs"))


def test_all_background_validation_labels_are_refused(tmp_path):
    import nibabel as nib

    root = _organ_copy(tmp_path)
    for label in (root / "labelsTr").glob("*.nii.gz"):
        img = nib.load(label)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), label)
    with pytest.raises(Exception) as info:
        run_workflow(ORGAN_BUNDLE, output_dir=str(tmp_path / "run"), dataset_dir=str(root), **ORGAN_SETTINGS)
    assert "label of" in error_chain(info.value) and "is background only" in error_chain(info.value)


def test_nan_voxels_stop_training_naming_the_volume(tmp_path):
    import nibabel as nib

    root = _organ_copy(tmp_path)
    for image in (root / "imagesTr").glob("*.nii.gz"):  # every training volume: whichever slice is drawn, it holds NaN
        img = nib.load(image)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        data[::2] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine), image)
    with pytest.raises(Exception) as info:
        run_workflow(ORGAN_BUNDLE, output_dir=str(tmp_path / "run"), dataset_dir=str(root), **ORGAN_SETTINGS)
    message = error_chain(info.value)
    assert "is nan" in message.lower() and "imagesTr" in message
    if (tmp_path / "run" / "best_delta.safetensors").is_file():
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "run" / "best_delta.safetensors")).values())


# 3 with a real kill: SIGKILL of a running bundle, then a resume that finishes
def test_a_sigkilled_run_resumes_and_finishes(tmp_path, tmp_path_factory):
    import signal

    out = tmp_path / "run"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / "polyp_fps.json"), "--output_dir", str(out)]
    for key, value in {**TINY, "synthetic_images": 40, "epochs": 30}.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = __import__("time").time() + 240
        while proc.poll() is None and __import__("time").time() < deadline and len(list((out / "checkpoints").glob("*"))) < 1:
            __import__("time").sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)  # at once, wherever it is: maybe in the middle of the next write
        proc.wait()
    epoch = json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"]
    assert epoch < 30
    done = subprocess.run(command[:-2] + ["--epochs", str(epoch + 1)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"] == epoch + 1


def test_nifti_volumes_load_without_a_reader_complaint_per_file(tmp_path, capsys):
    run_workflow(ORGAN_BUNDLE, output_dir=str(tmp_path / "run"), **{**ORGAN_SETTINGS, "synthetic_volumes": 4, "epochs": 1})
    assert "unable to load" not in capsys.readouterr().out


def test_the_exported_label_writer_is_dropped_by_monai_label_and_labels_are_uint8():
    from monai.bundle import ConfigParser
    from monai.transforms import SaveImaged

    from medseg_peft.data.volume_transforms import label_postprocessing_config, volume_preprocessing_config

    steps = ConfigParser({"imports": ["$import medseg_peft"], "preprocessing": {"_target_": "Compose", "transforms": volume_preprocessing_config()},
                          "output_dir": "/tmp/x", "output_postfix": "seg", "post": label_postprocessing_config()}).get_parsed_content("post")
    kept = [t for t in steps if not isinstance(t, SaveImaged)]  # what MONAI Label's BundleInferTask keeps
    assert len(kept) == len(steps) - 1 and type(steps[-1]).__name__ == "SaveLabelVolumed"
    import numpy as np

    assert [t for t in kept if type(t).__name__ == "CastToTyped"][0].dtype == (np.uint8,)


def test_a_truncated_nifti_is_named(tmp_path):
    root = _organ_copy(tmp_path)
    victim = sorted((root / "imagesTr").glob("*.nii.gz"))[1]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(Exception) as info:
        run_workflow(ORGAN_BUNDLE, output_dir=str(tmp_path / "run"), dataset_dir=str(root), **ORGAN_SETTINGS)
    assert f"{victim}: the voxel data cannot be read" in error_chain(info.value)


def test_a_damaged_result_file_is_named(tmp_path):
    from medseg_peft.models import demo_segmenter
    from medseg_peft.workflows import load_tuned

    bad = tmp_path / "best_delta.safetensors"
    bad.write_bytes(b"\x07\x00garbage")
    with pytest.raises(ValueError, match=f"result file {bad} is not a readable safetensors file"):
        load_tuned(demo_segmenter(64), bad)


# 9. what defines the data is part of the folder's settings
def test_a_rerun_on_another_split_stops_instead_of_resuming(tmp_path):
    out = tmp_path / "run"
    run_workflow("polyp_fps.json", output_dir=str(out), **TINY)
    recorded = json.loads((out / "run.json").read_text())
    assert {"split", "val_fraction", "image_size", "prompt"} <= set(recorded) and recorded["val_fraction"] == 0.2
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(out), **{**TINY, "val_fraction": 0.5})
    message = error_chain(info.value)
    assert "holds a run made with other settings" in message and "split:" in message and "val_fraction: 0.2 in the folder, 0.5 now" in message
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [0, 1]  # the old run untouched


def test_the_split_fingerprint_follows_the_items_not_their_order():
    from medseg_peft.workflows import data_fingerprint

    a = {"train": [{"name": "a"}, {"name": "b"}], "val": [{"name": "c"}]}
    assert data_fingerprint(a) == data_fingerprint({"train": [{"name": "b"}, {"name": "a"}], "val": [{"name": "c"}]})
    assert data_fingerprint(a) != data_fingerprint({"train": [{"name": "a"}], "val": [{"name": "b"}, {"name": "c"}]})


# 10. a SAM variant is always checked, and never silently replaced by the demo model
def test_a_variant_without_weights_is_refused_unless_random_weights_are_asked_for(tmp_path):
    from medseg_peft.models.sam import build_sam
    from medseg_peft.workflows import polyp_network

    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        polyp_network(None, "vit_x")
    with pytest.raises(ValueError, match="sam_variant='tiny' was given without a sam_checkpoint"):
        polyp_network(None, "tiny")
    with pytest.raises(ValueError, match="needs a sam_variant"):
        polyp_network("random", None)
    assert polyp_network("random", "tiny").variant == "tiny"
    assert polyp_network(None, None).variant == "demo"
    ckpt = tmp_path / "tiny_lite.pth"
    torch.save(build_sam("tiny_lite").state_dict(), ckpt)
    assert polyp_network(str(ckpt), None).variant == "tiny_lite"  # read off the weights
    with pytest.raises(ValueError, match="is a tiny_lite SAM, but sam_variant='tiny'"):
        polyp_network(str(ckpt), "tiny")


def test_the_report_records_the_variant_that_ran(tmp_path):
    out = tmp_path / "run"
    run_workflow("polyp_fps.json", output_dir=str(out), **TINY)
    assert json.loads((out / "metrics.json").read_text())["settings"]["sam_variant"] == "demo"


def test_a_seed_that_is_not_an_integer_is_named(tmp_path):
    with pytest.raises(Exception) as info:
        run_workflow("polyp_fps.json", output_dir=str(tmp_path / "run"), **{**TINY, "seed": "abc"})
    assert "setting 'seed' must be a non-negative integer, got 'abc'" in error_chain(info.value)


# 11. the one line a user reads is the most specific one
def _raised(make):
    try:
        make()
    except BaseException as err:  # noqa: BLE001 - the chain is what is tested
        return err


def test_the_short_error_names_our_wrapper_not_the_low_level_cause(tmp_path, capsys):
    from medseg_peft.data.polyp_folders import check_contents
    from medseg_peft.workflows.errors import _short_excepthook, user_error

    data = kvasir(tmp_path / "data", n=2)
    raw = (data / "images" / "c1.png").read_bytes()
    (data / "images" / "c1.png").write_bytes(raw[: len(raw) * 2 // 5])

    def truncated():  # the package's own check, over PIL's error
        check_contents([{"image": str(data / "images" / "c1.png"), "label": str(data / "masks" / "c1.png")}])

    def wrapped(inner):
        def make():
            try:
                inner()
            except Exception as err:
                raise RuntimeError("Failed to evaluate ConfigExpression: $wf.polyp_data(...)") from err
        return make

    err = _raised(wrapped(truncated))
    assert str(user_error(err)).startswith(f"image {data / 'images' / 'c1.png'}")
    holder = subprocess.Popen([sys.executable, "-c", f"from medseg_peft.workflows.run_folder import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
                               "import time; print('locked', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = _raised(wrapped(lambda: RunLock(tmp_path).acquire()))
    finally:
        holder.kill()
        holder.wait()
    assert isinstance(user_error(err), RuntimeError) and f"in use by another run (pid {holder.pid})" in str(user_error(err))
    _short_excepthook(type(err), err, err.__traceback__)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medseg-peft: RuntimeError:") and f"pid {holder.pid}" in lines[0]
    bug = _raised(wrapped(lambda: [][1]))  # an IndexError nobody raised on purpose keeps its traceback
    assert user_error(bug) is None


def test_a_checkpoint_that_is_a_text_file_is_named_in_one_line(tmp_path):
    from medseg_peft.workflows import polyp_network
    from medseg_peft.workflows.errors import user_error

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    err = _raised(lambda: polyp_network(str(text), None))
    assert str(text) in str(user_error(err)) and "could not be read" in str(user_error(err))


# 12. an output folder that stops being writable during a run
def test_a_folder_no_longer_writable_is_named_and_its_lock_released_quietly(tmp_path, monkeypatch, caplog):
    import tempfile as tempfile_module

    from medseg_peft.io import atomic_write_json

    lock = RunLock(tmp_path).acquire()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile_module, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=rf"{tmp_path} is no longer writable \(Permission denied\)"):
        atomic_write_json({"a": 1}, tmp_path / "metrics.json")
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: refuse())
    lock.release()  # no traceback at exit: a warning, and the next run takes the stale lock over
    assert "could not remove the lock" in caplog.text and not lock.held
