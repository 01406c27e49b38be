"""Data: batch conventions, 2D polyp folders, 3D volumes (readers, layouts, pre-processing), synthetic polyps and organs."""

from medseg_peft.data.batches import iter_batches, split_batch
from medseg_peft.data.polyp_folders import check_pairs, pair_by_stem, polyp_datalists, split_by_stem
from medseg_peft.data.polyp_transforms import polyp_transforms
from medseg_peft.data.synthetic_organs import ORGAN_CLASSES, make_synthetic_organs
from medseg_peft.data.synthetic_polyps import default_cache_dir, make_synthetic_polyps, polyp_image_pair
from medseg_peft.data.volume_folders import class_names, volume_datalists
from medseg_peft.data.volume_io import (
    SaveLabelVolumed,
    SimpleITKReader,
    VolumeDataError,
    VolumeGeometry,
    check_volume_pair,
    list_volumes,
    read_geometry,
    write_label_volume,
)
from medseg_peft.data.volume_transforms import (
    INTENSITY_PRESETS,
    label_postprocessing,
    slice_sampling,
    volume_preprocessing,
    volume_preprocessing_config,
)

__all__ = [
    "INTENSITY_PRESETS",
    "ORGAN_CLASSES",
    "SaveLabelVolumed",
    "SimpleITKReader",
    "VolumeDataError",
    "VolumeGeometry",
    "check_volume_pair",
    "class_names",
    "label_postprocessing",
    "list_volumes",
    "make_synthetic_organs",
    "read_geometry",
    "slice_sampling",
    "volume_datalists",
    "volume_preprocessing",
    "volume_preprocessing_config",
    "write_label_volume",
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
