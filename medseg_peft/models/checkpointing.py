"""Activation checkpointing of transformer blocks: keep a block's input, recompute its inside in backward.

Most of a ViT's training memory is what each block saves for backward (attention scores, MLP hidden
activations, the inputs of every Linear); checkpointing keeps only each block's input and runs the
block's forward a second time during backward, for about one extra forward of compute. It applies to
every module whose name ends in ``blocks.<number>``: the blocks of SAM's ViT image encoder
(``image_encoder.blocks.N``), of a timm ViT (``blocks.N``) and of TinyViT (LiteMedSAM, MobileSAM:
``image_encoder.layers.S.blocks.N``, the MBConvs of stage 0 and the ``TinyViTBlock``s of stages 1-3).
TinyViT's patch embedding, patch mergings (``layers.S.downsample``) and SAM's neck stay plain: they are
a few convolutions each, a small share of the activations.

``"selective"`` keeps the outputs of the matrix products and attention too (PyTorch's selective
activation checkpointing, ``create_selective_checkpoint_contexts``) and recomputes only what lies between
them: norms, activations, adds and the input columns a sparse delta saves. That is the cheap part of a
block in time and most of it in memory.

Non-reentrant checkpointing (``use_reentrant=False``) is used: it works with DDP, with inputs that do
not require grad, and with keyword arguments. It is exact with this package's deltas: a sparse delta
is folded into the frozen weight only for the duration of each matmul and the base entries are written
back bit for bit, so the recomputed forward sees the same weights and saves the same tensors; LoRA
branches and adapters are ordinary modules inside the block. TinyViT's BatchNorms stay in eval mode in
training (``TinyViT.train``), so the second forward neither sees batch statistics of its own nor
updates the running ones a second time. The block's forward is replaced on the
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


MODES = (False, True, "selective")


def matmul_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: matrix products and attention (the costly ones)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu", "convolution")
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


_MATMULS = matmul_ops()


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmuls)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward.__get__(self)
    if torch.is_grad_enabled() and self.training:
        if getattr(self, _MARK) == "selective":
            return checkpoint(plain, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)  # evaluation and no-grad passes save nothing anyway


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module named ``...blocks.<number>`` (SAM's ViT and TinyViT image encoders, timm ViTs)."""
    return [(name, m) for name, m in model.named_modules() if BLOCK.search(name)]


def activation_checkpointing(model: nn.Module, enabled: bool | str = True) -> nn.Module:
    """Checkpoint every transformer block of ``model`` in training; returns ``model``.

    ``enabled``: ``True`` keeps only each block's input and recomputes the whole block in backward;
    ``"selective"`` also keeps the outputs of the block's matrix products and attention
    (:func:`matmul_ops`) and recomputes only the cheap operations between them (norms, activations,
    adds, reshapes, the columns a sparse delta needs), so backward runs no matmul twice; ``False``
    undoes it.
    """
    if enabled not in MODES:
        raise ValueError(f"checkpointing must be one of {MODES}, got {enabled!r}")
    blocks = transformer_blocks(model)
    if enabled and not blocks:
        raise ValueError(f"activation checkpointing found no transformer blocks (modules named 'blocks.N') in this {type(model).__name__}")
    for _, block in blocks:
        if enabled:
            block.forward = types.MethodType(_checkpointed_forward, block)
            setattr(block, _MARK, enabled)
        elif getattr(block, _MARK, False):
            del block.forward
            delattr(block, _MARK)
    return model


def is_checkpointed(model: nn.Module) -> bool | str:
    """``False``, ``True`` or ``"selective"``: how ``model`` (a block, or the blocks in it) is checkpointed."""
    if getattr(model, _MARK, False):
        return getattr(model, _MARK)
    return next((getattr(block, _MARK) for _, block in transformer_blocks(model) if getattr(block, _MARK, False)), False)


__all__ = ["MODES", "activation_checkpointing", "is_checkpointed", "matmul_ops", "transformer_blocks"]
