"""What every selection method shares: "select then attach", roles, seeding, ranks agreeing.

Two base classes, so that a method implements only what it does:

- :class:`Selector`: ``select(model, batches) -> Selection`` and ``apply``. A method that chooses
  without scoring entries (full fine-tuning, LoRA, partial fine-tuning) implements :meth:`Selector.build`.
- :class:`ScoredSelector`: a method that scores entries implements :meth:`ScoredSelector.statistics`
  (additive over batches, so ranks can sum them) and, when the score is not the statistic itself,
  :meth:`ScoredSelector.scores`; the whole-tensor roles, the cross-rank sum and the counting are
  common. :class:`TopKSelector` adds GPS's choosing rule (top-K per output row); a method that
  chooses differently (SPT's global budget) implements ``choose``.

Settings are dataclass fields (``settings_dataclass``): one list gives the constructor, the checks in
``__post_init__``, the saved ``hparams()`` and the error for a setting a method does not take.

Every subclass that names its ``method`` is registered in ``METHODS`` on import, so a new method is
one new module (and a bundle layer whose ``_target_`` is its class).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from medseg_peft.distributed import all_reduce_sum, check_same_on_every_rank
from medseg_peft.entries import WHOLE, Entries, Selection
from medseg_peft.selection.eligibility import SELECT, TRAIN, assign_roles
from medseg_peft.selection.rules import check_k, topk_per_row
from medseg_peft.tuning.attach import attach, is_attached

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

settings_dataclass = dataclass(eq=False, repr=False)
"""How every method is declared: its settings are dataclass fields (so ``__init__``, validation in
``__post_init__``, the saved ``hparams()`` and a strict keyword check come from one list); selectors
compare by identity and print through ``hparams``."""

NOT_SAVED = {"hparam": False}  # field metadata: a setting that is code (a function), not saved with the selection


@settings_dataclass
class Selector:
    """Base class: ``select(model, batches) -> Selection``; calling it also attaches the deltas.

    Under ``torch.distributed`` every rank must call ``select`` (with its own share of the batches);
    the selection is checked to be identical on every rank before it is returned.

    Args:
        seed: RNG seed for anything random while selecting (dropout, augmentation, initialisation).
    """

    method: ClassVar[str] = "selector"
    seed: int | None = field(default=0, kw_only=True)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "method" in vars(cls):
            METHODS[cls.method] = cls

    def __post_init__(self) -> None:
        """Validate the settings (each method adds its own checks)."""

    # ---- what a method provides -----------------------------------------------------------------
    def build(self, model: nn.Module, batches: Iterable) -> Selection:
        """The method's choice on the base ``model``."""
        raise NotImplementedError

    def hparams(self) -> dict:
        """The settings that reproduce this selection (every dataclass field; a callable by its name); saved with it."""
        out = {}
        for f in fields(self):
            if f.metadata.get("hparam", True):
                value = getattr(self, f.name)
                out[f.name] = getattr(value, "__name__", type(value).__name__) if callable(value) else value
        return out

    # ---- the shared life cycle -------------------------------------------------------------------
    def select(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        if is_attached(model):
            raise ValueError("select() needs the base model; this one already has attached deltas")
        selection = self.build(model, batches)
        check_same_on_every_rank(selection.digest(), f"the {self.method} selection")
        return selection

    def apply(self, model: nn.Module, selection: Selection) -> nn.Module:
        """Make ``selection`` trainable on ``model``: attach its deltas (a method may train otherwise)."""
        return attach(model, selection)

    def __call__(self, model: nn.Module, batches: Iterable = ()) -> nn.Module:
        """Select on ``batches``, make the selection trainable and return ``model`` ready to train."""
        selection = self.select(model, batches)
        log.info("%s", selection.summary())
        return self.apply(model, selection)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"


def check_max_batches(max_batches: int | None) -> None:
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches <= 0):
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")


@settings_dataclass
class ScoredSelector(Selector):
    """A method that scores entries from data (:meth:`statistics`, :meth:`scores`), then chooses (:meth:`choose`).

    Args:
        eligibility: a preset name (``"vit"``, ``"sam"``, ``"sam_tiny_vit"``), ``"auto"`` (``"sam_tiny_vit"``
            for a SAM with a TinyViT encoder, ``"sam"`` for any other model with an ``image_encoder``, else
            ``"vit"``) or a list of rules (see ``selection.eligibility``).
        max_batches: use at most this many batches from ``batches`` (``None``: all of them).
    """

    eligibility: str | Sequence[Mapping] = field(default="auto", kw_only=True)
    max_batches: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_max_batches(self.max_batches)

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

    def choose(self, scored: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entries]:
        """The choosing rule: ``{name: Entries}`` from ``(name, score)`` pairs."""
        raise NotImplementedError

    def check_selectable(self, params: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> None:
        """Refuse settings that cannot work on these parameters, before any data is read."""

    # ---- shared ---------------------------------------------------------------------------------

    def build(self, model: nn.Module, batches: Iterable) -> Selection:
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


@settings_dataclass
class TopKSelector(ScoredSelector):
    """Scored, then the top-K entries of every output row (GPS's rule; FPS and random use it too).

    Args:
        k: trainable entries per output row of every selected weight matrix.
    """

    k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.k = check_k(self.k)

    def check_selectable(self, params: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> None:
        short = [name for name in selectable if params[name].ndim >= 2 and self.k > params[name][0].numel()]
        if short:
            log.info("k=%d exceeds the entries per row of %d tensor(s), trained whole: %s%s", self.k, len(short),
                     ", ".join(short[:3]), " ..." if len(short) > 3 else "")

    def choose(self, scored: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entries]:
        """Top-K per output row, one tensor at a time (no score matrix outlives its choice)."""
        return {name: topk_per_row(score, self.k, name) for name, score in scored}
