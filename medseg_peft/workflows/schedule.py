"""Learning-rate schedule: linear warm-up, then cosine decay, stepped every iteration."""

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
