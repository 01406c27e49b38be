"""A PNG sheet of validation images with their true and predicted mask outlines, a legend and each tile's Dice.

The quickest honest check of a segmentation run is to look at it; this writes that picture at the end
of training without any plotting dependency (Pillow draws the text).

One class (polyps): the true outline is green, the prediction red. Several classes (the organ bundle's
slices): one colour per class, named in the legend, the true outline solid and the prediction dashed.
Each tile prints its own Dice in its corner (:func:`tile_dice`), so the worst images stand out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from medseg_peft.workflows.metrics import binarize, label_map
from medseg_peft.workflows.pictures import font, save_png

TRUE_COLOUR, PRED_COLOUR = (0, 255, 0), (255, 0, 0)
CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                 (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200)]


def outline(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of a binary ``[H, W]`` mask whose 3x3 neighbourhood leaves the mask."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def dashed(edge: torch.Tensor, period: int = 6) -> torch.Tensor:
    """Every other run of ``period // 2`` pixels of an outline, along the diagonals: a dashed line."""
    h, w = edge.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return edge & (((ys + xs) % period) < period // 2)


def tile_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int = 1) -> float:
    """One image's Dice: ``2|P∩T| / (|P| + |T|)`` per class of the class maps ``pred`` and ``label``
    (values 0 = background, 1..num_classes), averaged over the classes present in either; an image
    where neither has any class scores 1 (nothing to find, nothing found)."""
    scores = []
    for c in range(1, num_classes + 1):
        p, t = pred == c, label == c
        size = int(p.sum()) + int(t.sum())
        if size:
            scores.append(2 * int((p & t).sum()) / size)
    return sum(scores) / len(scores) if scores else 1.0


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """A ``[C, H, W]`` image as ``[H, W, 3]`` uint8: 0-255 values as they are, 0-1 values (the organ
    bundle's scaled intensities) stretched to 0-255, one channel repeated as grey."""
    image = image.float()
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image[:3]
    if float(image.max()) <= 1.0:
        image = image * 255
    return image.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy().copy()


def draw_tile(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, num_classes: int) -> tuple[np.ndarray, float]:
    """The outlined RGB tile of one image and its Dice; ``label`` and ``pred`` are ``[H, W]`` class maps."""
    rgb = to_rgb(image)
    if num_classes == 1:
        rgb[outline(label > 0).numpy()] = TRUE_COLOUR
        rgb[outline(pred > 0).numpy()] = PRED_COLOUR
    else:
        for c in range(1, num_classes + 1):
            colour = CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
            rgb[outline(label == c).numpy()] = colour
            rgb[dashed(outline(pred == c)).numpy()] = colour
    return rgb, tile_dice(pred, label, num_classes)


def predictions(network: nn.Module, batches, device: torch.device, max_images: int, activation: str):
    """Up to ``max_images`` of (image, true class map, predicted class map, number of classes)."""
    count = 0
    for batch in batches:
        image, label = batch["image"], batch["label"]
        boxes = {"boxes": batch["box"].to(device)} if "box" in batch else {}  # box prompts, when the run uses them
        logits = network(image.to(device), **boxes).float().cpu()
        channels = logits.shape[1]
        num_classes = 1 if channels == 1 else (channels - 1 if activation == "softmax" else channels)
        for i in range(image.shape[0]):
            if channels == 1:
                pred, true = binarize(logits[i])[0], (label[i, 0] > 0.5).long()
            else:
                pred, true = label_map(logits[i], activation)[0], label[i, 0].round().long()
            yield image[i], true, pred.long(), num_classes
            count += 1
            if count == max_images:
                return


def legend(width: int, num_classes: int, class_names: Sequence[str] | None, size: int) -> Image.Image:
    """A strip naming the colours (true and predicted outline, each class when there are several),
    its entries flowing onto further lines where the sheet is narrow."""
    if num_classes == 1:
        items = [(TRUE_COLOUR, "true outline", False), (PRED_COLOUR, "prediction", False)]
    else:
        names = list(class_names or [])
        names += [f"class {c}" for c in range(len(names) + 1, num_classes + 1)]
        items = [(CLASS_COLOURS[c % len(CLASS_COLOURS)], names[c], False) for c in range(num_classes)]
        items += [((0, 0, 0), "true outline: solid", False), ((0, 0, 0), "prediction: dashed", True)]
    items.append((None, "corner: Dice of the image" + ("" if num_classes == 1 else " (mean over the classes it shows)"), False))
    f = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    spans = [(28 if colour else 0) + int(measure.textlength(text, font=f)) + 20 for colour, text, _ in items]
    width = max(width, max(spans) + 8)  # a sheet narrower than one entry widens to hold it
    line_h, x, y, placed = size + 10, 8, 6, []
    for (colour, text, dash), span in zip(items, spans):
        if x + span > width and x > 8:
            x, y = 8, y + line_h
        placed.append((x, y, colour, text, dash))
        x += span
    strip = Image.new("RGB", (width, y + line_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, colour, text, dash in placed:
        if colour:
            mid = y + size // 2 + 2
            for a in range(0, 24, 8 if dash else 24):
                draw.line([x + a, mid, x + a + (4 if dash else 22), mid], fill=colour, width=4)
            x += 28
        draw.text((x, y), text, fill=(0, 0, 0) if colour else (80, 80, 80), font=f)
    return strip


def contour_sheet(network: nn.Module, batches, path: str | Path, device: torch.device, max_images: int = 8, columns: int = 4,
                  class_names: Sequence[str] | None = None, activation: str = "softmax") -> Path:
    """Predict on up to ``max_images`` images of ``batches`` and write the outlined sheet to ``path``.

    A one-channel output is one class (sigmoid at 0.5); several channels are classes by ``activation``
    (softmax over background and classes, or a sigmoid per class), named by ``class_names``."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            drawn = [(draw_tile(image, true, pred, n), n) for image, true, pred, n in predictions(network, batches, device, max_images, activation)]
    finally:
        network.train(was_training)
    if not drawn:
        raise ValueError("contour_sheet got no images")
    num_classes = drawn[0][1]
    h, w, _ = drawn[0][0][0].shape
    rows = (len(drawn) + columns - 1) // columns
    sheet = np.zeros((rows * h, min(columns, len(drawn)) * w, 3), dtype=np.uint8)
    for i, ((tile, _), _) in enumerate(drawn):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    picture = Image.fromarray(sheet)
    draw = ImageDraw.Draw(picture)
    size = max(10, min(w, h) // 20)
    f = font(size)
    for i, ((_, dice), _) in enumerate(drawn):
        r, c = divmod(i, columns)
        text = f"Dice {dice:.3f}"
        if draw.textlength(text, font=f) > w - 12:  # a small tile keeps the number only
            text = f"{dice:.2f}"
        x, y = c * w + 3, r * h + 3
        draw.rectangle([x, y, x + draw.textlength(text, font=f) + 6, y + size + 6], fill=(0, 0, 0))
        draw.text((x + 3, y + 2), text, fill=(255, 255, 255), font=f)
    strip = legend(picture.width, num_classes, class_names, max(11, size))
    out = Image.new("RGB", (strip.width, picture.height + strip.height), (255, 255, 255))
    out.paste(picture, (0, 0))
    out.paste(strip, (0, picture.height))
    return save_png(out, path)
