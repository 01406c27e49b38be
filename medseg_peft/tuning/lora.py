"""A frozen weight seen through a low-rank branch: ``W + scale * (B @ A)``.

The same parametrization life cycle as the sparse :class:`~medseg_peft.tuning.delta.Delta` (attach,
merge exactly, unmerge exactly, save only the factors), so LoRA, SPT's structured part and the
selection methods compare on equal terms. Initialisation follows the LoRA paper and SPT's reference:
A kaiming-uniform, B zero, so the tuned model starts as the base model; ``scale`` defaults to 1 (SPT
applies no alpha / r factor).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg_peft.selection.selection import LORA, Entries, row_view_shape


class LoRADelta(nn.Module):
    """``base + scale * (lora_B @ lora_A)`` over the weight viewed as ``[rows, cols]`` (conv kernels flattened)."""

    layout = LORA

    def __init__(self, entries: Entries, device: torch.device | None = None, scale: float = 1.0):
        super().__init__()
        self.shape = tuple(entries.shape)
        self.rank = entries.rank
        self.scale = float(scale)
        rows, cols = row_view_shape(self.shape)
        self.lora_A = nn.Parameter(torch.empty(self.rank, cols, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(rows, self.rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def entries(self) -> Entries:
        return Entries(LORA, self.shape, rank=self.rank)

    def dense(self) -> torch.Tensor:
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(self.shape)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if base.dtype.itemsize < self.lora_A.dtype.itemsize:  # a bf16 base: compute base + BA in fp32, not rounded to bf16
            return base.to(self.lora_A.dtype) + self.dense()
        return base + self.dense().to(base.dtype)

    def add_to(self, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``base + delta``; in place when ``out is base`` (the same arithmetic as ``forward``, so a merge is exact)."""
        with torch.no_grad():
            d = self.dense().to(base.dtype)
            return base + d if out is None else out.add_(d)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        return dense

    def put(self, target: torch.Tensor, values: torch.Tensor) -> None:
        target.copy_(values)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.rank}, scale={self.scale}"
