"""The forward of an ``nn.Conv2d`` whose weight is parametrized by one :class:`Delta`, without an effective-weight copy.

Through the parametrization alone, ``F.conv2d`` saves the effective weight ``base + delta`` (a tensor,
not a parameter) and the whole input for backward. Here, as for the Linear (``_DeltaLinear``), the
delta is folded into the base in place for the convolution and for the input gradient, and the base
entries are written back bit for bit right after, so no weight-sized buffer is kept.

A convolution whose kernel equals its stride, with no padding or dilation and one group (SAM's patch
embedding, a 1x1 projection such as SAM's neck.0), is a Linear over non-overlapping patches: row ``o``
of the weight seen as ``[out, in * kh * kw]`` multiplies the flattened patches. The gradient of an
entry at column ``c`` then needs only the patch values at ``c``, so when the selected entries share few
columns (``Delta.columns``) only those values are saved, ``[len(columns), B, H', W']``, instead of the
whole input. Any other convolution with one group (SAM's 3x3 neck.2) needs, for an entry of input
channel ``c``, only channel ``c`` of its input: when the selected entries lie in few channels
(``Delta.columns`` indexed by channel, ``column_group = kh * kw``) only ``x[:, channels]`` is saved. The rest
save their whole input, and still no weight copy. Either compact form obeys the Linear's rule
(``COMPACT_BELOW``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from medseg_peft.tuning.delta import Delta


def patch_like(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a Linear over non-overlapping patches: kernel == stride, no padding, no dilation, one group."""
    return (tuple(conv.stride) == tuple(conv.kernel_size) and not isinstance(conv.padding, str)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1)


def patch_columns(x: torch.Tensor, kernel: tuple[int, int], columns: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` (``[B, C, H, W]``) at the patch columns ``columns`` (indices into ``C * kh * kw``,
    the weight's flattened order): ``[len(columns), B, H // kh, W // kw]``. Only these values are copied;
    the patch grid is a view, and rows / columns past the last whole patch are left out, as the conv does."""
    kh, kw = kernel
    h, w = x.shape[2] // kh, x.shape[3] // kw
    grid = x[:, :, : h * kh, : w * kw].unflatten(3, (w, kw)).unflatten(2, (h, kh))  # [B, C, h, kh, w, kw]
    channel, offset = columns // (kh * kw), columns % (kh * kw)
    return grid[:, channel, :, offset // kw, :, offset % kw]


def prepare_conv(conv: nn.Conv2d, delta: Delta) -> None:
    """Index ``delta``'s columns the way ``conv``'s forward uses them: patch columns for a patch-like conv,
    input channels (runs of ``kh * kw`` columns) for another conv with one group."""
    if isinstance(delta, Delta):
        delta.group_columns(1 if patch_like(conv) or conv.groups != 1 else conv.kernel_size[0] * conv.kernel_size[1])


PATCHES, CHANNELS, DENSE = "patches", "channels", "dense"


def _mode(conv: nn.Conv2d, delta: Delta) -> str:
    if delta.columns is None:
        return DENSE
    if patch_like(conv) and delta.column_group == 1:
        return PATCHES
    if conv.groups == 1 and delta.column_group == conv.kernel_size[0] * conv.kernel_size[1]:
        return CHANNELS
    return DENSE


class _DeltaConv2d(torch.autograd.Function):
    """``F.conv2d(x, base + delta, bias, ...)``: the delta folded in place for the convolutions, the base held on
    ``ctx`` (its version counter moves with every fold), the dense weight gradient gathered at the selected
    entries. ``mode``: save the selected patch columns of ``x``, its selected channels, or ``x`` itself."""

    @staticmethod
    def forward(ctx, x, base, values, bias, delta: Delta, args: tuple, mode: str):
        device = x.device.type
        ctx.cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.delta, ctx.base, ctx.args, ctx.mode = delta, base, args, mode
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        if mode == PATCHES:
            kept = patch_columns(x, base.shape[2:], delta.columns)
        else:
            kept = x.index_select(1, delta.columns) if mode == CHANNELS else x
        ctx.save_for_backward(kept if ctx.cast is None else kept.to(ctx.cast), values)
        with delta.effective(base, values, ctx.cast or x.dtype) as weight:
            return F.conv2d(x, weight, bias, *args)

    @staticmethod
    def backward(ctx, grad):
        kept, values = ctx.saved_tensors
        delta, base = ctx.delta, ctx.base
        gx = gv = gb = None
        if ctx.needs_input_grad[0]:
            with delta.effective(base, values, grad.dtype) as weight:
                gx = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad, *ctx.args).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            kept = kept.to(grad.dtype)
            if ctx.mode == PATCHES:  # [out, columns]: grad [B, out, H', W'] against the kept [columns, B, H', W']
                gv = delta.gather_columns(torch.tensordot(grad, kept, dims=([0, 2, 3], [1, 2, 3])))
            elif ctx.mode == CHANNELS:  # [out, channels, kh, kw]
                shape = (base.shape[0], kept.shape[1], *base.shape[2:])
                gv = delta.gather_columns(torch.nn.grad.conv2d_weight(kept, shape, grad, *ctx.args).reshape(shape[0], -1))
            else:
                gv = delta.gather(torch.nn.grad.conv2d_weight(kept, base.shape, grad, *ctx.args))
            gv = gv.to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad.sum((0, 2, 3))
        return gx, None, gv, gb, None, None, None


def delta_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Forward of an ``nn.Conv2d`` whose weight is parametrized by one :class:`Delta`; the parametrization's
    plain path for what this does not cover (string padding, a non-zeros padding mode, an unbatched input)."""
    chain = self.parametrizations["weight"]
    if (len(chain) != 1 or not isinstance(chain[0], Delta) or parametrize._cache_enabled or x.dim() != 4
            or isinstance(self.padding, str) or self.padding_mode != "zeros"):
        return nn.Conv2d.forward(self, x)
    delta = chain[0]
    args = (tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
    return _DeltaConv2d.apply(x, chain.original, delta.values, self.bias, delta, args, _mode(self, delta))


__all__ = ["delta_conv_forward", "patch_columns", "patch_like", "prepare_conv"]
