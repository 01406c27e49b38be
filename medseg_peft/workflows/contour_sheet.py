"""A PNG sheet of validation images with true (green) and predicted (red) mask outlines.

The quickest honest check of a segmentation run is to look at it; this writes that picture at the end
of training without any plotting dependency.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from medseg_peft.workflows.metrics import binarize


def outline(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of a binary ``[H, W]`` mask whose 3x3 neighbourhood leaves the mask."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def contour_sheet(network: nn.Module, batches, path: str | Path, device: torch.device, max_images: int = 8, columns: int = 4) -> Path:
    """Predict on up to ``max_images`` images of ``batches`` and write the outlined sheet to ``path``."""
    tiles = []
    was_training = network.training
    network.eval()
    with torch.no_grad():
        for batch in batches:
            image, label = batch["image"], batch["label"]
            pred = binarize(network(image.to(device))).cpu()
            for i in range(image.shape[0]):
                rgb = image[i].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy().copy()
                rgb[outline(label[i, 0] > 0.5).numpy()] = (0, 255, 0)
                rgb[outline(pred[i, 0] > 0.5).numpy()] = (255, 0, 0)
                tiles.append(rgb)
                if len(tiles) == max_images:
                    break
            if len(tiles) == max_images:
                break
    network.train(was_training)
    if not tiles:
        raise ValueError("contour_sheet got no images")
    h, w, _ = tiles[0].shape
    rows = (len(tiles) + columns - 1) // columns
    sheet = np.zeros((rows * h, min(columns, len(tiles)) * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path
