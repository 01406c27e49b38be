"""File writing that survives an interruption: write beside the target, then rename over it.

Every file a run leaves behind (result files, checkpoints, metrics, settings, pictures) goes
through :func:`atomic_write`, so a kill at any moment leaves the old file or the new one, never half
of one, and two processes writing the same file never share a temporary.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str | None = None, fsync: bool = False) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``.

    ``suffix`` is the temporary's (writers that pick a format by file name, e.g. ``.nii.gz``, need the
    target's); ``fsync`` puts the bytes on disk before the rename (checkpoints)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    except PermissionError as err:  # a folder made read-only (or a full quota) during a run: say which one
        raise PermissionError(f"{path.parent} is no longer writable ({err.strerror}): {path.name} cannot be written; "
                              "make the folder writable and run again to resume") from err
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever shares the results
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Save ``tensors`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write_json(data, path: str | Path, sort_keys: bool = False) -> Path:
    """``data`` as indented JSON at ``path``: a reader sees the old file or the new one."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
