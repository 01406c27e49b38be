"""How a batch reaches the network: the image alone (prompt-free), or the image and its boxes (MedSAM's protocol)."""

from __future__ import annotations

from medseg_peft.data.volume_boxes import PROMPTS  # the one list, carried by exported bundles too


def check_prompt(prompt: str) -> str:
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    return prompt


def prompt_batch(prompt: str = "none"):
    """The ``prepare_batch`` for MONAI's trainer and evaluator: with ``"box"``, the batch's ``"box"`` goes to
    the network as ``boxes=``, so training, validation and the inferer all see the same prompts."""
    from monai.engines import PrepareBatchExtraInput, default_prepare_batch

    return PrepareBatchExtraInput({"boxes": "box"}) if check_prompt(prompt) == "box" else default_prepare_batch
