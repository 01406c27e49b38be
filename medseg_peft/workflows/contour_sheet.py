"""A PNG sheet of validation images with their true and predicted mask outlines, a legend and each tile's Dice.

The quickest honest check of a segmentation run is to look at it; this writes that picture at the end
of training, a matplotlib figure (:mod:`medseg_peft.workflows.charts`: no pyplot, written atomically).

One class (polyps): the true outline is green, the prediction red. Several classes (the organ bundle's
slices): one colour per class, named in the legend, the true outline solid and the prediction dashed.
Outlines are the masks' contours at 0.5, drawn over the image at the sheet's resolution, so they stay
sharp on small images. Each tile prints its own Dice in its corner (:func:`tile_dice`), so the worst
images stand out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from medseg_peft.workflows.charts import new_figure, save_figure
from medseg_peft.workflows.metrics import binarize, label_map

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRUE_COLOUR, PRED_COLOUR = "#00ff00", "#ff0000"
CLASS_COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#d2f53c", "#fabed4",
                 "#008080", "#dcbeff", "#aa6e28", "#fffac8"]
TILE_INCHES = 2.6  # each image's width on the sheet (at charts.DPI pixels per inch)


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


def outline(ax: Axes, mask: torch.Tensor, colour: str, style: str = "solid") -> None:
    """The contour of a binary ``[H, W]`` mask on ``ax`` (pixel centres at integer coordinates, as imshow puts
    them); a mask that is empty or covers the whole image has no outline inside it."""
    values = mask.numpy().astype(np.float32)
    if values.min() == values.max():
        return
    ax.contour(values, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.6)


def draw_tile(ax: Axes, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, num_classes: int) -> float:
    """One image on ``ax`` with its outlines and its Dice in the corner; ``label`` and ``pred`` are ``[H, W]``
    class maps. Returns the Dice."""
    ax.imshow(to_rgb(image))
    if num_classes == 1:
        outline(ax, label > 0, TRUE_COLOUR)
        outline(ax, pred > 0, PRED_COLOUR)
    else:
        for c in range(1, num_classes + 1):
            colour = CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
            outline(ax, label == c, colour)
            outline(ax, pred == c, colour, "dashed")
    dice = tile_dice(pred, label, num_classes)
    ax.text(0.02, 0.98, f"Dice {dice:.3f}", transform=ax.transAxes, ha="left", va="top", color="white", fontsize=9,
            bbox={"facecolor": "black", "edgecolor": "none", "pad": 2})
    ax.set_axis_off()
    return dice


def legend_entries(num_classes: int, class_names: Sequence[str] | None) -> tuple[list[tuple[str, str, str]], str]:
    """``(colour, line style, text)`` per legend entry (true and predicted outline; each class when there are
    several, named by ``class_names`` or "class c") and the legend's title, which explains the corner number."""
    if num_classes == 1:
        items = [(TRUE_COLOUR, "solid", "true outline"), (PRED_COLOUR, "solid", "prediction")]
    else:
        names = list(class_names or [])[:num_classes]
        names += [f"class {c}" for c in range(len(names) + 1, num_classes + 1)]
        items = [(CLASS_COLOURS[c % len(CLASS_COLOURS)], "solid", names[c]) for c in range(num_classes)]
        items += [("black", "solid", "true outline: solid"), ("black", "dashed", "prediction: dashed")]
    title = "corner: Dice of the image" + ("" if num_classes == 1 else " (mean over the classes it shows)")
    return items, title


def contour_figure(tiles: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_classes: int, columns: int = 4,
                   class_names: Sequence[str] | None = None) -> Figure:
    """The sheet of ``tiles`` (image, true class map, predicted class map), ``columns`` to a row, the legend below.

    The legend flows onto as many lines as the sheet's width needs; a sheet narrower than one entry widens."""
    from matplotlib.lines import Line2D

    if not tiles:
        raise ValueError("contour_sheet got no images")
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    h, w = tiles[0][1].shape[-2:]
    items, title = legend_entries(num_classes, class_names)
    entry = max(0.8 + 0.085 * len(text) for _, _, text in items)  # inches, at the legend's font size
    width = max(columns * TILE_INCHES, entry + 0.3, 0.085 * len(title) + 0.3)
    per_line = max(1, int(width // entry))
    legend_h = 0.5 + 0.28 * math.ceil(len(items) / per_line)
    figure = new_figure(width, rows * TILE_INCHES * h / w + legend_h)
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax, (image, true, pred) in zip(axes.flat, tiles):
        draw_tile(ax, image, true, pred, num_classes)
    for ax in axes.flat[len(tiles):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=colour, linestyle=style, linewidth=3, label=text) for colour, style, text in items]
    figure.legend(handles=handles, loc="outside lower center", ncol=per_line, title=title, fontsize=10, title_fontsize=10,
                  frameon=False, handlelength=2.5)
    return figure


def contour_sheet(network: nn.Module, batches, path: str | Path, device: torch.device, max_images: int = 8, columns: int = 4,
                  class_names: Sequence[str] | None = None, activation: str = "softmax") -> Path:
    """Predict on up to ``max_images`` images of ``batches`` and write the outlined sheet to ``path``.

    A one-channel output is one class (sigmoid at 0.5); several channels are classes by ``activation``
    (softmax over background and classes, or a sigmoid per class), named by ``class_names``."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            predicted = list(predictions(network, batches, device, max_images, activation))
    finally:
        network.train(was_training)
    if not predicted:
        raise ValueError("contour_sheet got no images")
    tiles = [(image, true, pred) for image, true, pred, _ in predicted]
    return save_figure(contour_figure(tiles, predicted[0][3], columns, class_names), path)
