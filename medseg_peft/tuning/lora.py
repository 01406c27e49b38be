"""LoRA branches: ``y = W x + scale * B (A x)`` beside a frozen Linear, mergeable into ``W``.

The same life cycle as the sparse :class:`~medseg_peft.tuning.delta.Delta` (attach, merge, unmerge
exactly, save only the factors), so LoRA, SPT's structured part and the selection methods compare on
equal terms. Initialisation follows the LoRA paper and SPT's reference (ziplab/SPT
``model/vision_transformer_timm.py``, ``StructuredTuningModule``): A kaiming-uniform, B zero, so the
tuned model starts as the base model; ``scale`` is 1 (SPT applies no alpha / r factor). While
training, ``dropout`` on the branch input and ``drop_path`` on its output regularise it (SPT: 0.1
each); in eval mode the branch is exactly ``W + B @ A``, which ``add_to`` folds into the weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.entries import LORA
from medseg_peft.tuning.branch import Branch


class LoRAFactors(nn.Module):
    def __init__(self, rows: int, cols: int, rank: int, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class LoRADelta(Branch):
    """Rank-``r`` branches ``B @ A``, one per row block, beside an ``nn.Linear``."""

    layout = LORA
    scale = 1.0

    def make_block(self, rows: int, device) -> nn.Module:
        return LoRAFactors(rows, self.in_features, self.rank, device)

    def block_delta(self, i: int, x: torch.Tensor) -> torch.Tensor:
        f = self.factors[i]
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) or x.dtype.itemsize >= 4 else f.lora_A.dtype
        h = F.linear(F.linear(x.to(dtype), f.lora_A.to(dtype)), f.lora_B.to(dtype))
        return h if self.scale == 1.0 else self.scale * h

    def dense(self) -> torch.Tensor:
        """The weight change ``scale * B @ A`` in each block's rows, zero elsewhere (float32)."""
        rows, cols = self.shape[0], self.in_features
        change = torch.zeros(rows, cols, dtype=torch.float32, device=self.factors[0].lora_A.device)
        for (a, b), f in zip(self.blocks, self.factors):
            change[a:b] = self.scale * (f.lora_B.detach() @ f.lora_A.detach())
        return change.reshape(self.shape)

    def add_to(self, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``base`` plus the weight change (branches and single entries); in place when ``out is base``.
        What the eval-mode model computes, folded into the weight."""
        with torch.no_grad():
            out = base.detach().clone() if out is None else out
            if self.sparse is not None:
                self.sparse.add_to(out, out=out)
            return out.add_(self.dense().to(out.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale}"
