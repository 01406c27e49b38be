"""What bundles reference: MONAI handlers, metrics, schedules and the glue between config keys and objects (polyp, organ)."""

from medseg_peft.workflows.contour_sheet import contour_sheet
from medseg_peft.workflows.metrics import (
    PerClassScores,
    binarize,
    class_dice_handler,
    class_iou_handler,
    label_map,
    mean_dice_handler,
    mean_iou_handler,
    per_image_scores,
)
from medseg_peft.workflows.organ import num_outputs, organ_data, organ_loss, organ_network, organ_postprocessing, volume_inputs
from medseg_peft.workflows.polyp import polyp_data, polyp_network, resolve_device
from medseg_peft.workflows.report import RunReport
from medseg_peft.workflows.resume import resume_from_checkpoint
from medseg_peft.workflows.schedule import warmup_cosine
from medseg_peft.workflows.tuned_state import TunedState, load_tuned, save_tuned, select_or_resume

__all__ = [
    "PerClassScores",
    "RunReport",
    "TunedState",
    "binarize",
    "class_dice_handler",
    "class_iou_handler",
    "contour_sheet",
    "label_map",
    "load_tuned",
    "mean_dice_handler",
    "mean_iou_handler",
    "num_outputs",
    "organ_data",
    "organ_loss",
    "organ_network",
    "organ_postprocessing",
    "per_image_scores",
    "polyp_data",
    "polyp_network",
    "resolve_device",
    "resume_from_checkpoint",
    "save_tuned",
    "select_or_resume",
    "volume_inputs",
    "warmup_cosine",
]
