"""Several processes (gloo on the CPU, one thread each): one selection for all ranks, and the bundles under torchrun.

The selection tests spawn ranks with ``torch.multiprocessing`` and compare against one process that sees
the union of the ranks' batches; the bundle tests run ``torchrun -m monai.bundle run`` with the
``multi_gpu.json`` layer exactly as README shows, at a tiny size.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp
import torch.nn.functional as F

import medseg_peft as mp
from conftest import CLASSIFY, ORGAN, bundle_files, run_workflow
from medseg_peft.distributed import all_reduce_sum
from medseg_peft.models import sam_segmenter
from medseg_peft.selection.eligibility import SELECT, assign_roles

WORLD = 2


def _tiny_sam(seed: int = 0):
    torch.manual_seed(seed)
    return sam_segmenter("tiny")


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(3)
    return [{"image": torch.rand(2, 3, 64, 64, generator=g) * 255, "label": (torch.rand(2, 1, 64, 64, generator=g) > 0.6).float()}
            for _ in range(n)]


def _seg_loss(logits, label):
    return F.binary_cross_entropy_with_logits(logits, label)


def _selector(method: str):
    return {
        "fps": lambda: mp.FPS(k=2),
        "gps": lambda: mp.GPS(k=2, loss=_seg_loss),
        "spt": lambda: mp.SPT(budget=3000, rank=2, loss=_seg_loss),
        "partial": lambda: mp.Partial(angle_top=2, probe_steps=3, loss=_seg_loss),
    }[method]()


def _selection_worker(rank: int, out: str, method: str, model_seed_per_rank: bool) -> None:
    torch.set_num_threads(1)
    # rendezvous through a file in the test's folder: no port to pick, and no TCP store server thread in rank 0
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        model = _tiny_sam(rank if model_seed_per_rank else 0)
        mine = _batches()[rank::WORLD]
        selector = _selector(method)
        result: dict = {}
        try:
            selection = selector.select(model, mine)
            result["digest"] = selection.digest()
            if hasattr(selector, "statistics"):
                selectable = [n for n, r in assign_roles(model, selector.rules(model)).items() if r == SELECT]
                result["stats"] = all_reduce_sum(selector.statistics(model, mine, selectable))
            selection.save(Path(out) / f"selection{rank}.safetensors")
        except RuntimeError as err:
            result["error"] = str(err)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        # leave together, then tear gloo down while the interpreter is whole: no rank closes its pairs while the
        # other still communicates, and no gloo work is left for interpreter shutdown to destroy
        dist.barrier()
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, method: str, model_seed_per_rank: bool = False) -> list[dict]:
    # join=True raises if a worker exits non-zero or by a signal (an abort in gloo's teardown included)
    tmp_mp.spawn(_selection_worker, args=(str(tmp_path), method, model_seed_per_rank), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("method", ["fps", "gps", "spt"])
def test_ranks_select_what_one_process_selects_over_the_union_of_their_batches(method, tmp_path):
    ranks = _run_ranks(tmp_path, method)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # bit-identical selections on both ranks
    single_model, union = _tiny_sam(0), _batches()
    selector = _selector(method)
    single = selector.select(single_model, union)
    on_rank = mp.Selection.load(tmp_path / "selection0.safetensors")
    # the same chosen entries as one process that saw all four batches
    assert set(on_rank.entries) == set(single.entries)
    for name, e in single.entries.items():
        assert on_rank[name].layout == e.layout
        if e.index is not None:
            assert torch.equal(on_rank[name].index.long(), e.index.long()), name
    # the summed statistics equal the single process's sums (float64 sums for FPS; float32 gradients otherwise)
    selectable = [n for n, r in assign_roles(single_model, selector.rules(single_model)).items() if r == SELECT]
    expected = selector.statistics(single_model, union, selectable)
    assert set(ranks[0]["stats"]) == set(expected)
    for key, value in expected.items():
        tol = dict(rtol=1e-12, atol=0) if method == "fps" else dict(rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ranks[0]["stats"][key], value, **tol, msg=key)
        assert torch.equal(ranks[0]["stats"][key], ranks[1]["stats"][key])


def test_partial_angle_probe_is_one_data_parallel_probe(tmp_path):
    ranks = _run_ranks(tmp_path, "partial")
    assert "error" not in ranks[0] and ranks[0]["digest"] == ranks[1]["digest"]


def test_ranks_that_disagree_stop_with_a_clear_error(tmp_path):
    ranks = _run_ranks(tmp_path, "fps", model_seed_per_rank=True)  # a different model on each rank
    for result in ranks:
        assert "the fps selection differs across ranks" in result["error"] and "rank(s) [1]" in result["error"]


# ---- the bundles under torchrun ----------------------------------------------------------------
POLYP = dict(epochs=1, synthetic_images=16, batch_size=2, image_size=64, select_batches=2, num_workers=0)


def _torchrun_command(layers: list[str], **overrides) -> list[str]:
    # --standalone is torchrun's --rdzv-backend=c10d --rdzv-endpoint=localhost:0 --rdzv-id=<uuid>: its store listens
    # on a port the OS gives it, and the workers join that same store (no port is picked and released)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               "-m", "monai.bundle", "run", "--config_file", str(bundle_files(layers))]  # metadata and logging: the task folder's own
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _env(tmp_path_factory) -> dict:
    """The torchrun subprocess's environment; the workers share torchrun's own store (the opt-out is dropped)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDSEG_PEFT_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return env


def torchrun(layers: list[str], env: dict, **overrides) -> subprocess.CompletedProcess:
    done = subprocess.run(_torchrun_command(layers, **overrides), env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # the workers' own output, not only torchrun's wrapper (an abort says little there)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if "elastic" not in line and line.strip()]
        pytest.fail("torchrun failed:\n" + "\n".join(lines[-80:]))
    return done


def test_a_validation_set_smaller_than_the_ranks_is_refused_by_name(tmp_path, tmp_path_factory):
    done = subprocess.run(_torchrun_command(["polyp_fps.json", "multi_gpu.json"], **{**POLYP, "synthetic_images": 4, "val_fraction": 0.25},
                                            output_dir=tmp_path), env=_env(tmp_path_factory), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    refusals = [line for line in output.splitlines() if "the validation set has 1 item(s), fewer than the 2 processes" in line]
    assert refusals and all(line.startswith("medseg-peft: ValueError:") for line in refusals), output[-3000:]  # one line per rank
    assert "selection by" not in output and not (tmp_path / "selection.safetensors").exists()  # refused before any work


def test_polyp_bundle_trains_under_the_layer_and_only_rank_0_writes(tmp_path, tmp_path_factory, monkeypatch):
    env = _env(tmp_path_factory)
    per_rank = f"$'{tmp_path}/rank' + __import__('os').environ['RANK']"  # a folder per rank shows who writes what
    torchrun(["polyp_fps.json", "methods/gps.json", "multi_gpu.json"], env, output_dir=per_rank, **POLYP)
    rank0, rank1 = tmp_path / "rank0", tmp_path / "rank1"
    for name in ("metrics.json", "best_delta.safetensors", "selection.safetensors", "val_contours.png"):
        assert (rank0 / name).is_file(), name
    assert list((rank0 / "checkpoints").glob("*.pt")) and any((rank0 / "tensorboard").iterdir())
    assert not [p for p in rank1.rglob("*") if p.is_file()]  # rank 1 wrote nothing
    metrics = json.loads((rank0 / "metrics.json").read_text())
    assert metrics["method"] == "gps" and metrics["settings"]["processes"] == WORLD
    assert mp.Selection.load(rank0 / "selection.safetensors").method == "gps"
    # validation is reduced over both ranks' shards: the zero-shot score equals one process's on the same weights
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", env["MEDSEG_PEFT_CACHE"])
    run_workflow(["polyp_fps.json", "methods/gps.json"], output_dir=str(tmp_path / "single"), **POLYP)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for key in ("mDice", "mIoU"):
        assert metrics["zero_shot"][key] == pytest.approx(single["zero_shot"][key], abs=1e-6)


def test_killed_two_process_run_resumes_with_the_same_selection(tmp_path, tmp_path_factory):
    env, out = _env(tmp_path_factory), tmp_path / "run"
    settings = {**POLYP, "synthetic_images": 48, "output_dir": out}
    proc = subprocess.Popen(_torchrun_command(["polyp_fps.json", "multi_gpu.json"], **{**settings, "epochs": 50}),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((out / "checkpoints").glob("*.pt")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun stops its workers
        proc.wait(timeout=120)
        with contextlib.suppress(ProcessLookupError):  # no worker of this run (its own process group) may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
    selection_bytes = (out / "selection.safetensors").read_bytes()
    epoch = int(json.loads((out / "metrics.json").read_text())["history"][-1]["epoch"])
    assert epoch < 50  # the run was interrupted
    torchrun(["polyp_fps.json", "multi_gpu.json"], env, **{**settings, "epochs": epoch + 1})
    assert (out / "selection.safetensors").read_bytes() == selection_bytes  # re-attached, not selected again
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]][-1] == epoch + 1
    assert sum(1 for h in metrics["history"] if h["epoch"] == 0) == 1


@pytest.mark.parametrize("task,overrides", [
    (ORGAN, dict(epochs=1, val_interval=1, synthetic_volumes=10, image_size=64, volumes_per_batch=1,
                            slices_per_volume=2, select_batches=1, sw_batch_size=8, checkpointing=True)),  # + DDP with checkpointing
    (CLASSIFY, dict(epochs=1, cooldown_epochs=0, batch_size=8, num_workers=0, select_batches=2, checkpointing="selective",
                           base_dtype="bfloat16")),
])
def test_organ_and_classify_bundles_train_under_the_layer(task, overrides, tmp_path, tmp_path_factory):
    out = tmp_path / "run"
    torchrun([*task, "multi_gpu.json"], _env(tmp_path_factory), output_dir=out, **overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1] and metrics["settings"]["processes"] == WORLD
    assert (out / "selection.safetensors").is_file() and list((out / "checkpoints").glob("*.pt"))
