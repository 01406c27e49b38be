"""Guards a run folder and a training loop against the mistakes that give a wrong result silently.

- :func:`check_cli_keys`: a misspelt ``--epoch 1`` would otherwise add a new key and run the default
  12 epochs; an unknown key is an error naming the nearest valid one.
- :class:`RunLock`: one run per ``output_dir`` (a lock file holding the owner's pid; a lock whose
  process is gone is taken over), so two runs never mix their files.
- :func:`check_run_settings`: the folder records what defines its selection and checkpoint (method,
  its settings, data, selection batches, seed, base model); a rerun with other values stops and says
  what differs, instead of resuming someone else's state under new settings.
- :class:`FiniteLoss`: a NaN or infinite loss stops training at that step, naming the inputs.
- :class:`ValidateLastEpoch`: the last epoch is always validated, so every finished run has a result
  even when ``val_interval`` does not divide ``epochs``.
- :func:`short_errors`: a bundle error arrives wrapped in MONAI's ``Failed to evaluate ConfigExpression``
  chain, the cause 40 lines up; the cause is printed last, as one line, and the traceback is kept at
  DEBUG (``MEDSEG_PEFT_TRACEBACK=1`` prints it whole).
- :func:`check_settings`: the numeric settings and the output folder are checked before any work.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from medseg_peft.data.bundle_errors import error_chain, is_wrapper, under_monai_bundle
from medseg_peft.io import atomic_write_json
from medseg_peft.distributed import is_main_process

log = logging.getLogger("medseg_peft")

RUN_ARGS = {"config_file", "meta_file", "logging_file", "run_id", "init_id", "final_id", "tracking", "args_file", "workflow_type",
            "properties_path"}
SETTINGS_FILE = "run.json"
LOCK_FILE = ".lock"


# ---- command-line keys -------------------------------------------------------------------------
def _config_ids(config: dict, prefix: str = "") -> set[str]:
    ids = set()
    for key, value in config.items():
        ident = f"{prefix}#{key}" if prefix else str(key)
        ids.add(ident)
        if isinstance(value, dict):
            ids |= _config_ids(value, ident)
    return ids


def cli_keys(argv: list[str]) -> list[str]:
    """The ``--key`` names of a ``monai.bundle run`` command line (``--key value`` or ``--key=value``)."""
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def unknown_keys(keys: list[str], config: dict) -> dict[str, list[str]]:
    """``{key: nearest valid keys}`` for every key that is not in ``config`` (a nested key needs its parent)."""
    valid = _config_ids(config)
    bad = {}
    for key in keys:
        key = key.replace("::", "#")
        if key in RUN_ARGS or key in valid:
            continue
        parent = key.rpartition("#")[0]
        if parent and parent in valid:
            continue  # a new setting of an existing component: the component checks its own arguments
        bad[key] = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.5)
    return bad


def check_cli_keys(argv: list[str] | None = None) -> None:
    """Under ``python -m monai.bundle run``: refuse command-line keys the bundle does not have."""
    argv = sys.argv if argv is None else argv
    if not under_monai_bundle(argv):
        return  # not the MONAI command line (a notebook, a test, the Python API)
    from monai.bundle import ConfigParser

    files = next((argv[i + 1] for i, a in enumerate(argv) if a == "--config_file" and i + 1 < len(argv)), None)
    files = next((a.split("=", 1)[1] for a in argv if a.startswith("--config_file=")), files)
    if files is None:
        return
    try:
        import ast

        names = ast.literal_eval(files) if files.strip().startswith("[") else files
    except (ValueError, SyntaxError):
        names = files
    config = ConfigParser.load_config_files(names)
    bad = unknown_keys(cli_keys(argv[1:]), config)
    if bad:
        lines = [f"--{k}" + (f" (did you mean {', '.join('--' + m for m in near)}?)" if near else "") for k, near in bad.items()]
        raise ValueError("unknown setting(s) for this bundle: " + "; ".join(lines))


# ---- one run per folder ------------------------------------------------------------------------
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


# ---- the settings a folder's state depends on --------------------------------------------------
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


# ---- training-loop guards ----------------------------------------------------------------------
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


# ---- errors a user can act on -------------------------------------------------------------------
USER_ERRORS = (ValueError, OSError, FloatingPointError, TypeError, KeyError, NotImplementedError)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _written_for_users(err: BaseException) -> bool:
    """Raised by a ``raise`` statement of this package: a message written to name the file or key at fault
    (an error a library raised inside our code, or a bug, keeps its traceback)."""
    import linecache

    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not filename.startswith(_PACKAGE_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def user_error(err: BaseException) -> BaseException | None:
    """The exception whose message a user should read, or None when the whole traceback is needed.

    Along the chain, outermost first: the first error this package raised on purpose (it names the file or
    key, and wraps the library's low-level cause: ``image ... cannot be decoded`` over PIL's ``image file
    is truncated``, ``... is in use by another run`` over ``FileExistsError``); else the innermost error of
    a kind a user can act on (a library's ``FileNotFoundError``); MONAI's ``Failed to evaluate ...``
    wrappers never, since they name a config expression, not the cause."""
    chain = [e for e in error_chain(err) if not is_wrapper(e)]
    for e in chain:
        if _written_for_users(e):
            return e
    for e in reversed(chain):
        if isinstance(e, USER_ERRORS):
            return e
    return None


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception along ``__cause__`` / ``__context__`` (where a wrapped error began)."""
    return error_chain(err)[-1]


def _short_excepthook(kind, err, tb, _previous=sys.excepthook):
    shown = user_error(err)
    if os.environ.get("MEDSEG_PEFT_TRACEBACK") or shown is None:
        return _previous(kind, err, tb)
    import traceback

    log.debug("full traceback:\n%s", "".join(traceback.format_exception(kind, err, tb)))
    message = " ".join(str(shown).split()) or type(shown).__name__  # one line, whatever the message's own line breaks
    print(f"medseg-peft: {type(shown).__name__}: {message} (MEDSEG_PEFT_TRACEBACK=1 prints the traceback)", file=sys.stderr, flush=True)


def short_errors() -> None:
    """Under ``python -m monai.bundle`` only, print a run's error as one line naming its cause, last."""
    if under_monai_bundle() and sys.excepthook is not _short_excepthook:
        sys.excepthook = _short_excepthook


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


__all__ = ["FiniteLoss", "RunLock", "ValidateLastEpoch", "base_fingerprint", "check_cli_keys", "check_run_settings", "data_fingerprint",
           "check_settings", "lock_output_dir", "release_output_dir", "root_cause", "short_errors", "unknown_keys", "user_error"]
