"""Learning-rate schedules: linear warm-up then cosine decay per iteration (the segmentation bundles), and
timm's per-epoch cosine as the GPS / SPT classification scripts run it."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` scaling the base lr from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)

    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def timm_epoch_cosine(optimizer: torch.optim.Optimizer, iterations_per_epoch: int, epochs: int, warmup_epochs: int,
                      warmup_lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of the GPS and SPT training scripts: timm's ``CosineLRScheduler`` stepped once per epoch
    (FightingFighting/GPS train_gps.py; ziplab/SPT train_spt.py): a linear warm-up from ``warmup_lr``
    over ``warmup_epochs``, a cosine from the base lr to ``min_lr`` over ``epochs`` (counted from epoch 0,
    the warm-up included, timm's ``warmup_prefix=False``), then ``min_lr`` for the cool-down epochs. The lr
    is constant within an epoch. The values come from timm itself, wrapped so that the bundles' per-iteration
    scheduler handler can step it.
    """
    from timm.scheduler import CosineLRScheduler

    base = optimizer.param_groups[0]["lr"]
    shadow = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)  # timm writes into its optimizer: not ours
    curve = CosineLRScheduler(shadow, t_initial=int(epochs), lr_min=float(min_lr), warmup_t=int(warmup_epochs),
                              warmup_lr_init=float(warmup_lr), cycle_limit=1, t_in_epochs=True)
    per_epoch: dict[int, float] = {}
    n = max(int(iterations_per_epoch), 1)

    def scale(step: int) -> float:
        epoch = step // n
        if epoch not in per_epoch:
            curve.step(epoch)  # timm's public interface: it writes the epoch's lr into the shadow optimizer
            per_epoch[epoch] = shadow.param_groups[0]["lr"] / base
        return per_epoch[epoch]

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
