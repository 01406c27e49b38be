"""FPS: forward-only parameter selection (Yang, Wei, Lin, arXiv 2510.27359).

Score of weight ``W[j, k]`` = ``|W[j, k]| * E|x_k|``, where ``x_k`` is input feature ``k`` of the
layer, averaged over every sample and token of the selection batches. Because ``|W|`` does not
depend on the data, the expectation factorises: one forward pass under ``torch.no_grad`` that keeps
a single running vector per layer (sum of ``|x|`` per input feature, and a count) is all the data
work; no backward runs and no weight gradient is ever allocated. The choice is then GPS's: top-K per
output row, so FPS and GPS tune the same number of entries at the same K.

Choices the paper leaves open, as parameters with the inferred reference default
(the paper, Yang, Wei, Lin, arXiv 2510.27359, has no public code): L1 mean of ``|x|`` over all tokens (not an L2 norm,
not CLS only); conv weights scored on their unfolded input ``[in * kh * kw]``, so each kernel tap
has its own activation mean; eval mode (no dropout / drop-path) for a deterministic score.
"""

from __future__ import annotations

import logging
from dataclasses import field
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.entries import row_view_shape
from medseg_peft.selection.base import TopKSelector, model_device, settings_dataclass
from medseg_peft.selection.batches import call_model, iter_batches

log = logging.getLogger("medseg_peft")

_SCORED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _InputSums:
    """Running sum of ``|input feature|`` of one layer, and how many feature vectors it saw: all FPS
    keeps per layer. Sums are float64, so a sum over ranks equals the sum over all batches to within
    rounding far below the float32 scores."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if isinstance(module, nn.Linear):
            feats = x.reshape(-1, x.shape[-1])
        elif isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and module.padding_mode == "zeros":
            cols = F.unfold(x if x.ndim == 4 else x.unsqueeze(0), module.kernel_size, module.dilation, module.padding, module.stride)
            feats = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B*L, C*kh*kw]
        else:  # other convs: per input channel, the same mean for every kernel tap
            c = module.in_channels
            per_channel = x.transpose(0, 1).reshape(c, -1) if x.ndim == module.weight.ndim else x.reshape(c, -1)
            taps = module.weight[0, 0].numel()
            feats = per_channel.t().repeat_interleave(taps, dim=1)
        part = feats.abs().sum(0, dtype=torch.float32).double()  # 5x faster on CPU than linalg.vector_norm(ord=1)
        self.sum = part if self.sum is None else self.sum + part
        self.count += feats.shape[0]


COUNT = "count:"  # statistics key prefix of a layer's feature count, beside its sum (keyed by the weight's name)


@settings_dataclass
class FPS(TopKSelector):
    """Forward-only selection: ``|W| * mean |x|``, top-K per output row.

    Args:
        k: entries per output row (``k=1`` gives GPS's 0.2 % of a ViT-B).
        train_mode: score with the model in train mode (dropout active); default eval mode.
        eligibility, max_batches, seed: see :class:`~medseg_peft.selection.base.ScoredSelector`.
    """

    method = "fps"
    train_mode: bool = field(default=False, kw_only=True)

    def statistics(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> dict[str, torch.Tensor]:
        consumers: dict[str, _InputSums] = {}
        for mname, module in model.named_modules():
            wname = f"{mname}.weight" if mname else "weight"
            if isinstance(module, _SCORED_MODULES) and wname in selectable and wname not in consumers:
                consumers[wname] = _InputSums(module)
        handles = [c.module.register_forward_pre_hook(c) for c in consumers.values()]
        was_training = model.training
        model.train(self.train_mode)
        try:
            with torch.no_grad():
                for x, _ in iter_batches(batches, model_device(model), self.max_batches):
                    call_model(model, x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        stats: dict[str, torch.Tensor] = {}
        for name, c in consumers.items():
            if c.sum is not None:
                stats[name] = c.sum
                stats[COUNT + name] = torch.tensor(float(c.count), dtype=torch.float64, device=c.sum.device)
        return stats

    def scores(self, model: nn.Module, stats: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        for name in selectable:
            w = params[name].detach()
            if name not in stats:
                log.warning("FPS: %s saw no input during the forward pass (not a Linear/Conv weight, or unused); scoring it by |W| alone", name)
                yield name, w.abs()
                continue
            means = (stats[name] / stats[COUNT + name]).float()
            rows, cols = row_view_shape(tuple(w.shape))
            groups = getattr(modules[name.rpartition(".")[0]], "groups", 1)
            per_group = means.reshape(groups, cols)  # group g's input features feed rows of group g
            act = per_group.repeat_interleave(rows // groups, dim=0)
            yield name, (w.reshape(rows, cols).abs().float() * act).reshape(w.shape)
