"""Glue the polyp bundles call: data lists (real or the synthetic default). The network, which the organ
bundles build too, is :mod:`medseg_peft.workflows.networks`.

Each function turns the bundle's top-level user keys into one object, so the JSON stays a readable
list of MONAI components and every decision (what "no dataset_dir" means, which SAM to build) lives in
Python with its explanation.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg_peft.distributed import main_process_first
from medseg_peft.workflows.bundle import given

log = logging.getLogger("medseg_peft")


def polyp_data(dataset_dir: str | None = None, val_fraction: float = 0.2, seed: int = 0, synthetic_images: int = 240, synthetic_size: int = 160) -> dict:
    """``{"train": [...], "val": [...], "source": str}``; with no ``dataset_dir``, the synthetic polyp set.

    The synthetic set is generated once into the cache folder in the Kvasir layout, so the real
    loader (pairing, checks, transforms) is exercised by the default run too.
    """
    from medseg_peft.data import make_synthetic_polyps, polyp_datalists
    from medseg_peft.data.polyp_folders import check_contents

    if given(dataset_dir):
        root = Path(dataset_dir).expanduser()
        source = str(root)
    else:
        root = main_process_first(make_synthetic_polyps, n_images=synthetic_images, size=synthetic_size, seed=seed)
        source = f"synthetic polyps ({synthetic_images} images, {synthetic_size} px) in {root}"
        log.info("no dataset_dir given: using %s", source)
    train, val = polyp_datalists(root, val_fraction=val_fraction, seed=seed)
    if not val:
        raise ValueError(f"{source} gives no validation images (val_fraction={val_fraction}): a run could measure nothing; "
                         "use a val_fraction in (0, 1) with enough images")
    check_contents(train, "training set")
    check_contents(val, "validation set")
    log.info("data: %d training and %d validation images from %s", len(train), len(val), source)
    return {"train": train, "val": val, "source": source}
