"""The resumable state of a run: the tuned entries, optimizer, schedule, engine and every random state.

A checkpoint is written per epoch, beside the previous one and renamed into place, so a kill at any
moment leaves one complete checkpoint, and a resumed run draws the same shuffles and augmentations as
an uninterrupted one (Python, NumPy, torch and the loaders' generators, and MONAI's random transforms).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from medseg_peft.distributed import broadcast_object, is_main_process, rank, unwrap
from medseg_peft.io import atomic_write
from medseg_peft.tuning.tuned_state import TunedState

log = logging.getLogger("medseg_peft")

CHECKPOINT_DIR = "checkpoints"


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


__all__ = ["CHECKPOINT_DIR", "Checkpoints", "RandomState", "TransformsState", "numpy_state", "random_neutral", "set_numpy_state"]
