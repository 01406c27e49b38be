"""MONAI dictionary transforms that turn a polyp datalist item into ``image [3, S, S]`` / ``label [1, S, S]``.

Decisions that are easy to get wrong with 2D photographs in a toolkit built for volumes:

* **Axis order.** MONAI's ``PILReader`` swaps the first two axes by default (``reverse_indexing=True``),
  so a 50x80 (HxW) PNG loads as ``(80, 50)``. Our reader keeps PIL's row-major ``(H, W)`` so arrays
  agree with PIL / torchvision / the masks users draw, and its ``spatial_shape`` metadata says
  ``(H, W)`` too, so code that resizes predictions back to the original size reads the right order.
* **Intensity.** Images stay 3-channel float in 0-255: the SAM wrapper subtracts SAM's pixel mean and
  divides by its std itself, and normalising here as well would do it twice. 16-bit, 32-bit integer and
  float images (microscopy, X-ray and other scanner exports) are scaled per image, min..max to 0..255 as
  MedSAM prepares such modalities (:func:`image_to_rgb`); PIL's own ``convert("RGB")`` would clip
  them to 255, a white image, and the run would train and score on nothing.
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
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
)
from monai.utils import MetaKeys
from PIL import Image

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


def is_high_depth(mode: str) -> bool:
    """PIL modes whose values are not 0-255: 16-bit (``I;16`` and its byte orders), 32-bit integer (``I``) and float (``F``)."""
    return mode in ("I", "F") or mode.startswith("I;")


def image_to_rgb(img: Image.Image) -> Image.Image:
    """An input image as the network takes it, 0-255, for every loader of input images to share.

    8-bit images become RGB as PIL converts them (grey repeated to 3 channels, palettes looked up,
    alpha dropped); an RGB image is returned as it is. High-bit-depth images (:func:`is_high_depth`)
    become a grey float ``F`` image scaled per image, min..max to 0..255, so they keep their
    precision (PIL has no 3-channel float mode: :class:`RGBImageReader` repeats it to 3 channels);
    a constant image becomes 0. NaN or infinite pixels are refused, since
    they would make every scaled pixel NaN.
    """
    if img.mode == "RGB":
        return img
    if not is_high_depth(img.mode):
        return img.convert("RGB")
    x = np.asarray(img, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        name = getattr(img, "filename", "") or "an image"
        raise ValueError(f"{name} has {bad} NaN or infinite pixel(s) of {x.size}; replace them with finite values")
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    scaled = (x - low) * (255.0 / (high - low)) if high > low else np.zeros_like(x)
    return Image.fromarray(scaled.astype(np.float32))


class RGBImageReader(RowMajorPILReader):
    """Input images as ``H x W x 3`` arrays in 0-255, whatever their bit depth (:func:`image_to_rgb`).

    The scaled grey ``F`` image of a high-bit-depth file is repeated to 3 channels here, after PIL's
    decoding, and its metadata says the channels are last, so it loads exactly as an 8-bit grey one.
    """

    def __init__(self, **kwargs):
        super().__init__(converter=image_to_rgb, **kwargs)

    def get_data(self, img):
        data, meta = super().get_data(img)
        if data.ndim == 2:
            data = np.repeat(data[..., None], 3, axis=-1)
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
        return data, meta


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


class FitToSized(MapTransform):
    """Resize ``image`` and ``label`` to the model's ``size x size`` input as its checkpoint was trained:
    ``"square"`` stretches (SAM ViT); ``"longest_side"`` scales the longest side to ``size`` and pads
    bottom-right (MedSAM / LiteMedSAM / MobileSAM). The image is resized bilinearly with anti-aliasing,
    the label nearest-exact, so labels stay in {0, 1}."""

    def __init__(self, size: int, resize: str = "square", keys=(IMAGE_KEY, LABEL_KEY)):
        super().__init__(list(keys))
        if int(size) <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {size!r}")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
        s = int(size)
        shape = {"spatial_size": (s, s)} if resize == "square" else {"spatial_size": s, "size_mode": "longest"}
        image, label = keys
        self.steps = [Resized(image, mode="bilinear", align_corners=False, anti_aliasing=True, **shape),
                      Resized(label, mode="nearest-exact", **shape)]
        if resize == "longest_side":
            self.steps.append(PadBottomRightd(s, keys))

    def __call__(self, data):
        for step in self.steps:
            data = step(data)
        return data


class PromptBoxesd(Randomizable, MapTransform):
    """The boxes a ``prompt`` needs, from the label: MedSAM's boxes for ``"box"`` (see ``BoxesFromMaskd``),
    nothing for ``"none"``; one step either way, so a bundle lists it whatever the prompt. Seeding it
    (``Compose`` does, under ``set_determinism``) seeds the box jitter."""

    def __init__(self, prompt: str = "none", jitter: int = 0, label_key: str = LABEL_KEY, **boxes):
        MapTransform.__init__(self, [label_key])
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
        # boxes: BoxesFromMaskd's other settings (max_boxes, classes, channel_offset for label maps of classes)
        self.boxes = BoxesFromMaskd(label_key, jitter=jitter, **boxes) if prompt == "box" else None

    def set_random_state(self, seed=None, state=None) -> "PromptBoxesd":
        super().set_random_state(seed, state)
        if self.boxes is not None:
            self.boxes.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        """The jitter is drawn by the box step itself."""

    def __call__(self, data):
        return self.boxes(data) if self.boxes is not None else dict(data)


def label_reader() -> RowMajorPILReader:
    """Masks as one grey channel, row-major (see :func:`mask_to_grey`)."""
    return RowMajorPILReader(converter=mask_to_grey)


def polyp_transforms(image_size: int, train: bool, resize: str = "square", prompt: str = "none", augment: bool = True) -> Compose:
    """Load, binarise, resize to ``image_size`` and (for ``train`` with ``augment``) augment one polyp datalist item.

    The same steps as ``train#preprocessing`` / ``validate#preprocessing`` of ``bundles/polyp_fps.json``,
    which lists them one by one so each can be overridden by key. Output: ``image`` float32 ``[3, S, S]`` in
    0-255 (not normalised), ``label`` float32 ``[1, S, S]`` in {0, 1}, with ``prompt="box"`` also ``box``
    ``[16, 4]`` (see ``box_prompts``); every other key (``name``, ``set``) passes through unchanged.
    """
    s = int(image_size)
    keys = [IMAGE_KEY, LABEL_KEY]
    steps = [
        LoadImaged(IMAGE_KEY, reader=RGBImageReader(), image_only=True, dtype=np.float32),
        LoadImaged(LABEL_KEY, reader=label_reader(), image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys),
        BinariseMaskd(LABEL_KEY),
        FitToSized(s, resize),
    ]
    if train:
        p = 1.0 if augment else 0.0  # the steps stay in place with augment off, as in the bundle's list
        steps += [
            RandFlipd(keys, prob=0.5 * p, spatial_axis=0),
            RandFlipd(keys, prob=0.5 * p, spatial_axis=1),
            RandRotate90d(keys, prob=0.5 * p, max_k=3, spatial_axes=(0, 1)),
            RandScaleIntensityd(IMAGE_KEY, factors=0.1, prob=0.5 * p, channel_wise=True),  # brightness and a little colour cast
            RandShiftIntensityd(IMAGE_KEY, offsets=12.0, prob=0.5 * p),
            RandAdjustContrastd(IMAGE_KEY, gamma=(0.8, 1.25), prob=0.3 * p),
            Lambdad(IMAGE_KEY, clip_0_255),
        ]
    steps += [PromptBoxesd(prompt, jitter=medsam_jitter(s) if train else 0), EnsureTyped(keys, data_type="tensor", dtype=torch.float32)]
    return Compose(steps)
