"""The run's outcome, kept on disk as it happens: zero-shot and per-validation metrics, best delta.

``RunReport`` attaches to the evaluator. The first validation (run before the first training
iteration) is the zero-shot score of the pre-trained model; each later one is compared with the best
so far, and an improvement rewrites the best result file (a delta checkpoint, or the full weights for
full fine-tuning). ``metrics.json`` is rewritten atomically after every validation, so an interrupted
run keeps everything it measured, and a resumed run continues the same history.

``best_each`` names metrics whose own best after tuning began is kept apart from ``best`` (the entry of the
best key metric): e.g. the best top-1 of the raw weights and of their EMA, which the GPS reference logs side
by side (FightingFighting/GPS train_gps.py) and which may peak at different epochs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine, Events
from torch import nn

from medseg_peft.distributed import is_main_process
from medseg_peft.tuning import is_attached, tuning_state
from medseg_peft.workflows.tuned_state import save_tuned

log = logging.getLogger("medseg_peft")

BEST_FILE = "best_delta.safetensors"
METRICS_FILE = "metrics.json"


def write_json(data: dict, path: str | Path) -> None:
    """Write ``data`` as JSON beside ``path``, then rename it over ``path``: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class RunReport:
    """Records validation metrics per epoch, keeps the best result file, prints before / after."""

    def __init__(self, output_dir: str | Path, network: nn.Module, trainer: Engine, key_metric: str = "mDice", method: str = "",
                 settings: dict | None = None, best_each: Sequence[str] = ()):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network = network
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
        }
        self._seconds_before = self.data["seconds"]

    def restart(self) -> None:
        """Forget the history of an earlier run in this folder: training starts from the first epoch again."""
        if self.data["history"]:
            log.info("no checkpoint to resume from: starting a fresh history in %s", self.path)
        self.data.update(zero_shot=None, history=[], best=None, best_each={}, seconds=0.0)
        self._seconds_before = 0.0

    def attach(self, evaluator: Engine) -> None:
        """Rank 0 only under torchrun: the evaluator's metrics are already reduced over all ranks."""
        if not is_main_process():
            return
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.on_validation)
        self.trainer.add_event_handler(Events.COMPLETED, self.on_training_done)

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
            save_tuned(self.network, self.dir / BEST_FILE)
        elif epoch > 0 and metrics.get(self.key, float("-inf")) > self.data["best"].get(self.key, float("-inf")):
            self.data["best"] = entry
            save_tuned(self.network, self.dir / BEST_FILE)
            log.info("epoch %d: new best %s, saved %s", epoch, _fmt(metrics), self.dir / BEST_FILE)
        self.data["best_each"] = self.bests(history)
        trainable, fraction = self.tuned_fraction()
        self.data.update(trainable=trainable, tuned_percent=100 * fraction)
        self.data["seconds"] = self._seconds_before + time.perf_counter() - self.started
        write_json(self.data, self.path)

    def on_training_done(self, trainer: Engine) -> None:
        zero, best = self.data["zero_shot"] or {}, self.data["best"] or {}
        last = self.data["history"][-1] if self.data["history"] else {}
        lines = [
            f"method {self.data['method']}: tuned {self.data.get('trainable', 0):,} parameters ({self.data.get('tuned_percent', 0):.3f} %)",
            f"  before tuning (zero-shot): {_fmt({k: v for k, v in zero.items() if k != 'epoch'})}",
            f"  after tuning (best, epoch {best.get('epoch', '-')}): {_fmt({k: v for k, v in best.items() if k != 'epoch'})}",
            f"  last (epoch {last.get('epoch', '-')}): {_fmt({k: v for k, v in last.items() if k != 'epoch'})}",
            f"  wall time {self.data['seconds']:.0f} s; results in {self.dir}",
        ]
        if self.data["best_each"]:
            each = ", ".join(f"{name} {b['value']:.4f} (epoch {b['epoch']})" for name, b in self.data["best_each"].items())
            lines.insert(-1, f"  best of each metric: {each}")
        print("\n".join(lines), flush=True)


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "n/a"
