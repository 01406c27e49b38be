"""Supervised contrastive loss (Khosla et al. 2020), the objective GPS scores gradients with.

Reference settings (FightingFighting/GPS ``utils/loss_utils.py``): L2-normalised features, every view
an anchor (``contrast_mode='all'``), positives = every other sample of the same label including the
other views of the same image, self-contrast excluded, temperature = base temperature = 0.07, mean
over anchors. Without labels it is SimCLR's loss (the only positives are the other views).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.07, base_temperature: float = 0.07) -> torch.Tensor:
    """``features``: ``[batch, views, dim]``; ``labels``: ``[batch]`` class ids or ``None``."""
    if features.ndim != 3:
        raise ValueError(f"supcon_loss wants features [batch, views, dim], got shape {tuple(features.shape)}")
    batch, views, _ = features.shape
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(views * batch, -1)  # view-major
    ids = torch.arange(batch, device=z.device) if labels is None else labels.reshape(-1).to(z.device)
    if ids.numel() != batch:
        raise ValueError(f"supcon_loss got {ids.numel()} labels for {batch} samples")
    ids = ids.repeat(views)
    logits = z @ z.t() / temperature
    not_self = ~torch.eye(views * batch, dtype=torch.bool, device=z.device)
    logits = logits - logits.masked_fill(~not_self, float("-inf")).max(dim=1, keepdim=True).values.detach()
    positives = (ids[:, None] == ids[None, :]) & not_self
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_denominator
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1).clamp_min(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()
