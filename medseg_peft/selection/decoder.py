"""The laptop baseline: a frozen image encoder, SAM's prompt encoder and mask decoder trained whole.

It is what a user with a CPU tries first, and the bar every selection method has to clear: the
encoder is the expensive part of SAM, and with it frozen each image's embedding can be computed
once and reused every epoch (``SamSegmenter.cache_embeddings``), so an epoch costs only the decoder.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from medseg_peft.entries import WHOLE, Entries, Selection
from medseg_peft.selection.base import settings_dataclass
from medseg_peft.selection.eligibility import always_trained, is_sam
from medseg_peft.selection.full import Full


@settings_dataclass
class Decoder(Full):
    """Train everything outside SAM's image encoder (the parts GPS's rule trains whole); ``batches`` are ignored.
    Like full fine-tuning, the chosen tensors are unfrozen in place rather than given deltas."""

    method = "decoder"

    def build(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        if not is_sam(model):
            raise ValueError(f"the decoder method trains SAM's prompt encoder and mask decoder, but this {type(model).__name__} has no image_encoder")
        params = dict(model.named_parameters())
        entries = {n: Entries(WHOLE, tuple(params[n].shape)) for n in always_trained(model)}
        return Selection(entries, sum(p.numel() for p in model.parameters()), self.method, self.hparams())
