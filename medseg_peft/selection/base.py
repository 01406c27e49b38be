"""What every selection method shares: roles, seeding, choosing, and "select then attach".

A method subclasses :class:`Selector` and implements :meth:`Selector.scores`, which yields a score
tensor per selectable parameter; the per-row top-K choice, the whole-tensor roles, the counting and
the attach step are common. A method that chooses differently (a global budget, whole layers)
overrides :meth:`Selector.choose`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from medseg_peft.selection.eligibility import SELECT, TRAIN, assign_roles
from medseg_peft.selection.rules import check_k, topk_per_row
from medseg_peft.selection.selection import WHOLE, Entries, Selection

log = logging.getLogger("medseg_peft")


@contextmanager
def seeded(seed: int | None, device: torch.device):
    """Run with a fixed RNG state (CPU and the model's CUDA device), restoring the caller's afterwards."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def gradients_for(model: nn.Module, names: Sequence[str], train_mode: bool):
    """Only ``names`` require grad (no gradient memory for the rest), ``.grad`` cleared, the given mode;
    the model's flags, gradients and mode are restored afterwards. Yields ``{name: parameter}``."""
    params = dict(model.named_parameters())
    wanted = set(names)
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    was_training = model.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
            p.grad = None
        model.train(train_mode)
        yield params
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Selector:
    """Base class: ``select(model, batches) -> Selection``; calling it also attaches the deltas.

    Args:
        k: trainable entries per output row of every selected weight matrix.
        eligibility: a preset name (``"vit"``, ``"sam"``), ``"auto"`` (``"sam"`` when the model has an
            ``image_encoder``, else ``"vit"``) or a list of rules (see ``selection.eligibility``).
        max_batches: use at most this many batches from ``batches`` (``None``: all of them).
        seed: RNG seed for anything random during scoring (dropout, augmentation).
    """

    method = "selector"

    def __init__(self, k: int = 1, *, eligibility: str | Sequence[Mapping] = "auto", max_batches: int | None = None, seed: int | None = 0):
        self.k = check_k(k)
        self.eligibility = eligibility
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches <= 0):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        self.max_batches = max_batches
        self.seed = seed

    # ---- what a method provides -----------------------------------------------------------------
    def scores(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, score)`` for each selectable parameter, score shaped like the parameter."""
        raise NotImplementedError

    def hparams(self) -> dict:
        """The settings that reproduce this selection; saved with it."""
        return {"k": self.k, "eligibility": self.eligibility, "max_batches": self.max_batches, "seed": self.seed}

    def choose(self, scored: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entries]:
        """Default rule: top-K per output row, one tensor at a time (no score matrix outlives its choice)."""
        return {name: topk_per_row(score, self.k, name) for name, score in scored}

    # ---- the shared life cycle -------------------------------------------------------------------
    def select(self, model: nn.Module, batches: Iterable) -> Selection:
        from medseg_peft.tuning.attach import is_attached

        if is_attached(model):
            raise ValueError("select() needs the base model; this one already has attached deltas")
        roles = assign_roles(model, self.eligibility)
        selectable = [n for n, r in roles.items() if r == SELECT]
        for name, p in model.named_parameters():
            if name in selectable and p.ndim >= 2 and self.k > p[0].numel():
                raise ValueError(f"k={self.k} is larger than the {p[0].numel()} entries per row of {name} {tuple(p.shape)}")
        with seeded(self.seed, model_device(model)):
            chosen = self.choose(self.scores(model, batches, selectable))
        entries: dict[str, Entries] = {}
        total = 0
        for name, p in model.named_parameters():
            total += p.numel()
            if roles[name] == TRAIN:
                entries[name] = Entries(WHOLE, tuple(p.shape))
            elif name in chosen:
                entries[name] = chosen[name]
        return Selection(entries, total, self.method, self.hparams())

    def apply(self, model: nn.Module, selection: Selection) -> nn.Module:
        """Make ``selection`` trainable on ``model``: attach its deltas (a method may train otherwise)."""
        from medseg_peft.tuning.attach import attach

        return attach(model, selection)

    def __call__(self, model: nn.Module, batches: Iterable) -> nn.Module:
        """Select on ``batches``, make the selection trainable and return ``model`` ready to train."""
        selection = self.select(model, batches)
        log.info("%s", selection.summary())
        return self.apply(model, selection)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"
