"""A frozen weight seen through a trainable index + value delta.

``Delta`` is a ``torch.nn.utils.parametrize`` parametrization: the module keeps calling its weight
as usual and gets ``base + scatter(values)``; the base tensor is never written. Only ``values``
(``[rows, K]``, ``[n]`` or the parameter's shape) is a trainable parameter, so an optimizer built
over ``requires_grad`` parameters holds state for the selected entries alone.

The gradient of ``values`` is the dense weight gradient gathered at the index: the dense gradient
exists only transiently inside autograd, which on GPUs is faster than any sparse kernel at these
sparsities (``../shared/research/peers.md`` section 4.2).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg_peft.selection.selection import FLAT, ROWS, WHOLE, Entries, row_view_shape


class _AddDelta(torch.autograd.Function):
    """``base + delta(values)`` with a gather backward; ``base`` gets no gradient."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, values: torch.Tensor, delta: "Delta") -> torch.Tensor:
        ctx.delta = delta
        ctx.values_dtype = values.dtype
        return delta.add_to(base, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.delta.gather(grad).to(ctx.values_dtype), None


class Delta(nn.Module):
    """Trainable values at the entries of one parameter; a parametrization of that parameter.

    Values are kept in float32 whatever the base dtype, so a bf16 base can be tuned without losing
    small updates; they are cast to the base dtype when added.
    """

    def __init__(self, entries: Entries, device: torch.device | None = None):
        super().__init__()
        self.layout = entries.layout
        self.shape = tuple(entries.shape)
        if self.layout == WHOLE:
            value_shape = self.shape
            self.register_buffer("index", None)
        else:
            value_shape = tuple(entries.index.shape)
            self.register_buffer("index", entries.index.to(device))
        self.values = nn.Parameter(torch.zeros(value_shape, dtype=torch.float32, device=device))

    @property
    def entries(self) -> Entries:
        return Entries(self.layout, self.shape, None if self.index is None else self.index.cpu())

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return _AddDelta.apply(base, self.values, self)

    # ---- the two primitives everything else is built on ------------------------------------------
    def add_to(self, base: torch.Tensor, values: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """``base`` with the delta added at the entries; in place when ``out is base``.

        Training forwards, ``merge`` and ``load_delta`` all go through here, so a merged weight is
        bit-identical to the weight the tuned model computed with.
        """
        v = (self.values if values is None else values).detach().to(base.dtype)
        if out is None:
            out = base.detach().clone()
        if self.layout == WHOLE:
            return out.add_(v)
        if self.layout == ROWS:
            out.view(row_view_shape(self.shape)).scatter_add_(1, self.index, v)
        else:
            out.view(-1).scatter_add_(0, self.index, v)
        return out

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """The entries of a dense tensor of the parameter's shape (its gradient, or base values)."""
        if self.layout == WHOLE:
            return dense
        if self.layout == ROWS:
            return dense.reshape(row_view_shape(self.shape)).gather(1, self.index)
        return dense.reshape(-1).gather(0, self.index)

    def put(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` into ``target`` at the entries, in place (used to undo a merge exactly)."""
        if self.layout == WHOLE:
            target.copy_(values)
        elif self.layout == ROWS:
            target.view(row_view_shape(self.shape)).scatter_(1, self.index, values.to(target.dtype))
        else:
            target.view(-1).scatter_(0, self.index, values.to(target.dtype))

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={self.shape}, trainable={self.values.numel()}"


__all__ = ["Delta", "FLAT", "ROWS", "WHOLE"]
