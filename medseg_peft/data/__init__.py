"""Data: batch conventions, 2D polyp folders and their transforms, synthetic polyps; volumes and FGVC / VTAB-1k to come."""

from medseg_peft.data.batches import iter_batches, split_batch
from medseg_peft.data.polyp_folders import check_pairs, pair_by_stem, polyp_datalists, split_by_stem
from medseg_peft.data.polyp_transforms import polyp_transforms
from medseg_peft.data.synthetic_polyps import default_cache_dir, make_synthetic_polyps, polyp_image_pair

__all__ = [
    "check_pairs",
    "default_cache_dir",
    "iter_batches",
    "make_synthetic_polyps",
    "pair_by_stem",
    "polyp_datalists",
    "polyp_image_pair",
    "polyp_transforms",
    "split_batch",
    "split_by_stem",
]
