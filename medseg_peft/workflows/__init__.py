"""What bundles reference: MONAI handlers, metrics, schedules and the glue between config keys and objects."""

from medseg_peft.workflows.contour_sheet import contour_sheet
from medseg_peft.workflows.metrics import binarize, mean_dice_handler, mean_iou_handler, per_image_scores
from medseg_peft.workflows.polyp import polyp_data, polyp_network, resolve_device
from medseg_peft.workflows.report import RunReport
from medseg_peft.workflows.resume import resume_from_checkpoint
from medseg_peft.workflows.schedule import warmup_cosine
from medseg_peft.workflows.tuned_state import TunedState, save_tuned, select_or_resume

__all__ = [
    "RunReport",
    "TunedState",
    "binarize",
    "contour_sheet",
    "mean_dice_handler",
    "mean_iou_handler",
    "per_image_scores",
    "polyp_data",
    "polyp_network",
    "resolve_device",
    "resume_from_checkpoint",
    "save_tuned",
    "select_or_resume",
    "warmup_cosine",
]
