"""The run's outcome, kept on disk as it happens: zero-shot and per-validation metrics, best delta.

``RunReport`` attaches to the evaluator. The first validation (run before the first training
iteration) is the zero-shot score of the pre-trained model; each later one is compared with the best
so far, and an improvement rewrites the best result file (a delta checkpoint, or the full weights for
full fine-tuning). ``metrics.json`` is rewritten atomically after every validation, so an interrupted
run keeps everything it measured, and a resumed run continues the same history.

Beside the numbers it keeps the run's pictures (``medseg_peft.workflows.pictures``): ``selection.png``,
where the attached selection trains, drawn when training starts, and ``training_curve.png``, the mean
training loss and the validation metrics per epoch, redrawn after each validation. ``metrics.json`` also
says what the run cost (``wall_time_s``, ``peak_memory_mib``) so that runs can be compared on it.

``best_each`` names metrics whose own best after tuning began is kept apart from ``best`` (the entry of the
best key metric): e.g. the best top-1 of the raw weights and of their EMA, which the GPS reference logs side
by side (FightingFighting/GPS train_gps.py) and which may peak at different epochs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from medseg_peft.distributed import is_main_process
from medseg_peft.io import atomic_write_json
from medseg_peft.tuning import is_attached, save_tuned, tuning_state
from medseg_peft.workflows.pictures import base_numels, draw_selection, draw_training_curve, selection_from_flags

log = logging.getLogger("medseg_peft")

BEST_FILE = "best_delta.safetensors"
METRICS_FILE = "metrics.json"
SELECTION_PICTURE = "selection.png"
CURVE_PICTURE = "training_curve.png"


class RunReport:
    """Records validation metrics per epoch, keeps the best result file, prints before / after.

    ``result_network`` is the network whose key metric is scored and whose weights the best result
    file keeps (the EMA copy when a classification recipe validates its EMA weights); ``network``, the
    one being trained, is what the tuned counts and the selection picture describe."""

    def __init__(self, output_dir: str | Path, network: nn.Module, trainer: Engine, key_metric: str = "mDice", method: str = "",
                 settings: dict | None = None, best_each: Sequence[str] = (), result_network: nn.Module | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network = network
        self.result_network = network if result_network is None else result_network
        self.trainer = trainer
        self.key = key_metric
        self.best_each = list(best_each)
        self.path = self.dir / METRICS_FILE
        self.started = time.perf_counter()
        try:
            previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError as err:
            raise ValueError(f"{self.path} is not readable JSON ({err}); move it away (the run's other files are intact) and rerun") from err
        self.data = {
            "method": method,
            "settings": settings or {},
            "zero_shot": previous.get("zero_shot"),
            "history": previous.get("history", []),
            "best": previous.get("best"),
            "best_each": previous.get("best_each", {}),
            "seconds": previous.get("seconds", 0.0),
            "train_loss": previous.get("train_loss", []),
            "wall_time_s": previous.get("wall_time_s", 0.0),
            "elapsed_s": previous.get("elapsed_s", {}),
        }
        if "peak_memory_mib" in previous:
            self.data.update({k: previous[k] for k in ("peak_memory_mib", "peak_memory_kind") if k in previous})
        self._seconds_before = self.data["seconds"]
        self._wall_before = self.data["wall_time_s"]
        self.training_started = self.started  # reset by attach, just before the trainer runs
        self._loss_sum, self._loss_steps = 0.0, 0

    def restart(self) -> None:
        """Forget the history of an earlier run in this folder: training starts from the first epoch again."""
        if self.data["history"]:
            log.info("no checkpoint to resume from: starting a fresh history in %s", self.path)
        self.data.update(zero_shot=None, history=[], best=None, best_each={}, seconds=0.0, train_loss=[], wall_time_s=0.0, elapsed_s={})
        self.data.pop("peak_memory_mib", None)
        self.data.pop("peak_memory_kind", None)
        self._seconds_before = self._wall_before = 0.0

    def attach(self, evaluator: Engine) -> None:
        """Rank 0 only under torchrun: the evaluator's metrics are already reduced over all ranks."""
        if not is_main_process():
            return
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.on_validation)
        self.trainer.add_event_handler(Events.EPOCH_STARTED, self.on_epoch_started)
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self.on_iteration)
        self.trainer.add_event_handler(Events.EPOCH_COMPLETED, self.on_epoch_completed)
        self.trainer.add_event_handler(Events.COMPLETED, self.on_training_done)
        # attach is the last step before the trainer runs (wf.train): the zero-shot validation runs at the
        # trainer's STARTED, before a handler added here would, so the clock and the picture start now
        self.training_started = time.perf_counter()
        self.draw_selection()

    def selection(self):
        """The attached selection; a network without one (full fine-tuning unfreezes the model instead)
        is pictured from its ``requires_grad`` flags."""
        if is_attached(self.network):
            return tuning_state(self.network).selection
        return selection_from_flags(self.network, self.data["method"] or "no attached selection")

    def draw_selection(self) -> Path | None:
        return self._picture(draw_selection, self.selection(), self.dir / SELECTION_PICTURE, base_numels(self.network))

    def draw_curve(self) -> Path | None:
        title = f"{self.data['method']}: {self.dir.name}" if self.data["method"] else self.dir.name
        return self._picture(draw_training_curve, self.data["history"], self.dir / CURVE_PICTURE, self.key,
                             self.data["train_loss"], title)

    @staticmethod
    def _picture(draw, *args) -> Path | None:
        """A picture that cannot be drawn costs a warning, never the run."""
        try:
            return draw(*args)
        except Exception as err:  # noqa: BLE001 - the run's numbers matter more than its pictures
            log.warning("could not draw %s: %s: %s", args[1], type(err).__name__, err)
            return None

    # ---- the training loss: summed on the device (no sync per step), averaged once per epoch --------
    def on_epoch_started(self, trainer: Engine) -> None:
        self._loss_sum, self._loss_steps = 0.0, 0

    def on_iteration(self, trainer: Engine) -> None:
        output = trainer.state.output
        if isinstance(output, list) and output:  # decollated: every item carries the batch's loss
            output = output[0]
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is not None:
            self._loss_sum = self._loss_sum + (loss.detach().float() if torch.is_tensor(loss) else float(loss))
            self._loss_steps += 1

    def epoch_loss(self, epoch: int) -> float | None:
        """The mean training loss of ``epoch`` (this rank's batches), recorded in ``train_loss`` once."""
        losses = self.data["train_loss"]
        if losses and losses[-1]["epoch"] == epoch:
            return losses[-1]["loss"]
        if epoch <= 0 or not self._loss_steps:
            return None
        mean = float(self._loss_sum) / self._loss_steps
        losses.append({"epoch": epoch, "loss": mean})
        return mean

    def on_epoch_completed(self, trainer: Engine) -> None:
        self.epoch_loss(int(trainer.state.epoch))

    def tuned_fraction(self) -> tuple[int, float]:
        if is_attached(self.network):
            sel = tuning_state(self.network).selection
            return sel.num_trainable, sel.fraction
        total = sum(p.numel() for p in self.network.parameters())
        trainable = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        return trainable, trainable / max(total, 1)

    def bests(self, history: list[dict]) -> dict:
        """Each ``best_each`` metric's highest value after tuning began (the zero-shot score is no candidate),
        with its epoch; the earliest epoch on ties, as the reference's strict improvement test."""
        out = {}
        for name in self.best_each:
            tuned = [h for h in history if h["epoch"] > 0 and name in h]
            if tuned:
                top = max(tuned, key=lambda h: h[name])
                out[name] = {"epoch": top["epoch"], "value": top[name]}
        return out

    def on_validation(self, evaluator: Engine) -> None:
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float)) or torch.is_tensor(v)}
        epoch = int(self.trainer.state.epoch or 0)
        entry = {"epoch": epoch, **metrics}
        # seconds since the run began (selection included) at each validation, so runs compare at equal wall time
        self.data["elapsed_s"][str(epoch)] = round(self._seconds_before + time.perf_counter() - self.started, 2)
        loss = self.epoch_loss(epoch)
        if loss is not None:
            entry["train_loss"] = loss
        history = self.data["history"]
        if history and history[-1]["epoch"] == epoch:  # a resumed run re-validates where it stopped: same epoch, one entry
            history[-1] = entry
        else:
            history.append(entry)
        bad = [k for k, v in metrics.items() if v != v]
        if bad:  # NaN: a score that cannot be right (e.g. no class present anywhere) is an error, never a number
            raise FloatingPointError(f"validation at epoch {epoch} scored NaN for {bad}: check that the validation labels hold the classes")
        if self.data["zero_shot"] is None and epoch == 0:
            self.data["zero_shot"] = entry
            log.info("zero-shot (before tuning): %s", _fmt(metrics))
        if epoch == 0 and self.data["best"] is None:
            # the untuned model is the first candidate: best_delta is never worse than not tuning at all
            self.data["best"] = entry
            save_tuned(self.result_network, self.dir / BEST_FILE)
        elif epoch > 0 and metrics.get(self.key, float("-inf")) > self.data["best"].get(self.key, float("-inf")):
            self.data["best"] = entry
            save_tuned(self.result_network, self.dir / BEST_FILE)
            log.info("epoch %d: new best %s, saved %s", epoch, _fmt(metrics), self.dir / BEST_FILE)
        self.data["best_each"] = self.bests(history)
        trainable, fraction = self.tuned_fraction()
        self.data.update(trainable=trainable, trainable_fraction=fraction, tuned_percent=100 * fraction)
        now = time.perf_counter()
        self.data["seconds"] = self._seconds_before + now - self.started
        self.data["wall_time_s"] = self._wall_before + now - self.training_started
        self.record_peak_memory()
        atomic_write_json(self.data, self.path)
        self.draw_curve()

    def record_peak_memory(self) -> None:
        """``peak_memory_mib``: the most this run held so far, over resumes (the larger of the recorded peak
        and this process's), in the sense ``peak_memory_kind`` names."""
        mib, kind = peak_memory(_device_of(self.network))
        if self.data.get("peak_memory_kind") == kind:
            mib = max(mib, self.data.get("peak_memory_mib", 0.0))
        self.data.update(peak_memory_mib=mib, peak_memory_kind=kind)

    def on_training_done(self, trainer: Engine) -> None:
        if "trainable" not in self.data:  # no validation ran (a training round with no validation volume)
            trainable, fraction = self.tuned_fraction()
            self.data.update(trainable=trainable, trainable_fraction=fraction, tuned_percent=100 * fraction)
        zero, best = self.data["zero_shot"] or {}, self.data["best"] or {}
        last = self.data["history"][-1] if self.data["history"] else {}
        lines = [
            f"method {self.data['method']}: tuned {self.data.get('trainable', 0):,} parameters ({self.data.get('tuned_percent', 0):.3f} %)",
            f"  before tuning (zero-shot): {_fmt({k: v for k, v in zero.items() if k != 'epoch'})}",
            f"  after tuning (best, epoch {best.get('epoch', '-')}): {_fmt({k: v for k, v in best.items() if k != 'epoch'})}",
            f"  last (epoch {last.get('epoch', '-')}): {_fmt({k: v for k, v in last.items() if k != 'epoch'})}",
            f"  wall time {self.data['seconds']:.0f} s (training {self.data.get('wall_time_s', 0):.0f} s), peak memory "
            f"{self.data.get('peak_memory_mib', 0):,.0f} MiB ({self.data.get('peak_memory_kind', 'n/a')}); results in {self.dir}",
        ]
        if self.data["best_each"]:
            each = ", ".join(f"{name} {b['value']:.4f} (epoch {b['epoch']})" for name, b in self.data["best_each"].items())
            lines.insert(-1, f"  best of each metric: {each}")
        print("\n".join(lines), flush=True)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """The process's peak memory in MiB and what it measures: on CUDA the allocator's peak on ``device``
    (``torch.cuda.max_memory_allocated``: tensors only, since the process started or the last reset of
    the peak statistics, so selection scoring before training is included); elsewhere the peak resident
    set size of the whole process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024), "process_max_rss"


def _device_of(network: nn.Module) -> torch.device:
    return next((p.device for p in network.parameters()), torch.device("cpu"))


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "n/a"
