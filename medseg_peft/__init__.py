"""medseg-peft: adapt SAM and ViT to medical segmentation by fine-tuning a selected few of their own weights.

    model = medseg_peft.FPS(k=1)(model, batches)   # select + attach; only the deltas train
    ... train ...
    medseg_peft.save_delta(model, "delta.safetensors")
    medseg_peft.merge(model)                        # plain network for inference
"""

from medseg_peft.selection import FPS, GPS, METHODS, SPT, LoRA, Partial, PRESETS, Entries, Full, Selection, Selector, selector
from medseg_peft.tuning import attach, cast_base, detach, load_delta, merge, save_delta, soup, trainable_parameters, unmerge

__version__ = "0.1.0"


def activation_checkpointing(model, enabled: bool = True):
    """Checkpoint the transformer blocks of ``model`` (SAM's image encoder, timm ViTs) in training; see
    ``medseg_peft.models.checkpointing`` (imported on use: it needs segment-anything's model code)."""
    from medseg_peft.models.checkpointing import activation_checkpointing as apply

    return apply(model, enabled)


__all__ = [
    "FPS",
    "activation_checkpointing",
    "GPS",
    "LoRA",
    "Full",
    "METHODS",
    "PRESETS",
    "Partial",
    "SPT",
    "Entries",
    "Selection",
    "Selector",
    "attach",
    "cast_base",
    "detach",
    "load_delta",
    "merge",
    "save_delta",
    "selector",
    "soup",
    "trainable_parameters",
    "unmerge",
]
