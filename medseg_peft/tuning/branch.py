"""Trainable branches beside a frozen ``nn.Linear``: what LoRA and SPT's adapters have in common.

A branch is a forward hook, not a function of the weight, for two reasons. SPT regularises its
branches while training (``Dropout`` on the branch input, ``DropPath`` on its output, ziplab/SPT
``model/vision_transformer_timm.py``, ``StructuredTuningModule``), which a weight parametrization
cannot express; and the layer's input is all a LoRA needs for its gradient, where a parametrized
weight would keep an effective-weight copy alive until backward. In eval mode dropout and drop-path
are the identity, so a LoRA branch equals ``W + B @ A`` and merges into the weight (see
``tuning.attach.merge``); the merged model has no branch.

One branch per row block of the weight: a fused ``qkv`` has separate q, k and v branches (SPT's ViT
has three Linears), each adding to its own slice of the output. Single entries that the selection
trains beside the branches (``Entries.index``) are a sparse :class:`~medseg_peft.tuning.delta.Delta`
held here and registered on the weight as usual.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from medseg_peft.entries import FLAT, Entries, row_view_shape
from medseg_peft.tuning.delta import Delta


def drop_path(p: float) -> nn.Module:
    """Per-sample stochastic depth on a branch's output, timm's ``DropPath`` as SPT uses it."""
    if not p:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(p)


class Branch(nn.Module):
    """Base of :class:`~medseg_peft.tuning.lora.LoRADelta` and :class:`~medseg_peft.tuning.adapter.AdapterDelta`.

    Subclasses create their factors per block in ``make_block`` and compute a block's addition in
    ``block_delta``; here the regularisation, the hook and the sparse part. ``dropout`` applies to the
    branch input (shared by the blocks that read the layer's input, as SPT's q / k / v share one
    dropped-out input), ``drop_path`` to each block's output independently.
    """

    layout: ClassVar[str]
    reads_output: ClassVar[bool] = False  # a block reads its slice of the layer's output, not the layer's input

    def __init__(self, entries: Entries, device: torch.device | None = None, dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.shape = tuple(entries.shape)
        self.rank = entries.rank
        self.blocks = entries.row_blocks()
        self.explicit_blocks = entries.blocks
        self.on_input = entries.on_input
        self.in_features = row_view_shape(self.shape)[1]
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.drop_paths = nn.ModuleList(drop_path(drop_path_rate) for _ in self.blocks)
        self.factors = nn.ModuleList(self.make_block(b - a, device) for a, b in self.blocks)
        # the single entries beside the branches: registered on the weight by attach, not a child here
        # (it would be a second path to the same parameter in the module tree)
        sparse = Delta(Entries(FLAT, self.shape, entries.index), device) if entries.index is not None else None
        self.__dict__["sparse"] = sparse

    def make_block(self, rows: int, device) -> nn.Module:
        raise NotImplementedError

    def block_delta(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def index(self) -> torch.Tensor | None:
        return None if self.sparse is None else self.sparse.index

    @property
    def entries(self) -> Entries:
        index = None if self.sparse is None else self.sparse.index.cpu()
        return Entries(self.layout, self.shape, index, self.rank, self.explicit_blocks, self.on_input)

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The layer's output plus each block's branch output in its rows."""
        x = args[0]
        shared = None if self.reads_output else self.dropout(x)
        adds = []
        for i, (a, b) in enumerate(self.blocks):
            source = self.dropout(output[..., a:b]) if self.reads_output else shared
            adds.append(self.drop_paths[i](self.block_delta(i, source)).to(output.dtype))
        if len(self.blocks) == 1 and self.blocks[0] == (0, output.shape[-1]):
            return output + adds[0]
        pieces, at = [], 0
        for (a, b), add in zip(self.blocks, adds):
            pieces += [output[..., at:a], output[..., a:b] + add]
            at = b
        pieces.append(output[..., at:])
        return torch.cat(pieces, dim=-1)

    # ---- the interface attach / merge / checkpoints use (as Delta's) ---------------------------------
    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """A branch reaches whole rows: the base values kept for an exact unmerge are the whole tensor."""
        return dense

    def put(self, target: torch.Tensor, values: torch.Tensor) -> None:
        target.copy_(values)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by checkpoint key: ``<factor>`` for one branch over all rows, ``<factor>.<i>``
        per row block, and ``values`` for the single entries."""
        out = {}
        for i, block in enumerate(self.factors):
            for key, t in block.named_parameters():
                out[key if self.explicit_blocks is None else f"{key}.{i}"] = t
        if self.sparse is not None:
            out["values"] = self.sparse.values
        return out

    def extra_repr(self) -> str:
        return f"shape={self.shape}, rank={self.rank}, blocks={list(self.blocks)}"
