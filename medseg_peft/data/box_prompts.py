"""Box prompts the MedSAM way: one box per object of the ground truth, jittered while training.

MedSAM (Ma et al., "Segment anything in medical images", Nature Communications 2024) trains and
evaluates with a bounding box around each object: in training every side is moved outwards by a
random shift of up to 20 pixels at 1024 px (5 at LiteMedSAM's 256 px), so the model does not learn
to expect boxes that touch the object; in validation the box is the object's exact extent. An
"object" here is a connected component of one class in the 2D mask (8-connectivity), so an image
with two polyps gets two boxes, and the model's prediction is their union.

Boxes travel in the batch under ``"box"`` as ``[max_boxes, 4]`` (``xyxy``, pixel indices of the
image as the network receives it, inclusive) or ``[max_boxes, 5]`` with the output channel each box
segments; unused rows are -1. ``SamSegmenter`` reads exactly this layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

from medseg_peft.data.volume_boxes import read_volume_boxes

BOX_KEY = "box"
MEDSAM_JITTER_AT_1024 = 20  # pixels, MedSAM's bbox_shift


def medsam_jitter(image_size: int) -> int:
    """MedSAM's box jitter scaled to the network's input size (20 px at 1024, 5 at 256)."""
    return max(0, round(MEDSAM_JITTER_AT_1024 * int(image_size) / 1024))


def object_boxes(mask: np.ndarray, classes: bool = False) -> list[tuple[int, int, int, int, int]]:
    """``(x1, y1, x2, y2, class)`` of every connected component of a 2D label map, largest first."""
    found = []
    values = [v for v in np.unique(mask) if v > 0] if classes else [1]
    for value in values:
        labels, count = ndimage.label(mask == value if classes else mask > 0, structure=np.ones((3, 3)))
        areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
        for (rows, cols), area in zip(ndimage.find_objects(labels), areas):
            found.append((float(area), (cols.start, rows.start, cols.stop - 1, rows.stop - 1, int(value))))
    return [box for _, box in sorted(found, key=lambda t: -t[0])]


class BoxesFromMaskd(RandomizableTransform, MapTransform):
    """Add ``"box"``: the boxes of the objects in ``label`` (``[1, H, W]``), each side pushed out by up to ``jitter`` px.

    ``classes=False`` (binary masks): ``[max_boxes, 4]``. ``classes=True`` (label maps of class values):
    ``[max_boxes, 5]``, the fifth column the output channel, ``class - 1 + channel_offset``. With more
    objects than ``max_boxes`` the largest are kept. Place it after the spatial augmentations, so the
    boxes fit the image the network sees.
    """

    def __init__(self, label_key: str = "label", jitter: int = 0, max_boxes: int = 16, classes: bool = False,
                 channel_offset: int = 0, box_key: str = BOX_KEY):
        MapTransform.__init__(self, [label_key])
        RandomizableTransform.__init__(self, prob=1.0)
        if int(max_boxes) < 1 or int(jitter) < 0:
            raise ValueError(f"max_boxes must be >= 1 and jitter >= 0, got {max_boxes!r}, {jitter!r}")
        self.label_key, self.box_key = label_key, box_key
        self.jitter, self.max_boxes = int(jitter), int(max_boxes)
        self.classes, self.channel_offset = bool(classes), int(channel_offset)

    def __call__(self, data):
        d = dict(data)
        label = d[self.label_key]
        mask = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
        mask = mask[0] if mask.ndim == 3 else mask
        h, w = mask.shape
        width = 5 if self.classes else 4
        out = np.full((self.max_boxes, width), -1.0, dtype=np.float32)
        for i, (x1, y1, x2, y2, value) in enumerate(object_boxes(mask, self.classes)[: self.max_boxes]):
            if self.jitter:
                x1, y1 = max(0, x1 - self.R.randint(0, self.jitter + 1)), max(0, y1 - self.R.randint(0, self.jitter + 1))
                x2, y2 = min(w - 1, x2 + self.R.randint(0, self.jitter + 1)), min(h - 1, y2 + self.R.randint(0, self.jitter + 1))
            row = [x1, y1, x2, y2] + ([value - 1 + self.channel_offset] if self.classes else [])
            out[i] = row
        d[self.box_key] = torch.from_numpy(out)
        return d


def read_box_file(path: str | Path, shape: tuple[int, ...], num_classes: int | None = None) -> list[dict]:
    """Boxes for one image (shape ``(H, W)``) or volume (``(X, Y, Z)``) from its JSON file; see ``volume_boxes.read_volume_boxes``."""
    return read_volume_boxes(path, shape, num_classes)
