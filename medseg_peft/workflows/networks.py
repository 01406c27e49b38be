"""The SAM network every segmentation bundle builds, and the learning rate that suits its weights.

The polyp and organ bundles differ only in the wrapper around SAM (outputs, grey input), so both build
it here: which checkpoint, which variant, random weights only on purpose, the embedded demo model by
default. Bundles call ``wf.polyp_network`` and ``wf.default_lr``; ``wf.organ_network``
(:mod:`medseg_peft.workflows.organ`) is :func:`polyp_network` with the organ wrapper's keys.
"""

from __future__ import annotations

import logging

from torch import nn

from medseg_peft.workflows.bundle import given

log = logging.getLogger("medseg_peft")

DEMO_LR, PRETRAINED_LR = 5e-3, 1e-4


def default_lr(lr: float | None = None, sam_checkpoint: str | None = None) -> float:
    """The learning rate: the user's, else 1e-4 for a real checkpoint (MedSAM's and LiteMedSAM's rate: larger ones
    pull a pre-trained decoder away from what it knows within an epoch) and 5e-3 for the small demo model."""
    if given(lr):
        return float(lr)
    return PRETRAINED_LR if given(sam_checkpoint) and sam_checkpoint != RANDOM_WEIGHTS else DEMO_LR


RANDOM_WEIGHTS = "random"  # the sam_checkpoint value that asks for a variant's architecture with random weights


def polyp_network(sam_checkpoint: str | None = None, sam_variant: str | None = None, image_size: int | None = None,
                  embedding_cache: bool = False, **wrapper) -> nn.Module:
    """A SAM segmenter: the user's checkpoint (a path or a name such as ``lite_medsam``; its variant read off
    its weights unless ``sam_variant`` names it), ``"random"`` for ``sam_variant``'s architecture untrained,
    or the embedded demo model when neither a checkpoint nor a variant is given. A variant without a
    checkpoint is refused: training a randomly initialised SAM by accident would look like a bad method.
    ``embedding_cache`` reuses each image's embedding while the encoder is frozen.

    ``wrapper`` keys go to ``SamSegmenter`` (outputs, grey input), for the organ bundles.
    """
    from medseg_peft.models import demo_segmenter, sam_segmenter
    from medseg_peft.models.sam import variant_config

    variant = sam_variant if given(sam_variant) else None
    if variant is not None:
        variant_config(variant)  # an unknown name stops here, whatever else is given
    size = image_size if given(image_size) else None
    if sam_checkpoint == RANDOM_WEIGHTS:
        if variant is None:
            raise ValueError("sam_checkpoint='random' needs a sam_variant to build (e.g. --sam_variant vit_b)")
        net = sam_segmenter(variant, None, size, **wrapper)
        log.warning("SAM %s with RANDOM weights (sam_checkpoint='random'), at %d px: nothing pre-trained", variant, net.image_size)
        return net.cache_embeddings(bool(embedding_cache))
    if given(sam_checkpoint):
        net = sam_segmenter(variant, sam_checkpoint, size, **wrapper)
        log.info("SAM %s from %s at %d px (%s intensity, %s resize)", net.variant, sam_checkpoint, net.image_size, net.intensity, net.resize)
        return net.cache_embeddings(bool(embedding_cache))
    if variant is not None:
        raise ValueError(f"sam_variant={variant!r} was given without a sam_checkpoint: pass --sam_checkpoint with its weights "
                         f"(a file, or a name such as lite_medsam), --sam_checkpoint random to train it from random weights, "
                         f"or leave sam_variant out for the embedded demo model")
    net = demo_segmenter(size, **wrapper)
    log.warning(
        "no sam_checkpoint given: using the embedded demo model (a small SAM-architecture network pretrained on "
        "synthetic shapes, not Meta's SAM) at %d px; pass --sam_checkpoint sam_vit_b_01ec64.pth for the real one",
        net.image_size,
    )
    return net.cache_embeddings(bool(embedding_cache))
