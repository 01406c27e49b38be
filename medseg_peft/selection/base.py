"""What every selection method shares: "select then attach", roles, seeding, ranks agreeing.

Two base classes, so that a method implements only what it does:

- :class:`Selector`: ``select(model, batches) -> Selection`` and ``apply``. A method that chooses
  without scoring entries (full fine-tuning, LoRA, partial fine-tuning) implements :meth:`Selector.build`.
- :class:`ScoredSelector`: a method that scores entries implements :meth:`ScoredSelector.statistics`
  (additive over batches, so ranks can sum them) and, when the score is not the statistic itself,
  :meth:`ScoredSelector.scores`; the per-row top-K choice, the whole-tensor roles, the cross-rank sum and
  the counting are common. A method that chooses differently (a global budget) overrides ``choose``.

Every subclass that names its ``method`` is registered in ``METHODS`` on import, so a new method is
one new module (and a bundle layer whose ``_target_`` is its class).
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


METHODS: dict[str, type["Selector"]] = {}


class Selector:
    """Base class: ``select(model, batches) -> Selection``; calling it also attaches the deltas.

    Under ``torch.distributed`` every rank must call ``select`` (with its own share of the batches);
    the selection is checked to be identical on every rank before it is returned.
    """

    method = "selector"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "method" in vars(cls):
            METHODS[cls.method] = cls

    def __init__(self, *, seed: int | None = 0):
        self.seed = seed

    # ---- what a method provides -----------------------------------------------------------------
    def build(self, model: nn.Module, batches: Iterable) -> Selection:
        """The method's choice on the base ``model``."""
        raise NotImplementedError

    def hparams(self) -> dict:
        """The settings that reproduce this selection; saved with it."""
        return {"seed": self.seed}

    # ---- the shared life cycle -------------------------------------------------------------------
    def select(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        from medseg_peft.distributed import check_same_on_every_rank
        from medseg_peft.tuning.attach import is_attached

        if is_attached(model):
            raise ValueError("select() needs the base model; this one already has attached deltas")
        selection = self.build(model, batches)
        check_same_on_every_rank(selection.digest(), f"the {self.method} selection")
        return selection

    def apply(self, model: nn.Module, selection: Selection) -> nn.Module:
        """Make ``selection`` trainable on ``model``: attach its deltas (a method may train otherwise)."""
        from medseg_peft.tuning.attach import attach

        return attach(model, selection)

    def __call__(self, model: nn.Module, batches: Iterable = ()) -> nn.Module:
        """Select on ``batches``, make the selection trainable and return ``model`` ready to train."""
        selection = self.select(model, batches)
        log.info("%s", selection.summary())
        return self.apply(model, selection)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


class ScoredSelector(Selector):
    """A method that scores entries from data, then chooses; by default the top-K per output row.

    Args:
        k: trainable entries per output row of every selected weight matrix.
        eligibility: a preset name (``"vit"``, ``"sam"``), ``"auto"`` (``"sam"`` when the model has an
            ``image_encoder``, else ``"vit"``) or a list of rules (see ``selection.eligibility``).
        max_batches: use at most this many batches from ``batches`` (``None``: all of them).
        seed: RNG seed for anything random during scoring (dropout, augmentation).
    """

    def __init__(self, k: int = 1, *, eligibility: str | Sequence[Mapping] = "auto", max_batches: int | None = None, seed: int | None = 0):
        super().__init__(seed=seed)
        self.k = check_k(k)
        self.eligibility = eligibility
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        self.max_batches = max_batches

    # ---- what a method provides -----------------------------------------------------------------
    def statistics(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sums over the selection batches (so that the sums of several ranks add up to the sum over
        all their batches); the only thing computed from data."""
        raise NotImplementedError

    def scores(self, model: nn.Module, stats: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, score)`` for each selectable parameter, score shaped like the parameter.
        Default: the statistic named like the parameter is its score."""
        return ((n, stats[n]) for n in selectable)

    def rules(self, model: nn.Module) -> str | Sequence[Mapping]:
        """The eligibility rules this method applies to ``model``."""
        return self.eligibility

    def hparams(self) -> dict:
        return {"k": self.k, "eligibility": self.eligibility, "max_batches": self.max_batches, "seed": self.seed}

    def choose(self, scored: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entries]:
        """Default rule: top-K per output row, one tensor at a time (no score matrix outlives its choice)."""
        return {name: topk_per_row(score, self.k, name) for name, score in scored}

    # ---- shared ---------------------------------------------------------------------------------
    def check_selectable(self, params: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> None:
        for name in selectable:
            p = params[name]
            if p.ndim >= 2 and self.k > p[0].numel():
                raise ValueError(f"k={self.k} is larger than the {p[0].numel()} entries per row of {name} {tuple(p.shape)}")

    def build(self, model: nn.Module, batches: Iterable) -> Selection:
        from medseg_peft.distributed import all_reduce_sum

        roles = assign_roles(model, self.rules(model))
        selectable = [n for n, r in roles.items() if r == SELECT]
        self.check_selectable(dict(model.named_parameters()), selectable)
        with seeded(self.seed, model_device(model)):
            stats = all_reduce_sum(self.statistics(model, batches, selectable))
            chosen = self.choose(self.scores(model, stats, selectable))
        entries: dict[str, Entries] = {}
        total = 0
        for name, p in model.named_parameters():
            total += p.numel()
            if roles[name] == TRAIN:
                entries[name] = Entries(WHOLE, tuple(p.shape))
            elif name in chosen:
                entries[name] = chosen[name]
        return Selection(entries, total, self.method, self.hparams())
