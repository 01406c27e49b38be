"""Data: 2D image folders, 3D volumes (readers, layouts, pre-processing), synthetic polyps and organs.

Each name loads its module on first use: a script that only lists or splits a folder must not pull
MONAI's transforms and nibabel in behind it.
"""

from medseg_peft.lazy import lazy_package

_EXPORTS = {
    "check_pairs": "polyp_folders",
    "pair_by_stem": "folders",
    "polyp_datalists": "polyp_folders",
    "split_by_stem": "folders",
    "polyp_transforms": "polyp_transforms",
    "ORGAN_CLASSES": "synthetic_organs",
    "make_synthetic_organs": "synthetic_organs",
    "default_cache_dir": "synthetic_polyps",
    "make_synthetic_polyps": "synthetic_polyps",
    "polyp_image_pair": "synthetic_polyps",
    "class_names": "volume_folders",
    "volume_datalists": "volume_folders",
    "SaveLabelVolumed": "volume_writers",
    "SimpleITKReader": "volume_io",
    "VolumeDataError": "volume_files",
    "VolumeGeometry": "volume_geometry",
    "check_volume_pair": "volume_checks",
    "list_volumes": "volume_files",
    "read_geometry": "volume_geometry",
    "write_label_volume": "volume_writers",
    "INTENSITY_PRESETS": "volume_transforms",
    "label_postprocessing": "volume_transforms",
    "slice_sampling": "volume_transforms",
    "volume_preprocessing": "volume_transforms",
    "volume_preprocessing_config": "volume_transforms",
}
lazy_package(__name__, _EXPORTS)

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
    "make_synthetic_polyps",
    "pair_by_stem",
    "polyp_datalists",
    "polyp_image_pair",
    "polyp_transforms",
    "split_by_stem",
]
