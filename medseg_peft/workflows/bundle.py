"""The run entry every task bundle calls: start (checks, lock, seed), select or resume, train, end.

The task bundles (``polyp_fps.json``, ``organ_fps.json``, ``classify.json``) keep only what differs
between tasks (data, network, loss, metrics, their user keys); the trainer / checkpoint skeleton they share
is ``bundles/base.json``, and what that skeleton calls lives in the workflow modules: this one, the run folder (:mod:`.run_folder`), the handlers
(:mod:`.handlers`), the checkpoints (:mod:`.checkpoints`) and the process group
(:mod:`medseg_peft.distributed`). Every "rank 0 only" decision of a ``torchrun`` run lives in those
modules; the ``multi_gpu.json`` layer only switches the process group, samplers and
``DistributedDataParallel`` on.
"""

from __future__ import annotations

import logging
import time
from itertools import islice
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from medseg_peft.distributed import barrier, broadcast_object, is_main_process
from medseg_peft.entries import Selection
from medseg_peft.selection.base import Selector
from medseg_peft.workflows.checkpoints import Checkpoints, random_neutral
from medseg_peft.workflows.cli import check_cli_keys
from medseg_peft.workflows.errors import short_errors
from medseg_peft.workflows.run_folder import check_run_settings, check_settings, lock_output_dir, release_output_dir

log = logging.getLogger("medseg_peft")

SELECTION_FILE = "selection.safetensors"


def given(value) -> bool:
    """Whether a bundle key holds a value (the CLI writes ``None`` / ``null`` / an empty string for none)."""
    return value not in (None, "", "None", "null")


def start_run(output_dir: str | Path, seed: int, **numbers) -> None:
    """The ``initialize`` entry of every task bundle, before any data or model work: errors printed short
    and last, unknown command-line keys refused, ``numbers`` (lr, epochs, ...) and a writable
    ``output_dir`` checked, ``output_dir`` locked for this run, everything seeded (``set_determinism``)."""
    from monai.utils import set_determinism

    short_errors()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"setting 'seed' must be a non-negative integer, got {seed!r}")
    check_cli_keys()
    check_settings(output_dir, **numbers)
    lock_output_dir(output_dir)
    set_determinism(seed=seed)


def end_run(output_dir: str | Path) -> None:
    """The ``finalize`` entry: release ``output_dir``."""
    release_output_dir(output_dir)


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
    holding a run made with others stops here (``run_folder.check_run_settings``).
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
            f"--config_file \"['<task bundle>.json',...,'bundles/methods/{str(method).lower()}.json']\" "
            f"(or --selector \"%bundles/methods/{str(method).lower()}.json#selector\")"
        )
    if settings is not None:
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


__all__ = ["SELECTION_FILE", "end_run", "given", "method_name", "on_main_process", "select_or_resume", "start_run", "train"]
