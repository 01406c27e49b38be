"""SPT's adapters: a bottleneck ``up(gelu(down(.)))`` per row block of a Linear, not mergeable.

Placement as SPT's reference (ziplab/SPT ``model/vision_transformer_timm.py``: ``AttentionSPTSeq``,
``MlpSPTSeq``): on q / k / v, fc1 and fc2 the adapter is sequential on the layer's output,
``y + adapter(dropout(y))``; on the attention projection it is parallel, on the projection's input,
``proj(x) + adapter(x)``, without dropout (``Entries.on_input``). Initialisation as the reference's
``nn.Linear`` pair: down kaiming-uniform with PyTorch's default bias init, up and its bias zero, so
the tuned model starts as the base model. A GELU bottleneck is not a weight change, so it stays a
module for as long as it is attached, and ``merge`` refuses a selection that holds one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.entries import ADAPTER
from medseg_peft.tuning.branch import Branch


class AdapterFactors(nn.Module):
    def __init__(self, in_features: int, rows: int, rank: int, device=None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.down_bias = nn.Parameter(torch.empty(rank, device=device))
        self.up = nn.Parameter(torch.zeros(rows, rank, device=device))
        self.up_bias = nn.Parameter(torch.zeros(rows, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's default init, weight and bias
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.down_bias, -bound, bound)


class AdapterDelta(Branch):
    """A rank-``r`` bottleneck per row block on an ``nn.Linear``'s output, or one beside it on its input."""

    layout = ADAPTER

    @property
    def reads_output(self) -> bool:
        """Sequential on the layer's output, except the projection's adapter, which reads the layer's input."""
        return not self.on_input

    def make_block(self, rows: int, device) -> nn.Module:
        return AdapterFactors(self.in_features if self.on_input else rows, rows, self.rank, device)

    def block_delta(self, i: int, x: torch.Tensor) -> torch.Tensor:
        f = self.factors[i]
        hidden = F.gelu(F.linear(x, f.down.to(x.dtype), f.down_bias.to(x.dtype)))
        return F.linear(hidden, f.up.to(x.dtype), f.up_bias.to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + (", on input" if self.on_input else ", on output")
