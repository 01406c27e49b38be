"""A frozen base in bf16: the untouched Linear weights stored at half the bytes, everything that trains in fp32.

After a selection is attached, the base weights of a sparse delta or a LoRA branch, and Linear weights
that stay frozen, are never written; storing them in bf16 halves the weights of a SAM ViT-H (2.5 GB to
about 1.3 GB, Linear layers being nearly all of it). Delta values, LoRA factors, whole-trained tensors
(their base and values), norms, biases, convolutions and position tables keep their dtype.

The forward stays fp32 where the step is fp32: a sparse Linear adds its fp32 delta to a transient fp32
copy of the bf16 base for each matmul (``Delta.effective``), a LoRA weight is ``fp32(base) + B @ A``, and
a frozen Linear casts its weight for the matmul without saving it (``frozen_linear_forward``). Under
bf16 autocast the base is used as it is (autocast would cast an fp32 weight to bf16 anyway).

What ``merge`` writes: a weight keeps its storage dtype, so merging a bf16 base writes
``bf16(base + delta)`` (the merged model is half-size; small deltas may round away). For the fp32 result
of the bf16 base plus the fp32 delta (exactly what the fp32 tuned model computed), call
``cast_base(model, torch.float32)`` first (bf16 to fp32 is exact), then ``merge``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from medseg_peft.entries import WHOLE
from medseg_peft.tuning.delta import Delta, frozen_linear_forward

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"base_dtype must be one of {sorted(DTYPES)} (or null for the checkpoint's own), got {dtype!r}")
    return DTYPES[key]


def _frozen_base(module: nn.Module) -> torch.Tensor | None:
    """The frozen Linear weight tensor of ``module`` that may change dtype, or None."""
    if parametrize.type_before_parametrizations(module) is not nn.Linear:
        return None
    if parametrize.is_parametrized(module, "weight"):
        chain = module.parametrizations["weight"]
        if len(chain) != 1 or (isinstance(chain[0], Delta) and chain[0].layout == WHOLE):
            return None  # a whole-trained weight keeps its dtype
        return chain.original
    return None if module.weight.requires_grad else module.weight


def cast_base(model: nn.Module, dtype: str | torch.dtype | None = torch.bfloat16) -> nn.Module:
    """Store the frozen Linear weights of ``model`` (attached or plain) in ``dtype``; ``None`` changes nothing.

    ``dtype=torch.float32`` undoes it exactly (and is how to get an fp32 ``merge``). Returns ``model``.
    """
    if dtype is None or dtype in ("", "None", "null"):
        return model
    dtype = resolve_dtype(dtype)
    for module in model.modules():
        weight = _frozen_base(module)
        if weight is None or weight.dtype == dtype:
            continue
        weight.data = weight.data.to(dtype)
        plain = not parametrize.is_parametrized(module, "weight")
        if plain and dtype != torch.float32:
            module.forward = frozen_linear_forward.__get__(module)
        elif plain and "forward" in vars(module):
            del module.forward
    return model


def base_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights cost in memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


__all__ = ["base_bytes", "cast_base", "resolve_dtype"]
