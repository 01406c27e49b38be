"""mDice and mIoU as the polyp papers report them: per image at threshold 0.5, then the mean over images.

MONAI's metrics compute the per-image values; ``ignore_empty=False`` makes an image whose mask is empty
count 1.0 when the prediction is empty too and 0.0 when it is not, instead of being dropped (the
handlers MONAI ships keep the dropping default), so a model that hallucinates lesions is penalised.
"""

from __future__ import annotations

import torch
from monai.handlers import IgniteMetricHandler
from monai.handlers.utils import from_engine
from monai.metrics import DiceMetric, MeanIoU


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Sigmoid then threshold: the prediction the metrics and the exported masks use."""
    return (torch.sigmoid(logits.float()) > threshold).float()


def dice_metric() -> DiceMetric:
    return DiceMetric(include_background=True, reduction="mean", ignore_empty=False)


def iou_metric() -> MeanIoU:
    return MeanIoU(include_background=True, reduction="mean", ignore_empty=False)


def per_image_scores(pred: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image Dice and IoU of binary ``[B, 1, H, W]`` masks (for reports and tests)."""
    return {"dice": dice_metric()(pred, label).flatten(), "iou": iou_metric()(pred, label).flatten()}


def mean_dice_handler() -> IgniteMetricHandler:
    return IgniteMetricHandler(metric_fn=dice_metric(), output_transform=from_engine(["pred", "label"]), save_details=False)


def mean_iou_handler() -> IgniteMetricHandler:
    return IgniteMetricHandler(metric_fn=iou_metric(), output_transform=from_engine(["pred", "label"]), save_details=False)
