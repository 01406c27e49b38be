"""medseg-peft: adapt SAM and ViT to medical segmentation by fine-tuning a selected few of their own weights.

    model = medseg_peft.FPS(k=1)(model, batches)   # select + attach; only the deltas train
    ... train ...
    medseg_peft.save_delta(model, "delta.safetensors")
    medseg_peft.merge(model)                        # plain network for inference

Importing the package, the selectors and the tuning API loads torch but no MONAI, ignite or nibabel:
a notebook that only selects and tunes should not pay seconds of start-up for a training runtime it
does not use. The MONAI parts (``medseg_peft.data``, ``medseg_peft.workflows``, ``medseg_peft.export``,
...) load on first use, and every name stays where it was (``medseg_peft.data.polyp_transforms``,
``mp.workflows.train``) through :func:`medseg_peft.lazy.lazy_package`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from medseg_peft.lazy import lazy_package  # noqa: E402
from medseg_peft.selection import (  # noqa: E402
    FPS,
    GPS,
    METHODS,
    PRESETS,
    SPT,
    Decoder,
    Entries,
    Full,
    LoRA,
    Partial,
    Selection,
    Selector,
    selector,
)
from medseg_peft.tuning import (  # noqa: E402
    attach,
    cast_base,
    detach,
    load_delta,
    merge,
    save_delta,
    soup,
    trainable_parameters,
    unmerge,
)

# MONAI-facing parts, imported when first touched: mp.data, mp.workflows, mp.export, ...
lazy_package(__name__, {}, submodules=("data", "distributed", "export", "io", "models", "recipes", "results", "selection", "tuning", "workflows"))


def activation_checkpointing(model, enabled: bool = True):
    """Checkpoint the transformer blocks of ``model`` (SAM's image encoder, timm ViTs) in training; see
    ``medseg_peft.models.checkpointing`` (imported on use: it needs segment-anything's model code)."""
    from medseg_peft.models.checkpointing import activation_checkpointing as apply

    return apply(model, enabled)


__all__ = [
    "Decoder",
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
