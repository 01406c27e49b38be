"""The published classification recipes (GPS, with SPT's where it differs) as data: ``configs/<benchmark>/<task>.yaml``.

Each value in those files names its source in a comment, so a reader can check a number against the
released scripts instead of trusting this code; this module only finds, reads and validates them.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
VTAB_TASKS = (
    "cifar100", "caltech101", "dtd", "flowers102", "pets", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
)
FGVC_TASKS = ("cub", "nabirds", "flowers", "dogs", "cars")
REQUIRED = ("task", "benchmark", "folder", "num_classes", "train_split", "eval_split", "transforms", "gps", "published")


def benchmark_of(task: str) -> str:
    if task in VTAB_TASKS:
        return "vtab"
    if task in FGVC_TASKS:
        return "fgvc"
    raise ValueError(f"unknown task {task!r}; the 24 tasks are VTAB-1k {list(VTAB_TASKS)} and FGVC {list(FGVC_TASKS)}")


def load_recipe(task: str, config_dir: str | Path | None = None) -> dict:
    """The recipe of one of the 24 tasks, checked for the keys the runner needs."""
    import yaml

    path = Path(config_dir or CONFIG_DIR) / benchmark_of(task) / f"{task}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} is missing (a source checkout has configs/vtab and configs/fgvc)")
    recipe = yaml.safe_load(path.read_text())
    missing = [key for key in REQUIRED if key not in recipe]
    if missing:
        raise ValueError(f"recipe {path} lacks {missing}")
    if recipe["task"] != task:
        raise ValueError(f"recipe {path} describes task {recipe['task']!r}, not {task!r}")
    return recipe
