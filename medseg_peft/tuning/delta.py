"""A frozen weight seen through a trainable index + value delta.

``Delta`` is a ``torch.nn.utils.parametrize`` parametrization: the module keeps calling its weight
as usual and gets ``base + scatter(values)``; the base tensor is never written. Only ``values``
(``[rows, K]``, ``[n]`` or the parameter's shape) is a trainable parameter, so an optimizer built
over ``requires_grad`` parameters holds state for the selected entries alone.

The gradient of ``values`` is the dense weight gradient gathered at the index: the dense gradient
exists only transiently inside autograd, which on GPUs is faster than any sparse kernel at these
sparsities (measured in ``benchmarks/selection_costs.py``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from medseg_peft.entries import FLAT, ROWS, WHOLE, Entries, row_view_shape


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
        self._index_columns(device)

    def _index_columns(self, device, group: int = 1) -> None:
        """``columns``: the sorted input columns (of the ``[rows, in * kh * kw...]`` row view) holding any selected
        entry, or with ``group > 1`` the sorted runs of ``group`` consecutive columns (a conv's input channels:
        ``group = kh * kw``); ``local``: each entry's position in the ``[rows, len(columns) * group]`` matrix of
        those columns (flattened for a flat index). A Linear delta then needs only ``x[..., columns]`` for its
        gradient, a conv only those patch columns or channels (``delta_conv``); ``None`` where that saves too
        little. ``column_group`` records ``group``."""
        self.register_buffer("columns", None, persistent=False)
        self.register_buffer("local", None, persistent=False)
        self.column_group = group
        if self.layout not in (ROWS, FLAT) or len(self.shape) < 2:
            return
        n_cols = row_view_shape(self.shape)[1]
        index = self.index.long()
        cols = index if self.layout == ROWS else index % n_cols
        columns, position = torch.unique(cols // group, sorted=True, return_inverse=True)
        if columns.numel() * group > COMPACT_BELOW * n_cols:
            return
        position = position * group + cols % group
        width = columns.numel() * group
        local = position if self.layout == ROWS else (index // n_cols) * width + position
        self.columns, self.local = columns.to(device), local.to(device)

    def group_columns(self, group: int) -> None:
        """Index the columns in runs of ``group`` (see ``_index_columns``); nothing to do if already so."""
        if group != self.column_group:
            self._index_columns(None if self.index is None else self.index.device, group)

    def gather_columns(self, dense_columns: torch.Tensor) -> torch.Tensor:
        """The entries of a ``[rows, len(columns) * column_group]`` matrix holding the selected columns of a dense tensor."""
        if self.layout == ROWS:
            return dense_columns.gather(1, self.local)
        return dense_columns.reshape(-1).gather(0, self.local)

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

    @contextmanager
    def folded_into(self, base: torch.Tensor, values: torch.Tensor):
        """Temporarily hold ``base + delta`` in ``base`` itself; the base entries are restored exactly on exit."""
        with torch.no_grad():
            kept = self.gather(base).clone()
            self.add_to(base, values, out=base)
        try:
            yield base
        finally:
            with torch.no_grad():
                self.put(base, kept)

    @contextmanager
    def effective(self, base: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
        """``base + delta`` as a ``dtype`` tensor for one matmul, with no lasting copy: folded into ``base`` in
        place (then cast, if ``dtype`` is narrower), or, for a base narrower than ``dtype`` (a bf16 base
        in an fp32 step), added to a transient upcast copy so that small deltas are not rounded away."""
        if base.dtype == dtype or base.dtype.itemsize >= dtype.itemsize:
            with self.folded_into(base, values):
                yield base.to(dtype)
        else:
            weight = base.to(dtype)
            yield self.add_to(weight, values, out=weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a delta checkpoint stores for this tensor (besides the index)."""
        return {"values": self.values}

    def extra_repr(self) -> str:
        return f"layout={self.layout}, shape={self.shape}, trainable={self.values.numel()}"


COMPACT_BELOW = 0.5  # save x[..., columns] for the gradient when the columns are at most this share of the inputs


class _DeltaLinear(torch.autograd.Function):
    """``F.linear(x, base + delta, bias)`` without an effective-weight copy, kept or transient.

    Through the parametrization alone, autograd would keep one effective-weight copy per layer
    alive until backward (F.linear saves its weight input), which a frozen layer does not cost. Here
    the delta is folded into the base tensor in place for the duration of the matmul (forward, and
    again for the input gradient in backward) and the base entries are written back bit for bit right
    after, so no weight-sized buffer is ever allocated; the dense weight gradient lives only long
    enough to be gathered at the selected entries.

    The weight gradient of ``values[j, k]`` needs only input column ``index[j, k]``, so when the selected
    entries share few columns (``Delta.columns``, at most ``COMPACT_BELOW`` of the inputs) only
    ``x[..., columns]`` is saved for backward, and the gradient is the ``[rows, columns]`` product
    gathered there: on pretrained SAM / ViT a few input features carry most of the activation mass,
    which both FPS's and GPS's scores favour, so the selected entries pile up in few columns. The base is held on ``ctx`` rather than saved,
    since its version counter moves with every fold (its values never do outside the fold).
    """

    @staticmethod
    def forward(ctx, x, base, values, bias, delta: Delta):
        device = x.device.type
        ctx.cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.delta, ctx.base = delta, base
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.in_features = x.shape[-1]
        kept = x if delta.columns is None else x.index_select(-1, delta.columns)  # the columns the gradient needs
        ctx.save_for_backward(kept if ctx.cast is None else kept.to(ctx.cast), values)
        with delta.effective(base, values, ctx.cast or x.dtype) as weight:
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            with ctx.delta.effective(ctx.base, values, grad.dtype) as weight:
                gx = (g2 @ weight).reshape(*grad.shape[:-1], ctx.base.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            dense = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)  # [rows, columns kept]
            gv = (ctx.delta.gather(dense) if ctx.delta.columns is None else ctx.delta.gather_columns(dense)).to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = g2.sum(0)
        return gx, None, gv, gb, None


class _FrozenLinear(torch.autograd.Function):
    """``F.linear`` of a frozen weight stored narrower than the step computes in (a bf16 base in an fp32 step):
    the weight is cast for the matmul and again in backward, never saved, and the input is not saved
    (a frozen weight needs no gradient), so the cast costs no memory beyond one transient copy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight, ctx.has_bias, ctx.x_dtype = weight, bias is not None, x.dtype
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = (g2 @ ctx.weight.to(grad.dtype)).reshape(*grad.shape[:-1], ctx.weight.shape[1]).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb


def frozen_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of a plain ``nn.Linear`` whose frozen weight is kept in a narrower dtype than its input."""
    device = x.device.type
    if self.weight.dtype == x.dtype or torch.is_autocast_enabled(device):
        return F.linear(x, self.weight, self.bias)  # autocast casts both sides itself
    return _FrozenLinear.apply(x, self.weight, self.bias)


def delta_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Forward of an ``nn.Linear`` whose weight is parametrized by one :class:`Delta`."""
    chain = self.parametrizations["weight"]
    if len(chain) != 1 or not isinstance(chain[0], Delta) or parametrize._cache_enabled:
        return nn.Linear.forward(self, x)
    return _DeltaLinear.apply(x, chain.original, chain[0].values, self.bias, chain[0])


__all__ = ["Delta", "FLAT", "ROWS", "WHOLE", "delta_linear_forward", "frozen_linear_forward"]
