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


# --- multi-class volumes -------------------------------------------------------------------------
# Organ metrics follow the 3D convention (SAMed, MSD): Dice and IoU per class per *volume*, in 3D,
# then averaged; mDice / mIoU are the mean over classes and volumes. Background is not scored. With
# ignore_empty=False a class absent from a volume scores 1 when it is not predicted and 0 when it is.


def label_map(logits: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """Class values from channel-first logits (``[C, ...]``), keeping a leading channel of size 1.

    The rule of ``probabilities_config`` (softmax over background + classes, or per-class sigmoid
    above 0.5), then an argmax: the same transforms the inference bundles run.
    """
    from medseg_peft.data.volume_transforms import instantiate, probabilities_config

    steps = probabilities_config(activation) + [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    return torch.as_tensor(instantiate(steps)({"pred": logits.float()})["pred"]).as_subclass(torch.Tensor)


def class_dice_metric() -> DiceMetric:
    return DiceMetric(include_background=False, reduction="mean", ignore_empty=False)


def class_iou_metric() -> MeanIoU:
    return MeanIoU(include_background=False, reduction="mean", ignore_empty=False)


def class_dice_handler() -> IgniteMetricHandler:
    return IgniteMetricHandler(metric_fn=class_dice_metric(), output_transform=from_engine(["pred", "label"]), save_details=True)


def class_iou_handler() -> IgniteMetricHandler:
    return IgniteMetricHandler(metric_fn=class_iou_metric(), output_transform=from_engine(["pred", "label"]), save_details=True)


class PerClassScores:
    """Adds ``Dice_<class>`` / ``IoU_<class>`` (means over volumes) to the evaluator's metrics.

    Reads the per-volume, per-class buffers the metric handlers keep (``save_details``), so the class
    means come from the very numbers mDice / mIoU average, and the run report records them.
    """

    def __init__(self, class_names: dict[int, str] | list[str], metrics: dict[str, str] | None = None):
        names = class_names.values() if isinstance(class_names, dict) else class_names
        self.names = [str(n) for n in names]
        self.metrics = metrics or {"mDice": "Dice", "mIoU": "IoU"}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        details = getattr(engine.state, "metric_details", {})
        for metric, prefix in self.metrics.items():
            if metric not in details:
                continue
            per_class = torch.as_tensor(details[metric]).float().reshape(-1, len(self.names)).mean(0)
            for name, value in zip(self.names, per_class.tolist()):
                engine.state.metrics[f"{prefix}_{name}"] = value
