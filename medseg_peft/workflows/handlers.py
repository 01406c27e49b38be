"""The handlers every task bundle attaches to its trainer and evaluator, and who attaches them.

Every rank: the stop at a non-finite loss, the per-iteration learning-rate schedule, validation (all
ranks validate together) and the validation of the last epoch. Rank 0 only: the progress bar and the
per-epoch summary line, the metric log and TensorBoard.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from medseg_peft.distributed import is_main_process

log = logging.getLogger("medseg_peft")


def train_handlers(lr_scheduler, validator, val_interval: int, output_dir: str | Path, stream=None) -> list:
    """Every rank: a stop at a non-finite loss, the per-iteration learning-rate schedule and validation (all
    ranks validate together; the last epoch always). Rank 0: the progress (:func:`progress_handlers`,
    the bar on ``stream``, by default stderr) and the loss in TensorBoard."""
    from monai.handlers import LrScheduleHandler, TensorBoardStatsHandler, ValidationHandler, from_engine

    if isinstance(val_interval, bool) or not isinstance(val_interval, int) or val_interval <= 0:
        raise ValueError(f"val_interval must be a positive integer (epochs between validations), got {val_interval!r}")
    handlers = [FiniteLoss(), LrScheduleHandler(lr_scheduler, epoch_level=False, print_lr=False)]
    if validator is not None:  # None: nothing to validate on (a training round of a MONAI Label datastore with val_split 0)
        handlers += [ValidationHandler(validator=validator, interval=int(val_interval), epoch_level=True, exec_at_start=True),
                     ValidateLastEpoch(validator, int(val_interval))]
    if is_main_process():
        handlers += progress_handlers(lr_scheduler.optimizer, stream)
        handlers.append(TensorBoardStatsHandler(log_dir=str(Path(output_dir) / "tensorboard"), tag_name="train_loss",
                                                output_transform=from_engine(["loss"], first=True)))
    return handlers


def progress_handlers(optimizer: torch.optim.Optimizer, stream=None) -> list:
    """How a training run shows its progress: a progress bar only where ``stream`` (default: stderr, where
    the bar writes) is a terminal, and always one :class:`EpochSummary` log line per epoch.

    Written to a file (CI, ``nohup``, a cluster job) a bar is a run of carriage-return redraws that the
    file keeps side by side on one line; the log line is what such a log should hold instead, and on a
    terminal it adds the mean loss, learning rate and time that the bar does not show."""
    stream = sys.stderr if stream is None else stream
    handlers = []
    if _is_terminal(stream):
        from ignite.handlers import ProgressBar

        handlers.append(ProgressBar(persist=True, desc="train", file=stream))
    return handlers + [EpochSummary(optimizer)]


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


class EpochSummary:
    """Logs ``epoch 3/20  loss 0.4123  lr 0.000976  12.4 s (total 37.1 s)`` at the end of each training epoch:
    the mean training loss over its iterations, the learning rate its last step used (the schedule steps per
    iteration), the wall time of the epoch's training steps (not of the validation that may follow them) and
    of the run so far. The loss is summed on its device and read once per epoch, so the line costs no
    synchronisation per step."""

    def __init__(self, optimizer: torch.optim.Optimizer, output_transform=None):
        self.optimizer = optimizer
        self.output_transform = output_transform or _loss_of
        self.started = self.epoch_started = self.last_step = time.perf_counter()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        engine.add_event_handler(Events.ITERATION_STARTED, self.read_lr)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.add_loss)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def start(self, engine) -> None:
        self.started = time.perf_counter()

    def start_epoch(self, engine) -> None:
        self.epoch_started = self.last_step = time.perf_counter()
        self.loss_sum, self.steps, self.lr = 0.0, 0, None

    def read_lr(self, engine) -> None:
        self.lr = self.optimizer.param_groups[0]["lr"]

    def add_loss(self, engine) -> None:
        loss = self.output_transform(engine.state.output)
        self.loss_sum = self.loss_sum + (loss.detach().float() if isinstance(loss, torch.Tensor) else float(loss))
        self.steps += 1
        self.last_step = time.perf_counter()

    def write(self, engine) -> None:
        now = time.perf_counter()
        loss = float(self.loss_sum) / self.steps if self.steps else float("nan")
        lr = self.optimizer.param_groups[0]["lr"] if self.lr is None else self.lr
        log.info("epoch %d/%d  loss %.4f  lr %.3g  %.1f s (total %.1f s)", engine.state.epoch, engine.state.max_epochs, loss, lr,
                 self.last_step - self.epoch_started, now - self.started)


def _loss_of(output):
    """The loss in a trainer's output: MONAI's ``{"loss": ...}`` (a list of them per sample when decollated), or the value itself."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], dict):
        output = output[0]
    return output["loss"] if isinstance(output, dict) else output


def validation_handlers(output_dir: str | Path, *every_rank) -> list:
    """``every_rank`` handlers (e.g. per-class scores) plus, on rank 0, the metric log and TensorBoard."""
    from monai.handlers import StatsHandler, TensorBoardStatsHandler

    handlers = list(every_rank)
    if is_main_process():
        handlers += [StatsHandler(iteration_log=False),
                     TensorBoardStatsHandler(log_dir=str(Path(output_dir) / "tensorboard"), iteration_log=False)]
    return handlers


def _batch_files(batch) -> list[str]:
    if isinstance(batch, (list, tuple)):  # decollated: one dict per item
        return list(dict.fromkeys(f for item in batch for f in _batch_files(item)))
    meta = getattr(batch.get("image"), "meta", None) if isinstance(batch, dict) else None
    names = (meta or {}).get("filename_or_obj") if meta is not None else None
    if names is None and isinstance(batch, dict):
        names = batch.get("image_meta_dict", {}).get("filename_or_obj") if isinstance(batch.get("image_meta_dict"), dict) else None
    if isinstance(names, str):
        return [names]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else []


class FiniteLoss:
    """Stop training at the first non-finite loss, naming the epoch, the iteration and the batch's files."""

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        if isinstance(output, (list, tuple)) and output:  # MONAI decollates the output: the loss is in every item
            output = output[0]
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None or bool(torch.isfinite(torch.as_tensor(loss)).all()):
            return
        files = _batch_files(engine.state.batch)
        where = f"; inputs: {', '.join(files[:5])}" if files else ""
        raise FloatingPointError(f"the training loss is {float(torch.as_tensor(loss).float().mean())} at epoch {engine.state.epoch}, "
                                 f"iteration {engine.state.iteration}{where}: check those inputs for NaN / infinite values, and the learning rate")


class ValidateLastEpoch:
    """Validate after the last epoch when ``val_interval`` skipped it."""

    def __init__(self, validator, interval: int):
        self.validator, self.interval = validator, int(interval)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        epoch = engine.state.epoch
        if epoch == engine.state.max_epochs and epoch % self.interval != 0:
            self.validator.run(epoch)


__all__ = ["EpochSummary", "FiniteLoss", "ValidateLastEpoch", "progress_handlers", "train_handlers", "validation_handlers"]
