"""VTAB-1k and FGVC in the layouts the GPS / SPT loaders read (FightingFighting/GPS data/vtab.py and data/fgvc.py; ziplab/SPT lib/datasets.py).

VTAB-1k: ``<task>/{train800,val200,train800val200,test}.txt`` with lines ``<relative path> <label>``.
FGVC: the VPT JSON splits ``{train,val,test}.json`` mapping relative path -> class id; ids are
remapped to 0..C-1 over the union of all splits, sorted, as the reference loader does, so that a
data set whose ids start at 1 or skip numbers still indexes a C-way head.
Missing images and labels outside the class count are reported before training, with examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

_SHOW = 5


def _check(items: list[dict], source: Path, num_classes: int | None) -> list[dict]:
    missing = [it["image"] for it in items if not Path(it["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} names {len(missing)} image(s) that do not exist, e.g. {missing[:_SHOW]}")
    if num_classes is not None:
        bad = [(it["image"], it["label"]) for it in items if not 0 <= it["label"] < num_classes]
        if bad:
            raise ValueError(f"{source} has {len(bad)} label(s) outside 0..{num_classes - 1}, e.g. {bad[:_SHOW]}")
    return items


def vtab_split(task_dir: str | Path, split: str, num_classes: int | None = None) -> list[dict]:
    """``[{"image": path, "label": int}]`` of one VTAB-1k split file."""
    task_dir = Path(task_dir)
    path = task_dir / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"VTAB-1k split file {path} is missing (expected {{train800,val200,train800val200,test}}.txt)")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<image path> <integer label>', got {line!r}")
        items.append({"image": str(task_dir / parts[0]), "label": int(parts[1])})
    return _check(items, path, num_classes)


def fgvc_splits(task_dir: str | Path, splits: Sequence[str] = ("train", "val", "test"), image_dir: str = "",
                num_classes: int | None = None) -> dict[str, list[dict]]:
    """Each split's ``[{"image", "label"}]``, class ids remapped over all splits present."""
    task_dir = Path(task_dir)
    raw = {}
    for split in ("train", "val", "test"):
        path = task_dir / f"{split}.json"
        if path.is_file():
            try:
                raw[split] = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from err
    absent = [s for s in splits if s not in raw]
    if absent:
        raise FileNotFoundError(f"FGVC split file(s) {[str(task_dir / f'{s}.json') for s in absent]} are missing")
    ids = sorted({int(v) for split in raw.values() for v in split.values()})
    remap = {old: new for new, old in enumerate(ids)}
    if num_classes is not None and len(ids) != num_classes:
        raise ValueError(f"{task_dir} has {len(ids)} classes over its splits, the recipe expects {num_classes}")
    root = task_dir / image_dir
    return {s: _check([{"image": str(root / p), "label": remap[int(v)]} for p, v in raw[s].items()], task_dir / f"{s}.json", None)
            for s in splits}
