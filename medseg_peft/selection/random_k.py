"""Random selection: K entries per output row drawn at random, the control every selection method must beat.

GPS reports it as the baseline that isolates the value of *choosing* (arXiv 2312.10136, ablation of
the selection criterion): the same number of trainable entries in the same places (per row, the same
eligibility), but no look at the data. It needs no batches, and the draw depends only on ``seed``,
so every rank of a multi-GPU run draws the same entries without exchanging anything.

This module is also the worked example of adding a method: a ``TopKSelector`` subclass with a
``method`` name (which registers it in ``METHODS``), and a bundle layer ``bundles/methods/random.json``
whose ``"selector"`` names this class. Nothing else in the package changes.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from medseg_peft.selection.base import TopKSelector, settings_dataclass


@settings_dataclass
class RandomK(TopKSelector):
    """K entries per output row at random (uniform scores, top-K per row); reproducible from ``seed``.

    Args:
        k, eligibility, seed: see :class:`~medseg_peft.selection.base.TopKSelector`; ``batches`` are ignored.
    """

    method = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"random selection needs an integer seed (it is the whole selection), got {self.seed!r}")

    def statistics(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> dict[str, torch.Tensor]:
        return {}  # nothing is learnt from data

    def scores(self, model: nn.Module, stats: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        params = dict(model.named_parameters())
        g = torch.Generator().manual_seed(self.seed)  # on the CPU: the same draw on every device and rank
        for name in selectable:
            yield name, torch.rand(params[name].shape, generator=g)
