"""Activation checkpointing of transformer blocks: keep a block's input, recompute its inside in backward.

Most of a ViT's training memory is what each block saves for backward (attention scores, MLP hidden
activations, the inputs of every Linear); checkpointing keeps only each block's input and runs the
block's forward a second time during backward, for about one extra forward of compute. It applies to
the blocks of SAM's image encoder (``image_encoder.blocks.N``) and of a timm ViT (``blocks.N``): every
module whose name ends in ``blocks.<number>``.

Non-reentrant checkpointing (``use_reentrant=False``) is used: it works with DDP, with inputs that do
not require grad, and with keyword arguments. It is exact with this package's deltas: a sparse delta
is folded into the frozen weight only for the duration of each matmul and the base entries are written
back bit for bit, so the recomputed forward sees the same weights and saves the same tensors; LoRA
branches and adapters are ordinary modules inside the block. The block's forward is replaced on the
instance only, so ``state_dict`` keys, merging and export are unchanged; ``enabled=False`` restores it.
"""

from __future__ import annotations

import re
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK = re.compile(r"(^|\.)blocks\.\d+$")
_MARK = "_medseg_peft_checkpointed"


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward.__get__(self)
    if torch.is_grad_enabled() and self.training:
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)  # evaluation and no-grad passes save nothing anyway


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module named ``...blocks.<number>`` (SAM's image encoder, timm ViTs)."""
    return [(name, m) for name, m in model.named_modules() if BLOCK.search(name)]


def activation_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Checkpoint every transformer block of ``model`` in training (or undo it with ``enabled=False``); returns ``model``."""
    blocks = transformer_blocks(model)
    if enabled and not blocks:
        raise ValueError(f"activation checkpointing found no transformer blocks (modules named 'blocks.N') in this {type(model).__name__}")
    for _, block in blocks:
        if enabled and not getattr(block, _MARK, False):
            block.forward = types.MethodType(_checkpointed_forward, block)
            setattr(block, _MARK, True)
        elif not enabled and getattr(block, _MARK, False):
            del block.forward
            delattr(block, _MARK)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return any(getattr(block, _MARK, False) for _, block in transformer_blocks(model))


__all__ = ["activation_checkpointing", "is_checkpointed", "transformer_blocks"]
