"""What bundles reference: the shared skeleton (``bundle``), metrics, schedules and the per-task glue (polyp, organ)."""

from medseg_peft.workflows.bundle import (
    Checkpoints,
    check_shardable,
    destroy_distributed,
    end_run,
    given,
    init_distributed,
    local_rank,
    method_name,
    on_main_process,
    resolve_device,
    select_or_resume,
    start_run,
    train,
    train_handlers,
    unwrap,
    validation_handlers,
    world_size,
)
from medseg_peft.workflows.contour_sheet import contour_sheet
from medseg_peft.workflows.guards import base_fingerprint
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
from medseg_peft.workflows.polyp import polyp_data, polyp_network
from medseg_peft.workflows.report import RunReport
from medseg_peft.workflows.schedule import timm_epoch_cosine, warmup_cosine
from medseg_peft.workflows.tuned_state import TunedState, load_tuned, save_tuned

__all__ = [
    "base_fingerprint",
    "Checkpoints",
    "check_shardable",
    "PerClassScores",
    "RunReport",
    "TunedState",
    "binarize",
    "class_dice_handler",
    "class_iou_handler",
    "contour_sheet",
    "destroy_distributed",
    "end_run",
    "given",
    "init_distributed",
    "local_rank",
    "method_name",
    "on_main_process",
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
    "save_tuned",
    "select_or_resume",
    "start_run",
    "train",
    "train_handlers",
    "unwrap",
    "validation_handlers",
    "volume_inputs",
    "timm_epoch_cosine",
    "warmup_cosine",
    "world_size",
]
