"""The skeleton every task bundle shares, written once: device, ranks, selection, handlers, checkpoints, the run.

The task bundles (``polyp_fps.json``, ``organ_fps.json``, ``classify.json``) keep only what differs
between tasks (data, network, loss, metrics, their user keys) and MONAI's own trainer / evaluator
components under the model-zoo IDs (``train#trainer``, ``validate#evaluator``, ...); everything they
would otherwise repeat is a call into this module. That also puts every "rank 0 only" decision of a
``torchrun`` run in one place: logging, TensorBoard, checkpoints, ``metrics.json`` and the best result
file are written by rank 0, while the handlers every rank needs (the learning-rate schedule, the
validation that all ranks run together) are attached everywhere. The ``multi_gpu.json`` layer only
switches the process group, samplers and ``DistributedDataParallel`` on.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from medseg_peft.io import atomic_write
from medseg_peft.distributed import barrier, broadcast_object, is_distributed, is_main_process, rank, world_size
from medseg_peft.selection.base import Selector
from medseg_peft.selection.selection import Selection

log = logging.getLogger("medseg_peft")

SELECTION_FILE = "selection.safetensors"
CHECKPOINT_DIR = "checkpoints"


def given(value) -> bool:
    """Whether a bundle key holds a value (the CLI writes ``None`` / ``null`` / an empty string for none)."""
    return value not in (None, "", "None", "null")


# ---- devices and processes ---------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this process's GPU when there is one (``cuda:LOCAL_RANK`` under torchrun), else the CPU;
    ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as given."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but this machine has no CUDA device; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and keep ranks > 0 quiet below WARNING."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("the multi-GPU layer runs under torchrun: torchrun --nproc_per_node=N -m monai.bundle run "
                           "--config_file \"['bundles/polyp_fps.json','bundles/multi_gpu.json']\"")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    import ignite.distributed as idist

    idist.get_rank()  # ignite's metrics and savers join the group lazily, with collectives: let every rank join now
    if dist.get_rank() > 0:
        for name in ("", "medseg_peft", "ignite", "monai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log.info("process group: %d processes (%s), this is rank %d on %s",
             dist.get_world_size(), dist.get_backend(), dist.get_rank(), device)


def check_shardable(dataset, what: str) -> None:
    """Every rank needs at least one item of ``dataset`` (a validation set is split without padding)."""
    n, ranks = len(dataset), world_size()
    if n < ranks:
        raise ValueError(f"the {what} set has {n} item(s), fewer than the {ranks} processes that share it: "
                         f"raise val_fraction (or add data), or run with --nproc_per_node {max(n, 1)}")


def start_run(output_dir: str | Path, seed: int, **numbers) -> None:
    """The ``initialize`` entry of every task bundle, before any data or model work: errors printed short
    and last, unknown command-line keys refused, ``numbers`` (lr, epochs, ...) and a writable
    ``output_dir`` checked, ``output_dir`` locked for this run, everything seeded (``set_determinism``)."""
    from monai.utils import set_determinism

    from medseg_peft.workflows.guards import check_cli_keys, check_settings, lock_output_dir, short_errors

    short_errors()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"setting 'seed' must be a non-negative integer, got {seed!r}")
    check_cli_keys()
    check_settings(output_dir, **numbers)
    lock_output_dir(output_dir)
    set_determinism(seed=seed)


def end_run(output_dir: str | Path) -> None:
    """The ``finalize`` entry: release ``output_dir``."""
    from medseg_peft.workflows.guards import release_output_dir

    release_output_dir(output_dir)


def destroy_distributed() -> None:
    """The ``finalize`` entry: leave the process group together (a rank that tears down its gloo
    connections while another still writes its last files can abort that one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or the network itself)."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


# ---- selection ---------------------------------------------------------------------------------
def method_name(selector_target) -> str:
    """The method a bundle's ``selector`` runs, from its ``_target_`` (a dotted class path or the class):
    names the output folder without building the selector."""
    import pydoc

    cls = pydoc.locate(selector_target) if isinstance(selector_target, str) else selector_target
    if not (isinstance(cls, type) and issubclass(cls, Selector)):
        raise ValueError(f"selector _target_ {selector_target!r} is not a medseg_peft selector class (e.g. medseg_peft.GPS)")
    return cls.method


def select_or_resume(selector: Selector, network: nn.Module, batches: Iterable, output_dir: str | Path,
                     max_batches: int | None = None, method: str | None = None, base_dtype: str | None = None,
                     checkpointing: bool | str = False, settings: dict | None = None) -> nn.Module:
    """Select on the first ``max_batches`` batches and attach; or re-attach the selection a previous run saved.

    The selection is saved to ``output_dir/selection.safetensors`` before training starts, so an
    interrupted run resumes with the very same entries (GPS / FPS scores depend on the batches seen).
    Under torchrun every rank scores its own batches and the statistics are summed before the choice
    (``Selector.select`` checks that all ranks chose the same); rank 0 saves it, and on resume rank 0's
    saved file is sent to every rank, so each re-attaches exactly the saved entries.

    ``method`` is the bundle's ``method`` key: a value other than the selector's own (a ``--method gps``
    override of a bundle whose selector is FPS) is an error, since the method is chosen by a layer.
    ``base_dtype`` (e.g. ``"bfloat16"``) stores the frozen base that low after attaching (``cast_base``);
    ``checkpointing`` checkpoints the transformer blocks (``activation_checkpointing``). ``settings`` (what
    defines the selection: method, data, seed, base model, ...) are recorded in the folder, and a folder
    holding a run made with others stops here (``guards.check_run_settings``).
    """
    from medseg_peft.models.checkpointing import MODES, activation_checkpointing
    from medseg_peft.tuning.base_dtype import cast_base, resolve_dtype

    if given(base_dtype):  # bad values stop here, before any selection work
        resolve_dtype(base_dtype)
    checkpointing = checkpointing or False
    if checkpointing not in MODES:
        raise ValueError(f"checkpointing must be one of {MODES} (true, false or \"selective\"), got {checkpointing!r}")
    if given(method) and str(method).lower() != selector.method:
        raise ValueError(
            f"method={method!r} was given, but this bundle's selector is {selector!r}. A method is a layer: "
            f"--config_file \"['<task bundle>.json','bundles/methods/{str(method).lower()}.json']\" "
            f"(or --selector \"%bundles/methods/{str(method).lower()}.json#selector\")"
        )
    if settings is not None:
        from medseg_peft.workflows.guards import check_run_settings

        check_run_settings(output_dir, settings)
    path = Path(output_dir) / SELECTION_FILE
    saved = broadcast_object(Selection.load(path) if is_main_process() and path.is_file() else None)
    if saved is not None:
        if saved.method != selector.method:
            raise ValueError(f"{path} was made by {saved.method!r}, this run uses {selector.method!r}; pick another output_dir")
        selection = saved
        log.info("resuming with the selection saved in %s", path)
    else:
        if isinstance(batches, torch.utils.data.DataLoader) and len(batches) == 0:
            raise ValueError(f"the selection loader yields no batch: {len(batches.dataset)} training item(s) per process and "
                             f"batch_size {batches.batch_size} with drop_last; lower batch_size or add data")
        start = time.perf_counter()
        selection = selector.select(network, islice(batches, max_batches))
        log.info("selection by %s took %.1f s", selector.method, time.perf_counter() - start)
        if is_main_process():
            selection.save(path)
    log.info("\n%s", selection.summary())
    network = cast_base(selector.apply(network, selection), base_dtype if given(base_dtype) else None)
    return activation_checkpointing(network, checkpointing)


# ---- handlers ----------------------------------------------------------------------------------
def train_handlers(lr_scheduler, validator, val_interval: int, output_dir: str | Path, stream=None) -> list:
    """Every rank: a stop at a non-finite loss, the per-iteration learning-rate schedule and validation (all
    ranks validate together; the last epoch always). Rank 0: the progress (:func:`progress_handlers`,
    the bar on ``stream``, by default stderr) and the loss in TensorBoard."""
    from monai.handlers import LrScheduleHandler, TensorBoardStatsHandler, ValidationHandler, from_engine

    from medseg_peft.workflows.guards import FiniteLoss, ValidateLastEpoch

    if isinstance(val_interval, bool) or not isinstance(val_interval, int) or val_interval <= 0:
        raise ValueError(f"val_interval must be a positive integer (epochs between validations), got {val_interval!r}")
    handlers = [
        FiniteLoss(),
        LrScheduleHandler(lr_scheduler, epoch_level=False, print_lr=False),
        ValidationHandler(validator=validator, interval=int(val_interval), epoch_level=True, exec_at_start=True),
        ValidateLastEpoch(validator, int(val_interval)),
    ]
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


# ---- checkpoints and the run -------------------------------------------------------------------
def numpy_state(generator) -> dict:
    """A NumPy generator's state (``np.random`` or a ``RandomState``) as plain types and a tensor:
    checkpoints are read with ``weights_only=True``, which refuses NumPy arrays."""
    kind, keys, pos, has_gauss, gauss = generator.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def set_numpy_state(generator, state: dict) -> None:
    """Restore a state :func:`numpy_state` took."""
    generator.set_state((state["kind"], state["keys"].numpy().astype("uint32"), state["pos"], state["has_gauss"], state["gauss"]))


class RandomState:
    """The random generators' states (Python, NumPy, torch CPU and CUDA, and the training loader's own
    generators: MONAI's DataLoader shuffles with a generator of its own) for a resumable checkpoint, so
    that a resumed run draws the same augmentations and shuffles as an uninterrupted one would have."""

    def __init__(self, loader=None):
        gens = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
        self.generators = [g for i, g in enumerate(gens) if isinstance(g, torch.Generator) and g not in gens[:i]]

    def state_dict(self) -> dict:
        import random

        import numpy as np

        state = {"python": random.getstate(), "numpy": numpy_state(np.random), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        state["loader"] = [g.get_state() for g in self.generators]
        return state

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        import random

        import numpy as np

        if not state:
            return
        random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
        set_numpy_state(np.random, state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        for g, saved in zip(self.generators, state.get("loader", [])):
            g.set_state(saved)


class TransformsState:
    """The random states of MONAI's random transforms (each keeps its own ``RandomState``, not the global
    one), for a resumable checkpoint. torchvision transforms draw from torch's generator (``RandomState``)."""

    def __init__(self, transform):
        from monai.transforms import Randomizable

        found, seen = [], set()

        def visit(obj) -> None:  # every Randomizable reachable from ``transform``: dict transforms hold array ones
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if isinstance(obj, (list, tuple)):
                for item in obj:
                    visit(item)
                return
            if not isinstance(obj, Randomizable) and not hasattr(obj, "transforms"):
                return
            if isinstance(obj, Randomizable) and hasattr(obj, "R"):
                found.append(obj)
            for value in vars(obj).values():
                visit(value)

        visit(transform)
        self.randomizable = found

    def state_dict(self) -> dict:
        return {str(i): numpy_state(t.R) for i, t in enumerate(self.randomizable)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        for i, t in enumerate(self.randomizable):
            if str(i) in state:
                set_numpy_state(t.R, state[str(i)])


class Checkpoints:
    """The resumable training state: only the tuned part of the network (``TunedState``), the optimizer,
    the scheduler, the engine, the random state (global generators and the training ``transforms``' own),
    and any ``extra`` objects with a ``state_dict`` (e.g. EMA weights).

    Rank 0 writes one checkpoint per epoch into ``<output_dir>/checkpoints``; every rank resumes from
    the file rank 0 found, so an ``output_dir`` shared by the nodes of a multi-node run is required
    for resuming there.
    """

    def __init__(self, output_dir: str | Path, network: nn.Module, optimizer, lr_scheduler, transforms=None, loader=None,
                 extra: dict | None = None):
        from medseg_peft.workflows.tuned_state import TunedState

        self.directory = Path(output_dir) / CHECKPOINT_DIR
        self.objects = {"deltas": TunedState(unwrap(network)), "optimizer": optimizer, "lr_scheduler": lr_scheduler,
                        "rng": RandomState(loader), **(extra or {})}
        if transforms is not None:
            self.objects["transforms"] = TransformsState(transforms)

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        self.objects["trainer"] = trainer
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, trainer) -> Path | None:
        """Rank 0 writes ``checkpoint_epoch=N.pt`` beside the old one, renames it into place, then deletes
        the old one: a kill at any moment leaves one complete checkpoint (MONAI's saver writes in place
        and deletes the previous file first)."""
        if not is_main_process():
            return None
        path = self.directory / f"checkpoint_epoch={trainer.state.epoch}.pt"
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        atomic_write(path, lambda tmp: torch.save(state, tmp), fsync=True)  # on disk before the rename makes it the checkpoint
        for old in self.directory.glob("checkpoint_epoch=*.pt"):
            if old != path:
                old.unlink()
        log.info("saved checkpoint %s", path)
        return path

    def last(self) -> Path | None:
        found = sorted(self.directory.glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[-1]) if p.stem.split("=")[-1].isdigit() else -1)
        return found[-1] if found else None

    def resume(self, trainer) -> bool:
        """Load the newest checkpoint now; return whether training epochs remain.

        Loading happens before ``trainer.run()`` rather than at its STARTED event, so the validation that
        runs at start already sees the restored deltas.
        """
        from monai.handlers import CheckpointLoader

        self.objects["trainer"] = trainer
        self.resumed_from = None
        path = broadcast_object(str(self.last()) if is_main_process() and self.last() else None)
        if path is None:
            return True
        if not Path(path).is_file():
            raise FileNotFoundError(f"rank {rank()} cannot read checkpoint {path} that rank 0 resumes from: "
                                    "a resumed multi-node run needs an output_dir all nodes share")
        max_epochs = trainer.state.max_epochs
        try:
            CheckpointLoader(load_path=path, load_dict=self.objects)(trainer)
        except Exception as err:
            if is_main_process():
                os.replace(path, path + ".corrupt")
            raise ValueError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); it was set aside as "
                             f"{Path(path).name}.corrupt: run again to start from the previous checkpoint, if any, or from the start") from err
        self.resumed_from = path
        trainer.state.max_epochs = max_epochs  # a resumed run may be asked for more epochs
        done = trainer.state.epoch
        log.info("resumed from %s at epoch %d of %d", path, done, max_epochs)
        if done >= max_epochs:
            log.warning("this run already finished its %d epochs; delete %s (or raise --epochs) to train again", max_epochs, self.directory)
            return False
        return True


def random_neutral(engine) -> None:
    """Let ``engine``'s runs leave torch's random state as they found it. A validation draws from it only
    to seed its data loader, but a resumed run validates once more at its start: without this, its
    training would draw other shuffles and augmentations than the uninterrupted run."""
    from ignite.engine import Events

    kept = {}

    def save(_):
        kept["cpu"] = torch.get_rng_state()
        kept["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(_):
        torch.set_rng_state(kept["cpu"])
        if kept["cuda"] is not None:
            torch.cuda.set_rng_state_all(kept["cuda"])

    engine.add_event_handler(Events.STARTED, save)
    engine.add_event_handler(Events.COMPLETED, restore)


def train(trainer, evaluator, report, checkpoints: Checkpoints) -> None:
    """The run entry of every task bundle: report and checkpoints attached, resume, train."""
    random_neutral(evaluator)
    report.attach(evaluator)
    checkpoints.attach(trainer)
    remaining = checkpoints.resume(trainer)
    if checkpoints.resumed_from is None:
        report.restart()  # no checkpoint (a new run, or its checkpoints were deleted): a fresh history and best
    if remaining:
        trainer.run()
    barrier()


def on_main_process(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only (pictures and files written once)."""
    return fn(*args, **kwargs) if is_main_process() else None


__all__ = [
    "Checkpoints",
    "check_shardable",
    "destroy_distributed",
    "end_run",
    "given",
    "init_distributed",
    "is_distributed",
    "local_rank",
    "method_name",
    "on_main_process",
    "resolve_device",
    "select_or_resume",
    "start_run",
    "train",
    "train_handlers",
    "unwrap",
    "validation_handlers",
    "world_size",
]
