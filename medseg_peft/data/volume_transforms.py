"""Volume pre-processing as MONAI config: one definition for training, 3D inference and the exported bundle.

A model tuned on CT windowed at WL 40 / WW 400 gives poor masks on the same CT windowed otherwise
(MedSAM's users learnt this the hard way), so the intensity preset, orientation and resampling must be
the same wherever the model runs. They are therefore written once, as a list of MONAI component
configs (``_target_`` dicts): training and the inference bundle instantiate that list, and the
export writes the very same list into the exported bundle's ``inference.json``.

Axes: volumes are oriented to RAS, so arrays are (C, R, A, S) and axial slices lie along the last
axis (``SliceInferer(spatial_dim=2)``). In-plane resampling is optional (``spacing=[sx, sy]`` in mm);
the slice spacing is never changed, since training and inference are slice by slice.

Box prompts (``prompt="box"``, MedSAM's 3D protocol, see ``box_prompts`` and ``volume_boxes``): a
training slice gets the jittered boxes of its label's objects after it is resized; a validation volume
gets the exact boxes of every slice of its label (``SliceBoxesd``); an inference volume gets the boxes
of its box file, carried into the pre-processed grid (``volume_boxes.VolumeBoxesd``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform

from medseg_peft.data.volume_boxes import check_prompt

# Window presets: (lower, upper) HU mapped to [0, 1] with clipping. ct_soft_tissue is MedSAM's
# WL 40 / WW 400 (pre_CT_MR.py); ct_abdomen is SAMed's [-125, 275] (preprocess/README.md); ct_lung is
# the lung window MedSAM's paper quotes (WW 1500 / WL -160). mr: the 0.5-99.5 percentiles of each
# volume, MedSAM's MR rule. minmax: each volume's own range (for modalities with no convention).
INTENSITY_PRESETS: dict[str, dict] = {
    "ct_soft_tissue": {"window": [-160.0, 240.0]},
    "ct_abdomen": {"window": [-125.0, 275.0]},
    "ct_lung": {"window": [-910.0, 590.0]},
    "mr": {"percentiles": [0.5, 99.5]},
    "minmax": {"minmax": True},
}

SIMPLEITK_READER = "medseg_peft.data.volume_io.SimpleITKReader"
LABEL_WRITER = "medseg_peft.data.volume_io.SaveLabelVolumed"
VOLUME_BOXES = "medseg_peft.data.volume_boxes.VolumeBoxesd"
MAX_SLICE_BOXES = 16  # boxes per training or validation slice: objects beyond it (the smallest) get none


def resolve_intensity(intensity: str | Mapping | None) -> dict:
    """A preset name, or ``{"window": [lo, hi]}``, ``{"level": L, "width": W}``, ``{"percentiles": [lo, hi]}``."""
    if intensity is None or isinstance(intensity, str):
        name = intensity or "minmax"
        if name not in INTENSITY_PRESETS:
            raise ValueError(f"unknown intensity preset {intensity!r}; presets: {sorted(INTENSITY_PRESETS)}, or a dict "
                             "such as {'window': [-160, 240]}, {'level': 40, 'width': 400} or {'percentiles': [0.5, 99.5]}")
        return dict(INTENSITY_PRESETS[name])
    spec = dict(intensity)
    if {"level", "width"} <= spec.keys():
        level, width = float(spec["level"]), float(spec["width"])
        if width <= 0:
            raise ValueError(f"intensity width must be positive, got {width}")
        return {"window": [level - width / 2, level + width / 2]}
    for key in ("window", "percentiles"):
        if key in spec:
            lo, hi = (float(v) for v in spec[key])
            if not lo < hi:
                raise ValueError(f"intensity {key} must be [lower, upper] with lower < upper, got {spec[key]}")
            if key == "percentiles" and not (0 <= lo and hi <= 100):
                raise ValueError(f"intensity percentiles must lie in [0, 100], got {spec[key]}")
            return {key: [lo, hi]}
    if spec.get("minmax"):
        return {"minmax": True}
    raise ValueError(f"intensity {intensity!r} has none of the keys window, level + width, percentiles, minmax")


def intensity_config(intensity: str | Mapping | None, key: str = "image") -> dict:
    spec = resolve_intensity(intensity)
    if "window" in spec:
        lo, hi = spec["window"]
        return {"_target_": "ScaleIntensityRanged", "keys": key, "a_min": lo, "a_max": hi, "b_min": 0.0, "b_max": 1.0, "clip": True}
    if "percentiles" in spec:
        lo, hi = spec["percentiles"]
        return {"_target_": "ScaleIntensityRangePercentilesd", "keys": key, "lower": lo, "upper": hi, "b_min": 0.0, "b_max": 1.0, "clip": True}
    return {"_target_": "ScaleIntensityd", "keys": key, "minv": 0.0, "maxv": 1.0}


def spacing_config(keys: Sequence[str], spacing: Sequence[float]) -> dict:
    """In-plane resampling to ``spacing`` ``[sx, sy]`` mm, the slice spacing kept; ``keys[0]`` bilinear, the others nearest."""
    sx, sy = (float(v) for v in spacing)
    if sx <= 0 or sy <= 0:
        raise ValueError(f"spacing must be two positive in-plane sizes in mm, got {list(spacing)}")
    keys = list(keys)
    return {"_target_": "Spacingd", "keys": keys, "pixdim": [sx, sy, -1.0], "mode": ["bilinear" if k == keys[0] else "nearest" for k in keys]}


def volume_preprocessing_config(
    keys: Sequence[str] = ("image", "label"),
    intensity: str | Mapping | None = "ct_soft_tissue",
    spacing: Sequence[float] | None = None,
    channel: int | None = None,
    reader: str = SIMPLEITK_READER,
    box_transform: str | None = None,
) -> list[dict]:
    """The MONAI components, as config dicts, that turn a volume file into a [1, R, A, S] float tensor in [0, 1].

    ``keys[0]`` is the image; a second key is a label map (nearest-neighbour resampling, no intensity).
    ``channel`` picks one channel of a 4D image (e.g. one MR sequence of MSD BrainTumour).
    ``reader`` is the dotted path of the SimpleITK reader (NRRD, MHA, DICOM); NIfTI goes through
    MONAI's nibabel reader (as ``NiftiReader`` of the same module, which names a file it cannot read).
    ``box_transform`` (the dotted path of ``VolumeBoxesd``) appends the step that turns an item's
    ``"box_file"`` into per-slice ``"box"`` prompts of the pre-processed grid; items without one pass unchanged.
    """
    keys = list(keys)
    image = keys[0]
    steps: list[dict] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": False,
         "reader": [{"_target_": reader}, {"_target_": reader.rpartition(".")[0] + ".NiftiReader"}]},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
    ]
    if channel is not None:
        c = int(channel)
        steps.append({"_target_": "Lambdad", "keys": image, "func": f"$lambda x: x[{c}:{c + 1}]"})
    steps.append({"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"})
    if spacing is not None:
        steps.append(spacing_config(keys, spacing))
    steps.append(intensity_config(intensity, image))
    steps.append({"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32"})
    if box_transform is not None:  # inference: boxes from a box file, or from a coarse label given with the request
        steps.append({"_target_": box_transform, "keys": "box_file", "image_key": image, "allow_missing_keys": True})
        steps.append({"_target_": box_transform.rpartition(".")[0] + ".LabelBoxesd", "keys": "label", "image_key": image,
                      "prompt": "@prompt", "num_classes": "@num_classes", "allow_missing_keys": True})
    return steps


def probabilities_config(activation: str = "softmax") -> list[dict]:
    """Logits to class probabilities with a background channel first: the one rule every label map uses.

    ``softmax``: the network's channel 0 is background. ``sigmoid``: one channel per class, and a
    background channel at probability 0.5 is prepended, so an argmax keeps a class only where it is
    above 0.5. Training-time validation, ``inference.json`` and the exported bundle all use it.
    """
    if activation == "softmax":
        return [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    if activation == "sigmoid":
        return [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: torch.cat([torch.full_like(x[:1], 0.5), x])"}]
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


def label_postprocessing_config(activation: str = "softmax", writer: str = LABEL_WRITER) -> list[dict]:
    """Logits of a whole volume to a label volume file with the input's geometry (references ``@preprocessing``,
    ``@output_dir``, ``@output_postfix``).

    Probabilities are inverted to the input's grid (orientation, spacing) before the argmax, as MONAI's
    model-zoo bundles do, so resampling interpolates probabilities rather than class values.
    """
    return probabilities_config(activation) + [
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "CastToTyped", "keys": "pred", "dtype": "$np.uint8"},  # class values, as MONAI Label's /infer returns them
        {"_target_": writer, "keys": "pred", "output_dir": "@output_dir", "postfix": "@output_postfix"},
    ]


def instantiate(configs: list[dict], **references) -> Compose:
    """A ``Compose`` of MONAI component configs, resolved the way ``monai.bundle`` would; ``references``
    are the objects ``@name`` refers to."""
    parser = ConfigParser({"imports": ["$import torch"], "transforms": configs, **references})
    return Compose(parser.get_parsed_content("transforms"))


def label_postprocessing(activation: str, preprocessing: Compose, output_dir: str, postfix: str = "seg") -> Compose:
    return instantiate(label_postprocessing_config(activation), preprocessing=preprocessing, output_dir=str(output_dir),
                       output_postfix=postfix)


def volume_preprocessing(keys: Sequence[str] = ("image", "label"), intensity: str | Mapping | None = "ct_soft_tissue",
                         spacing: Sequence[float] | None = None, channel: int | None = None, prompt: str = "none") -> Compose:
    """``volume_preprocessing_config`` instantiated; ``prompt="box"`` adds the box file step (inference)."""
    boxes = VOLUME_BOXES if check_prompt(prompt) == "box" else None
    return instantiate(volume_preprocessing_config(keys, intensity, spacing, channel, box_transform=boxes), prompt=prompt, num_classes=None)


class PickChanneld(MapTransform):
    """One channel of a multi-channel image (``channel``, e.g. one MR sequence of MSD BrainTumour); ``None``: unchanged.

    A step whatever the setting, so a bundle lists it and ``--channel`` switches it."""

    def __init__(self, keys: KeysCollection = "image", channel: int | None = None):
        super().__init__(keys)
        self.channel = None if channel is None else int(channel)

    def __call__(self, data):
        d = dict(data)
        if self.channel is not None:
            for key in self.key_iterator(d):
                d[key] = d[key][self.channel : self.channel + 1]
        return d


class InPlaneSpacingd(MapTransform):
    """Resample in plane to ``spacing`` ``[sx, sy]`` mm, the slice spacing kept (bilinear for the first key,
    nearest for label maps); ``None``: unchanged. Slices are trained and inferred one by one."""

    def __init__(self, keys: KeysCollection = ("image", "label"), spacing: Sequence[float] | None = None):
        super().__init__(keys)
        self.resample = None
        if spacing is not None:
            self.resample = instantiate([spacing_config(list(self.keys), spacing)])

    def __call__(self, data):
        return self.resample(dict(data)) if self.resample is not None else dict(data)


class IntensityPresetd(MapTransform):
    """An ``intensity`` preset or spec (:data:`INTENSITY_PRESETS`, :func:`resolve_intensity`) mapped to [0, 1]."""

    def __init__(self, keys: KeysCollection = "image", intensity: str | Mapping | None = "ct_soft_tissue"):
        super().__init__(keys)
        self.scale = instantiate([intensity_config(intensity, key) for key in self.keys])

    def __call__(self, data):
        return self.scale(dict(data))


class SliceBoxesd(MapTransform):
    """Add ``"box"`` ``[slices, max_boxes, 5]``: the exact boxes of every axial slice of ``label`` ``[1, R, A, S]``.

    MedSAM's 3D validation: each slice is prompted by one box per connected component per class of its
    own ground truth, ``[x1, y1, x2, y2, class - 1]`` in the slice's pixels (x along A, the width of the
    slices ``SliceInferer(spatial_dim=2)`` cuts), largest first; unused rows are -1.
    """

    def __init__(self, label_key: str = "label", box_key: str = "box", max_boxes: int = MAX_SLICE_BOXES, spatial_dim: int = 2,
                 prompt: str = "box"):
        super().__init__([label_key])
        self.label_key, self.box_key = label_key, box_key
        self.max_boxes, self.spatial_dim = int(max_boxes), int(spatial_dim)
        self.enabled = check_prompt(prompt) == "box"  # "none": a step that adds nothing, so a bundle lists it either way

    def __call__(self, data):
        from medseg_peft.data.box_prompts import object_boxes

        d = dict(data)
        if not self.enabled:
            return d
        label = d[self.label_key]
        volume = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)[0]
        planes = np.moveaxis(volume, self.spatial_dim, 0)  # [slices, height, width]
        out = torch.full((planes.shape[0], self.max_boxes, 5), -1.0)
        for k, plane in enumerate(planes):
            for n, (x1, y1, x2, y2, value) in enumerate(object_boxes(np.rint(plane).astype(np.int64), classes=True)[: self.max_boxes]):
                out[k, n] = torch.tensor([x1, y1, x2, y2, value - 1], dtype=torch.float32)
        d[self.box_key] = out
        return d


def validation_preprocessing(preprocessing: Compose, prompt: str = "none") -> Compose:
    """The validation volumes' pre-processing: ``preprocessing`` itself, and with box prompts each slice's exact boxes."""
    if check_prompt(prompt) == "none":
        return preprocessing
    return Compose([preprocessing, SliceBoxesd()]).flatten()


def slice_sampling(num_classes: int, image_size: int, samples_per_volume: int = 8, background_ratio: float = 0.3,
                   prompt: str = "none") -> Compose:
    """Random axial slices of a pre-processed volume pair, resized to the model's input size.

    Slices are centred on voxels drawn class by class (MONAI's ``RandCropByLabelClassesd`` with a
    crop of one slice): each organ class is drawn as often as the others however small it is, and the
    background draws (``background_ratio`` of one class's share) land on slices with or without
    organs, so the model also sees empty slices and learns to predict nothing there.

    ``prompt="box"`` adds ``"box"`` ``[16, 5]`` per slice after the resize: one box per connected
    component per class, each side pushed out by up to MedSAM's jitter at ``image_size``, the fifth
    column the class's output channel (``class - 1``: per-class sigmoid outputs). A background slice has
    no box, and the model learns to give it nothing.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    ratios = [float(background_ratio)] + [1.0] * num_classes
    boxes = []
    if check_prompt(prompt) == "box":
        from medseg_peft.data.box_prompts import medsam_jitter

        boxes = [{"_target_": "medseg_peft.data.box_prompts.BoxesFromMaskd", "label_key": "label", "jitter": medsam_jitter(image_size),
                  "max_boxes": MAX_SLICE_BOXES, "classes": True, "channel_offset": 0}]
    return instantiate([
        {"_target_": "RandCropByLabelClassesd", "keys": ["image", "label"], "label_key": "label", "spatial_size": [-1, -1, 1],
         "ratios": ratios, "num_classes": num_classes + 1, "num_samples": int(samples_per_volume), "warn": False},
        {"_target_": "SqueezeDimd", "keys": ["image", "label"], "dim": -1},
        {"_target_": "Resized", "keys": ["image", "label"], "spatial_size": [int(image_size), int(image_size)],
         "mode": ["bilinear", "nearest"]},
    ] + boxes)


__all__ = [
    "INTENSITY_PRESETS",
    "InPlaneSpacingd",
    "IntensityPresetd",
    "PickChanneld",
    "SliceBoxesd",
    "validation_preprocessing",
    "instantiate",
    "intensity_config",
    "label_postprocessing",
    "label_postprocessing_config",
    "probabilities_config",
    "resolve_intensity",
    "slice_sampling",
    "volume_preprocessing",
    "volume_preprocessing_config",
]
