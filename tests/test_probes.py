"""Fault probes through the command line, as a user meets them: each ends in one line naming the cause,
or (16-bit images) in the same result as the 8-bit copy of the same images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLES
from test_compare import _fake_run
from test_image_inputs import folder, grey_copies

TINY = dict(epochs=1, synthetic_images=16, batch_size=4, image_size=64, select_batches=2, num_workers=0)


def bundle_run(tmp_path: Path, **settings) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file bundles/polyp_fps.json --key value ...``, as README shows it."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLES / "polyp_fps.json")]
    for key, value in {**TINY, **settings}.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_PEFT_CACHE": str(tmp_path / "cache")}
    env.pop("MEDSEG_PEFT_TRACEBACK", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The failed run's last stderr line, checked to be the one short error and no traceback."""
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("medseg-peft: "), done.stderr[-2000:]
    return last


def test_16_bit_images_score_as_their_8_bit_copy(tmp_path):
    from medseg_peft.data import make_synthetic_polyps

    eight, sixteen = grey_copies(make_synthetic_polyps(tmp_path / "src", n_images=12, size=64, seed=0), tmp_path)
    scores = []
    for data in (eight, sixteen):
        out = tmp_path / f"run_{data.name}"
        done = bundle_run(tmp_path, dataset_dir=data, output_dir=out)
        assert done.returncode == 0, done.stderr[-3000:]
        scores.append(json.loads((out / "metrics.json").read_text())["zero_shot"]["mDice"])
    assert scores[0] > 0.05 and scores[1] == pytest.approx(scores[0], abs=1e-3)


def test_a_rerun_on_another_split_stops_in_one_line(tmp_path):
    out = tmp_path / "run"
    assert bundle_run(tmp_path, output_dir=out).returncode == 0
    line = one_line_error(bundle_run(tmp_path, output_dir=out, val_fraction=0.5))
    assert str(out) in line and "val_fraction: 0.2 in the folder, 0.5 now" in line and "split:" in line


def test_every_mask_fully_foreground_is_refused_in_one_line(tmp_path):
    data = folder(tmp_path / "data")
    for mask in (data / "masks").iterdir():
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    line = one_line_error(bundle_run(tmp_path, dataset_dir=data, output_dir=tmp_path / "run"))
    assert "foreground" in line and "measure nothing" in line
    assert not (tmp_path / "run" / "selection.safetensors").exists()


@pytest.mark.parametrize("suffix,role", [(".png", "images"), (".jpg", "masks")])
def test_a_truncated_file_is_named_in_one_line(tmp_path, suffix, role):
    data = folder(tmp_path / "data", image_ext=suffix, mask_ext=suffix)
    victim = data / role / f"c3{suffix}"
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) * 2 // 5])
    line = one_line_error(bundle_run(tmp_path, dataset_dir=data, output_dir=tmp_path / "run"))
    assert str(victim) in line
    assert not (tmp_path / "run" / "selection.safetensors").exists()


def test_collect_names_an_unreadable_run_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs / "polyp_fps", "fps", "mDice", seconds=60.0, trainable=10, tuned_percent=1.0)
    _fake_run(runs / "polyp_lora", "lora", "mDice", seconds=60.0, trainable=100, tuned_percent=5.0)
    collect = [sys.executable, "-m", "medseg_peft.compare", "--collect", str(runs)]
    assert subprocess.run(collect, capture_output=True, text=True, timeout=300).returncode == 0
    before = (runs / "comparison.json").read_bytes()
    metrics = runs / "polyp_lora" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    done = subprocess.run(collect, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert str(metrics) in done.stderr.strip().splitlines()[-1]
    assert (runs / "comparison.json").read_bytes() == before
