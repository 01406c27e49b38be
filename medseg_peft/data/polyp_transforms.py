"""MONAI dictionary transforms that turn a polyp datalist item into ``image [3, S, S]`` / ``label [1, S, S]``.

Decisions that are easy to get wrong with 2D photographs in a toolkit built for volumes:

* **Axis order.** MONAI's ``PILReader`` swaps the first two axes by default (``reverse_indexing=True``),
  so a 50x80 (HxW) PNG loads as ``(80, 50)``. Our reader keeps PIL's row-major ``(H, W)`` so arrays
  agree with PIL / torchvision / the masks users draw, and its ``spatial_shape`` metadata says
  ``(H, W)`` too, so code that resizes predictions back to the original size reads the right order.
* **Intensity.** Images stay 3-channel float in 0-255: the SAM wrapper subtracts SAM's pixel mean and
  divides by its std itself, and normalising here as well would do it twice.
* **Masks.** Kvasir masks are JPEGs, noisy near edges; they are binarised at > 127 (or > 0.5 for masks
  stored as 0/1), *before* resizing, and resized with nearest-neighbour so labels stay in {0, 1}.
* **Aspect ratio.** ``resize="square"`` stretches to ``S x S`` (SAM ViT variants here);
  ``resize="longest_side"`` scales the longest side to ``S`` and pads bottom-right, as MedSAM /
  LiteMedSAM / MobileSAM were trained. The image is padded with its own minimum, so the model's
  per-image min-max scaling maps the padding to 0, exactly as MedSAM pads after scaling.
* **Box prompts** (``prompt="box"``) are computed from the mask after every spatial step, so they fit
  the image the network sees: jittered as MedSAM in training, exact in validation (``box_prompts``).
* **Augmentation** happens after resizing to the square ``S x S`` (cheaper, and 90-degree rotations of
  a square keep its shape); intensity jitter touches the image only and is clipped back to 0-255.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)

from medseg_peft.data.box_prompts import BoxesFromMaskd, medsam_jitter
from medseg_peft.data.volume_boxes import PROMPTS

IMAGE_KEY, LABEL_KEY = "image", "label"
_MASK_MODES_TO_GREY = {"1", "P", "PA", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "La", "RGBa"}


class RowMajorPILReader(PILReader):
    """``PILReader`` with arrays and ``spatial_shape`` metadata in ``(H, W)`` order, as PIL stores pixels."""

    def __init__(self, converter=None, **kwargs):
        super().__init__(converter=converter, reverse_indexing=False, **kwargs)

    def _get_spatial_shape(self, img):
        return np.asarray((img.height, img.width))


def image_to_rgb(img):
    """Grey, palette and RGBA photographs become RGB: grey is repeated to 3 channels, alpha is dropped."""
    return img if img.mode == "RGB" else img.convert("RGB")


def mask_to_grey(img):
    """Colour or palette masks become one grey channel; 8/16-bit/float grey masks are left as they are."""
    return img.convert("L") if img.mode in _MASK_MODES_TO_GREY else img


class BinariseMaskd(MapTransform):
    """Foreground = value > 127 for 0-255 masks, > 0.5 for masks already stored as 0/1; output float {0, 1}.

    The scale is decided per mask from its maximum: an all-background JPEG mask decodes to exact
    zeros (a constant block compresses losslessly), so a 0-255 mask never looks like a 0/1 one.
    """

    def __init__(self, keys=LABEL_KEY, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            threshold = 127.0 if float(mask.max()) > 1.0 else 0.5
            d[key] = (mask > threshold).to(torch.float32) if isinstance(mask, torch.Tensor) else (mask > threshold).astype(np.float32)
        return d


def clip_0_255(x):
    """Intensity jitter can leave the 0-255 range a real camera has; put it back."""
    return x.clamp(0.0, 255.0) if isinstance(x, torch.Tensor) else np.clip(x, 0.0, 255.0)


class PadBottomRightd(MapTransform):
    """Pad ``image`` and ``label`` to ``size x size`` at the bottom and right: the image with its own minimum, the label with 0."""

    def __init__(self, size: int, keys=(IMAGE_KEY, LABEL_KEY)):
        super().__init__(list(keys))
        self.size = int(size)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            pad = (0, self.size - x.shape[-1], 0, self.size - x.shape[-2])
            fill = float(x.min()) if key == IMAGE_KEY else 0.0
            d[key] = torch.nn.functional.pad(torch.as_tensor(x), pad, value=fill)
        return d


RESIZES = ("square", "longest_side")


def polyp_transforms(image_size: int, train: bool, resize: str = "square", prompt: str = "none", augment: bool = True) -> Compose:
    """Load, binarise, resize to ``image_size`` and (for ``train`` with ``augment``) augment one polyp datalist item.

    Output: ``image`` float32 ``[3, S, S]`` in 0-255 (not normalised), ``label`` float32 ``[1, S, S]`` in
    {0, 1}, with ``prompt="box"`` also ``box`` ``[16, 4]`` (see ``box_prompts``); every other key
    (``name``, ``set``) passes through unchanged.
    """
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size!r}")
    if resize not in RESIZES or prompt not in PROMPTS:
        raise ValueError(f"resize must be one of {RESIZES} and prompt one of {PROMPTS}, got resize={resize!r}, prompt={prompt!r}")
    s = int(image_size)
    keys = [IMAGE_KEY, LABEL_KEY]
    steps = [
        LoadImaged(IMAGE_KEY, reader=RowMajorPILReader(converter=image_to_rgb), image_only=True, dtype=np.float32),
        LoadImaged(LABEL_KEY, reader=RowMajorPILReader(converter=mask_to_grey), image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys),
        BinariseMaskd(LABEL_KEY),
    ]
    if resize == "square":
        steps += [
            Resized(IMAGE_KEY, spatial_size=(s, s), mode="bilinear", align_corners=False, anti_aliasing=True),
            Resized(LABEL_KEY, spatial_size=(s, s), mode="nearest-exact"),
        ]
    else:
        steps += [
            Resized(IMAGE_KEY, spatial_size=s, size_mode="longest", mode="bilinear", align_corners=False, anti_aliasing=True),
            Resized(LABEL_KEY, spatial_size=s, size_mode="longest", mode="nearest-exact"),
            PadBottomRightd(s),
        ]
    if train and augment:
        steps += [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
            RandScaleIntensityd(IMAGE_KEY, factors=0.1, prob=0.5, channel_wise=True),  # brightness and a little colour cast
            RandShiftIntensityd(IMAGE_KEY, offsets=12.0, prob=0.5),
            RandAdjustContrastd(IMAGE_KEY, gamma=(0.8, 1.25), prob=0.3),
            Lambdad(IMAGE_KEY, clip_0_255),
        ]
    if prompt == "box":
        steps.append(BoxesFromMaskd(LABEL_KEY, jitter=medsam_jitter(s) if train else 0))
    steps.append(EnsureTyped(keys, data_type="tensor", dtype=torch.float32))
    return Compose(steps)
