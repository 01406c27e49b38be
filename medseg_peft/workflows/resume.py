"""Pick up an interrupted run where its last checkpoint left it."""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine
from monai.handlers import CheckpointLoader

log = logging.getLogger("medseg_peft")


def last_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    found = sorted(Path(checkpoint_dir).glob("*.pt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resume_from_checkpoint(trainer: Engine, checkpoint_dir: str | Path, load_dict: dict) -> bool:
    """Load the newest checkpoint into ``load_dict`` now; return whether training epochs remain.

    Loading happens before ``trainer.run()`` rather than at its STARTED event, so the validation that
    runs at start already sees the restored deltas.
    """
    path = last_checkpoint(checkpoint_dir)
    if path is None:
        return True
    max_epochs = trainer.state.max_epochs
    CheckpointLoader(load_path=str(path), load_dict=load_dict)(trainer)
    trainer.state.max_epochs = max_epochs  # a resumed run may be asked for more epochs
    done = trainer.state.epoch
    log.info("resumed from %s at epoch %d of %d", path, done, max_epochs)
    if done >= max_epochs:
        log.warning("this run already finished its %d epochs; delete %s (or raise --epochs) to train again", max_epochs, checkpoint_dir)
        return False
    return True
