"""Generated data sets are written once into a cache folder, atomically.

A folder is built in a temporary sibling and renamed into place only when complete (a ``done.json``
marker records its parameters), so an interrupted run, or DDP ranks racing to build the same set,
never leave a half-written set that a later run would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "MEDSEG_PEFT_CACHE"
DONE_MARKER = "done.json"


def default_cache_dir() -> Path:
    """``$MEDSEG_PEFT_CACHE`` if set, else ``~/.cache/medseg_peft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medseg_peft").expanduser()


def build_once(target: Path, params: dict, build: Callable[[Path], None]) -> Path:
    """``target`` if it is complete; else ``build(tmp_folder)`` and move the result into place."""
    if (target / DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        (tmp / DONE_MARKER).write_text(json.dumps(params, indent=2) + "\n")
        if (target / DONE_MARKER).is_file():  # another process finished first: keep its copy
            return target
        if target.exists() and not (target / DONE_MARKER).is_file():  # a leftover of a run that died before finishing
            shutil.rmtree(target, ignore_errors=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the set from whoever shares the cache
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / DONE_MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
