"""SPT's adapter: a bottleneck on a linear layer's output, ``y + up(gelu(down(y)))``.

Unlike sparse and LoRA deltas this is not a function of the weight, so it cannot be folded into the
network: it stays a module (with a forward hook on its linear layer) for as long as it is attached,
and ``merge`` refuses a selection that holds one. ``up`` starts at zero, so the tuned model starts
as the base model (SPT's reference initialisation: down kaiming-uniform, up and biases zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.selection.selection import ADAPTER, Entries, row_view_shape


class AdapterDelta(nn.Module):
    """A rank-``r`` bottleneck added to the output of the ``nn.Linear`` whose weight is named."""

    layout = ADAPTER

    def __init__(self, entries: Entries, device: torch.device | None = None):
        super().__init__()
        self.shape = tuple(entries.shape)
        self.rank = entries.rank
        out_features = row_view_shape(self.shape)[0]
        self.down = nn.Parameter(torch.empty(self.rank, out_features, device=device))
        self.down_bias = nn.Parameter(torch.zeros(self.rank, device=device))
        self.up = nn.Parameter(torch.zeros(out_features, self.rank, device=device))
        self.up_bias = nn.Parameter(torch.zeros(out_features, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def entries(self) -> Entries:
        return Entries(ADAPTER, self.shape, rank=self.rank)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(output, self.down.to(output.dtype), self.down_bias.to(output.dtype)))
        return output + F.linear(hidden, self.up.to(output.dtype), self.up_bias.to(output.dtype))

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        return dense

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"down": self.down, "down_bias": self.down_bias, "up": self.up, "up_bias": self.up_bias}

    def extra_repr(self) -> str:
        return f"out={self.shape[0]}, rank={self.rank}"
