"""medseg-peft: adapt SAM and ViT to medical segmentation by fine-tuning a selected few of their own weights.

    model = medseg_peft.FPS(k=1)(model, batches)   # select + attach; only the deltas train
    ... train ...
    medseg_peft.save_delta(model, "delta.safetensors")
    medseg_peft.merge(model)                        # plain network for inference
"""

from medseg_peft.selection import FPS, GPS, METHODS, SPT, LoRA, Partial, PRESETS, Entries, Full, Selection, Selector, selector
from medseg_peft.tuning import attach, detach, load_delta, merge, save_delta, soup, trainable_parameters, unmerge

__version__ = "0.1.0"

__all__ = [
    "FPS",
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
    "detach",
    "load_delta",
    "merge",
    "save_delta",
    "selector",
    "soup",
    "trainable_parameters",
    "unmerge",
]
