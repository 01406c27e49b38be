"""The run folder: one run per ``output_dir``, and the settings its selection and checkpoints depend on.

- :class:`RunLock`: one run per ``output_dir`` (a lock file holding the owner's pid; a lock whose
  process is gone is taken over), so two runs never mix their files.
- :func:`check_run_settings`: the folder records what defines its selection and checkpoint (method,
  its settings, data and its split, selection batches, seed, base model); a rerun with other values
  stops and says what differs, instead of resuming someone else's state under new settings.
- :func:`check_settings`: the numeric settings and a writable output folder, before any work.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from medseg_peft.distributed import is_main_process
from medseg_peft.io import atomic_write_json

log = logging.getLogger("medseg_peft")

SETTINGS_FILE = "run.json"
LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``output_dir/.lock`` holding this process's pid while the run lives (rank 0 only under torchrun)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        if not is_main_process():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and _alive(owner):
                    raise RuntimeError(f"{self.path.parent} is in use by another run (pid {owner}); wait for it, or pick another output_dir")
                log.warning("taking over the stale lock of pid %s in %s", owner or "?", self.path.parent)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise RuntimeError(f"could not lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink(missing_ok=True)
            except OSError as err:  # a folder made read-only: the next run takes the lock over, its pid being gone
                log.warning("could not remove the lock %s (%s); the next run takes it over", self.path, err.strerror or err)


_LOCKS: dict[str, RunLock] = {}


def lock_output_dir(output_dir: str | Path) -> RunLock:
    """Lock ``output_dir`` for this process (released by :func:`release_output_dir` or at exit)."""
    import atexit

    key = str(Path(output_dir).resolve())
    if key not in _LOCKS:
        _LOCKS[key] = RunLock(output_dir).acquire()
        atexit.register(_LOCKS[key].release)
    return _LOCKS[key]


def release_output_dir(output_dir: str | Path) -> None:
    lock = _LOCKS.pop(str(Path(output_dir).resolve()), None)
    if lock is not None:
        lock.release()


def base_fingerprint(network: torch.nn.Module) -> str:
    """A short hash of the base weights (sums per tensor): another checkpoint gives another value."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in network.named_parameters():
            v = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{float(v.sum()):.10e}:{float((v * v).sum()):.10e}".encode())
    return h.hexdigest()[:16]


def data_fingerprint(data: dict) -> str:
    """A short hash of which items are in which split (``train`` / ``val`` / ``eval`` / ``test`` lists of a task's
    data): the same folder split with another ``val_fraction`` or seed gives another value, so a rerun cannot
    resume a run whose history was scored on other validation items."""
    import hashlib

    h = hashlib.sha256()
    for split in ("train", "val", "eval", "test"):
        items = data.get(split) if isinstance(data, dict) else None
        if not isinstance(items, list):
            continue
        names = sorted(str(it.get("name") or Path(str(it.get("image", ""))).name) if isinstance(it, dict) else str(it) for it in items)
        h.update(f"{split}:{len(names)}:{'|'.join(names)};".encode())
    return h.hexdigest()[:16]


def check_run_settings(output_dir: str | Path, settings: dict) -> dict:
    """Record ``settings`` in ``output_dir/run.json``, or stop if the folder holds a run made with others."""
    path = Path(output_dir) / SETTINGS_FILE
    normal = json.loads(json.dumps(settings, default=str, sort_keys=True))
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not readable JSON ({err}); delete it (and the folder's selection and checkpoints) to start fresh") from err
        differ = {k: (before.get(k), normal.get(k)) for k in sorted(set(before) | set(normal)) if before.get(k) != normal.get(k)}
        if differ:
            lines = "; ".join(f"{k}: {a!r} in the folder, {b!r} now" for k, (a, b) in differ.items())
            raise ValueError(f"{Path(output_dir)} holds a run made with other settings ({lines}). Rerun with the folder's settings to "
                             "continue it, or pick another output_dir (or delete this one) to start fresh")
        return normal
    if is_main_process():
        atomic_write_json(normal, path, sort_keys=True)
    return normal


def check_settings(output_dir: str | Path, **numbers) -> None:
    """Positive numbers where numbers are expected (``lr``, ``epochs``, ``batch_size``, ...), and a writable
    ``output_dir``, before any selection or training work."""
    for key, value in numbers.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"setting {key!r} must be a number, got {value!r} ({type(value).__name__})")
        if not value > 0 or value != value:
            raise ValueError(f"setting {key!r} must be positive, got {value!r}")
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"output_dir {folder} is not writable ({err.strerror or err}); pick another output_dir") from err


__all__ = ["LOCK_FILE", "SETTINGS_FILE", "RunLock", "base_fingerprint", "check_run_settings", "check_settings", "data_fingerprint",
           "lock_output_dir", "release_output_dir"]
