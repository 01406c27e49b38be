"""Full fine-tuning, the baseline every selection method is compared against, behind the same interface.

Its selection is every parameter, whole; ``apply`` simply unfreezes the model instead of attaching
dense deltas, so the baseline costs what plain full fine-tuning costs (no base copy, no
parametrization) and tables compare against the real thing.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from medseg_peft.entries import WHOLE, Entries, Selection
from medseg_peft.selection.base import Selector, settings_dataclass


@settings_dataclass
class Full(Selector):
    """Train every parameter (no selection); ``batches`` are accepted and ignored."""

    method = "full"

    def build(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        entries = {n: Entries(WHOLE, tuple(p.shape)) for n, p in model.named_parameters()}
        return Selection(entries, sum(p.numel() for p in model.parameters()), self.method, self.hparams())

    def apply(self, model: nn.Module, selection: Selection) -> nn.Module:
        selection.check_model(dict(model.named_parameters()))
        for name, p in model.named_parameters():
            p.requires_grad_(name in selection)
        return model
