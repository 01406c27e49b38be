"""How a batch reaches the network: the image alone (prompt-free), or the image and its boxes (MedSAM's protocol)."""

from __future__ import annotations

from medseg_peft.data.volume_boxes import (
    check_prompt,  # beside the one list of prompts, carried by exported bundles too
)


def prompt_batch(prompt: str = "none"):
    """The ``prepare_batch`` for MONAI's trainer and evaluator: with ``"box"``, the batch's ``"box"`` goes to
    the network as ``boxes=``, so training, validation and the inferer all see the same prompts."""
    from monai.engines import PrepareBatchExtraInput, default_prepare_batch

    return PrepareBatchExtraInput({"boxes": "box"}) if check_prompt(prompt) == "box" else default_prepare_batch
