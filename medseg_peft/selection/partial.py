"""Partial fine-tuning (Ye et al., arXiv 2312.15681): whole layers trained, everything else frozen.

Layers are chosen by a hand-written strategy or by the fine-tuned angle metric: fine-tune all weights
briefly on the selection batches, measure per unit (the attention and the MLP of each block) the angle
``arccos(cos(w_before, w_after))`` over the unit's weights, restore the model bit for bit, and keep the
N units that turned most (``order="smallest"`` keeps the least-turned). The paper's exact eight
strategies and probe length are not public (methods.md section 5); the names here cover its
attention-only / FFN-only / first-half / last-half families, plus ``last_blocks:N`` and ``norm_bias``.

A unit is every parameter under ``blocks.N.attn.`` or ``blocks.N.mlp.`` (timm ViT and SAM's image
encoder alike; for SAM that includes the relative-position tables, which belong to its attention).
With ``train_head`` the parts every method here trains whole are trained too: a classifier head, or
SAM's prompt encoder and mask decoder.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.data.batches import iter_batches
from medseg_peft.selection.base import Selector, model_device
from medseg_peft.selection.selection import WHOLE, Entries, Selection

log = logging.getLogger("medseg_peft")

UNIT = re.compile(r"(^|\.)blocks\.(\d+)\.(attn|mlp)\.")
STRATEGIES = ("attn", "ffn", "attn_first_half", "attn_last_half", "ffn_first_half", "ffn_last_half", "last_blocks:N", "norm_bias")


def units_of(model: nn.Module) -> dict[tuple[int, str], list[str]]:
    """``{(block, "attn" | "mlp"): [parameter names]}`` in block order."""
    units: dict[tuple[int, str], list[str]] = {}
    for name, _ in model.named_parameters():
        m = UNIT.search(name)
        if m:
            units.setdefault((int(m.group(2)), m.group(3)), []).append(name)
    return dict(sorted(units.items()))


def always_trained(model: nn.Module) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if any(re.search(r"(^|\.)image_encoder\.", n) for n in names):
        return [n for n in names if not re.search(r"(^|\.)image_encoder\.", n)]
    return [n for n in names if re.search(r"(^|\.)head\.", n)]


def strategy_names(model: nn.Module, strategy: str | Sequence[str]) -> list[str]:
    """The parameter names a manual strategy trains (head / decoder not included)."""
    names = [n for n, _ in model.named_parameters()]
    if not isinstance(strategy, str):
        picked = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in strategy)]
        if not picked:
            raise ValueError(f"partial strategy globs {list(strategy)} match no parameter (names look like {names[:3]})")
        return picked
    units = units_of(model)
    blocks = sorted({b for b, _ in units})
    half = len(blocks) // 2
    kind = {"attn": "attn", "ffn": "mlp"}
    if strategy in ("attn", "ffn"):
        keep = {(b, kind[strategy]) for b in blocks}
    elif re.fullmatch(r"(attn|ffn)_(first|last)_half", strategy):
        part, side = strategy.split("_")[0], strategy.split("_")[1]
        chosen = blocks[:half] if side == "first" else blocks[half:]
        keep = {(b, kind[part]) for b in chosen}
    elif m := re.fullmatch(r"last_blocks:(\d+)", strategy):
        n = int(m.group(1))
        if n <= 0 or n > len(blocks):
            raise ValueError(f"partial strategy {strategy!r}: the model has {len(blocks)} blocks")
        tail = set(blocks[-n:])
        picked = [x for x in names if (m2 := re.search(r"(^|\.)blocks\.(\d+)\.", x)) and int(m2.group(2)) in tail]
        return picked
    elif strategy == "norm_bias":
        return [n for n in names if re.search(r"norm", n) or n.endswith(".bias")]
    else:
        raise ValueError(f"unknown partial strategy {strategy!r}; known: {list(STRATEGIES)} or a list of globs")
    picked = [x for unit in keep for x in units.get(unit, [])]
    if not picked:
        raise ValueError(f"partial strategy {strategy!r} matches no parameter of this {type(model).__name__} (no blocks.N.attn/mlp)")
    return picked


def angle(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    a = torch.cat([t.detach().double().reshape(-1) for t in before])
    b = torch.cat([t.detach().double().reshape(-1) for t in after])
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))
    return math.acos(max(-1.0, min(1.0, cos)))


class Partial(Selector):
    """Whole layers: a manual ``strategy`` or the ``angle_top`` units that turned most in a short probe."""

    method = "partial"

    def __init__(
        self,
        strategy: str | Sequence[str] | None = None,
        angle_top: int | None = None,
        *,
        order: str = "largest",
        probe_steps: int = 20,
        probe_lr: float = 1e-3,
        loss: str | Callable = "ce",
        train_head: bool = True,
        max_batches: int | None = None,
        seed: int | None = 0,
    ):
        super().__init__(1, max_batches=max_batches, seed=seed)
        if (strategy is None) == (angle_top is None):
            raise ValueError("Partial needs exactly one of strategy= (a name or globs) and angle_top= (a number of units)")
        if angle_top is not None and (not isinstance(angle_top, int) or angle_top <= 0):
            raise ValueError(f"angle_top must be a positive integer, got {angle_top!r}")
        if order not in ("largest", "smallest"):
            raise ValueError(f"order must be 'largest' or 'smallest', got {order!r}")
        self.strategy, self.angle_top, self.order = strategy, angle_top, order
        self.probe_steps, self.probe_lr, self.loss, self.train_head = probe_steps, probe_lr, loss, train_head
        self.angles: dict[str, float] = {}

    def hparams(self) -> dict:
        strategy = self.strategy if isinstance(self.strategy, (str, type(None))) else list(self.strategy)
        return {"strategy": strategy, "angle_top": self.angle_top, "order": self.order, "probe_steps": self.probe_steps,
                "probe_lr": self.probe_lr, "train_head": self.train_head, "seed": self.seed}

    def scores(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def select(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        from medseg_peft.selection.base import seeded

        if self.strategy is not None:
            names = strategy_names(model, self.strategy)
        else:
            with seeded(self.seed, model_device(model)):
                names = self._angle_units(model, batches)
        if self.train_head:
            names = names + [n for n in always_trained(model) if n not in names]
        params = dict(model.named_parameters())
        entries = {n: Entries(WHOLE, tuple(p.shape)) for n, p in params.items() if n in set(names)}
        return Selection(entries, sum(p.numel() for p in params.values()), self.method, self.hparams())

    def _angle_units(self, model: nn.Module, batches: Iterable) -> list[str]:
        units = units_of(model)
        if not units:
            raise ValueError(f"the angle probe finds no blocks.N.attn / blocks.N.mlp units in this {type(model).__name__}")
        if self.angle_top > len(units):
            raise ValueError(f"angle_top={self.angle_top} but the model has only {len(units)} units")
        probe = copy.deepcopy(model)  # the probe trains a copy: the model itself is never written
        for p in probe.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(probe.parameters(), lr=self.probe_lr)
        probe.train()
        data = list(iter_batches(batches, model_device(model), self.max_batches))
        for step in range(self.probe_steps):
            x, y = data[step % len(data)]
            if y is None:
                raise ValueError("the angle probe fine-tunes on the selection batches and needs their targets")
            out = probe(x)
            loss = F.cross_entropy(out, y) if self.loss == "ce" else self.loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        before, after = dict(model.named_parameters()), dict(probe.named_parameters())
        self.angles = {f"block {b} {kind}": angle([before[n] for n in ns], [after[n] for n in ns]) for (b, kind), ns in units.items()}
        ranked = sorted(zip(self.angles, units.values()), key=lambda t: self.angles[t[0]], reverse=self.order == "largest")
        log.info("fine-tuned angle per unit (degrees):\n%s", "\n".join(f"  {k:16s} {math.degrees(v):8.4f}" for k, v in self.angles.items()))
        return [n for _, ns in ranked[: self.angle_top] for n in ns]
