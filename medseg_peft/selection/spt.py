"""SPT: sensitivity-aware parameter-efficient tuning (He et al., ICCV 2023; ziplab/SPT).

Sensitivity of a weight = the sum over selection batches of its squared batch-loss gradient
(first-order Taylor), in fp32, task loss by default. Then one global budget over every eligible
entry: matrices (attention / MLP weights) and vectors (norms, biases) compete together. Of the global
top-N, a matrix holding at least ``cost / alpha`` selected entries gets a low-rank branch of rank
``rank`` instead (cost ``rank * (in + out)``), otherwise exactly its selected entries are tuned; a
vector holding at least ``len / beta`` selected entries is tuned whole. The budget counts what is
actually trained (sparse + structured + whole vectors); N is chosen so that this total is the closest
to the requested budget (the reference sweeps N in coarse steps; here a bisection over every N, which
gives the closest total exactly, ties going to the larger N as the reference's ``<=`` does).

Open choices, reference defaults: ``alpha=10``, ``beta=5``, ``rank=8``, train mode while scoring.
With ``structured="adapter"`` a matrix gets a bottleneck adapter on its layer's output instead
(cost ``2 * rank * out + rank + out``); adapters stay modules and are not mergeable.
"""

from __future__ import annotations

from dataclasses import field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.data.batches import iter_batches
from medseg_peft.selection.base import ScoredSelector, gradients_for, model_device, settings_dataclass
from medseg_peft.selection.eligibility import FREEZE, SELECT, TRAIN, is_sam
from medseg_peft.selection.selection import ADAPTER, FLAT, LORA, WHOLE, Entries, row_view_shape

SPT_PRESETS: dict[str, list[dict]] = {
    # reference: head / cls_token trained whole; patch_embed / pos_embed frozen; block matrices and
    # every norm / bias vector eligible
    "spt_vit": [
        {"match": r"(^|\.)head\.|cls_token", "role": TRAIN},
        {"match": r"patch_embed|pos_embed", "role": FREEZE},
        {"match": r"(^|\.)blocks\.\d+\.(attn|mlp)\.\w+\.weight$", "min_ndim": 2, "role": SELECT},
        {"match": r"norm|bias", "max_ndim": 1, "role": SELECT},
        {"role": FREEZE},
    ],
    # SAM: the image encoder's equivalents; prompt encoder and mask decoder trained whole
    "spt_sam": [
        {"exclude": r"(^|\.)image_encoder\.", "role": TRAIN},
        {"match": r"patch_embed|pos|neck", "role": FREEZE},
        {"match": r"(^|\.)blocks\.\d+\.(attn|mlp)\.\w+\.weight$", "min_ndim": 2, "role": SELECT},
        {"match": r"norm|bias", "max_ndim": 1, "role": SELECT},
        {"role": FREEZE},
    ],
}


def lora_cost(shape: tuple[int, ...], rank: int) -> int:
    rows, cols = row_view_shape(shape)
    return rank * (rows + cols)


def adapter_cost(shape: tuple[int, ...], rank: int) -> int:
    out = row_view_shape(shape)[0]
    return 2 * rank * out + rank + out


STRUCTURED = {"lora": (LORA, lora_cost), "adapter": (ADAPTER, adapter_cost)}


def decide(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], rank: int, alpha: float, beta: float, cost_fn=lora_cost) -> tuple[dict[str, str], int]:
    """Per tensor "structured" / "sparse" / "whole" / "none" for the given selected counts, and the total trained."""
    kinds: dict[str, str] = {}
    total = 0
    for name, n in counts.items():
        shape = shapes[name]
        if n == 0:
            kinds[name] = "none"
        elif len(shape) >= 2:
            cost = cost_fn(shape, rank)
            kinds[name], add = ("structured", cost) if n >= cost / alpha else ("sparse", n)
            total += add
        else:
            length = shape[0]
            kinds[name], add = ("whole", length) if n >= length / beta else ("sparse", n)
            total += add
    return kinds, total


def _ranked_top(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest scores (plus any tied with the k-th) in the order a full stable
    descending sort would give them: ties go to the lower position."""
    if k >= flat.numel():
        return torch.sort(flat, descending=True, stable=True).indices
    threshold = torch.topk(flat, k).values[-1]
    candidates = torch.nonzero(flat >= threshold).flatten()
    return candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]


@settings_dataclass
class SPT(ScoredSelector):
    """Sensitivity-aware selection with a global budget and structured (LoRA) upgrades.

    Args:
        budget: total trainable count in the eligible part (sparse + structured + whole vectors).
        structured: ``"lora"`` (mergeable) or ``"adapter"`` (kept as a module).
        rank, alpha, beta: as in the reference (8, 10, 5).
        loss: ``"ce"`` or a callable ``(outputs, targets) -> loss`` (the task loss).
        eligibility: ``"auto"`` picks ``"spt_sam"`` for SAM models, else ``"spt_vit"``; or a rule list.
    """

    method = "spt"

    budget: int = 400_000
    structured: str = field(default="lora", kw_only=True)
    rank: int = field(default=8, kw_only=True)
    alpha: float = field(default=10, kw_only=True)
    beta: float = field(default=5, kw_only=True)
    loss: str | Callable = field(default="ce", kw_only=True)
    train_mode: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget <= 0:
            raise ValueError(f"SPT budget must be a positive integer (trainable parameters), got {self.budget!r}")
        if self.structured not in STRUCTURED:
            raise ValueError(f"SPT structured must be one of {sorted(STRUCTURED)}, got {self.structured!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"SPT rank must be a positive integer, got {self.rank!r}")
        if self.loss != "ce" and not callable(self.loss):
            raise ValueError(f"SPT loss must be 'ce' or a callable (outputs, targets) -> loss, got {self.loss!r}")

    def rules(self, model: nn.Module) -> str | Sequence[Mapping]:
        if self.eligibility == "auto":
            return SPT_PRESETS["spt_sam" if is_sam(model) else "spt_vit"]
        if isinstance(self.eligibility, str):
            return SPT_PRESETS.get(self.eligibility, self.eligibility)
        return self.eligibility

    def statistics(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per entry, the sum over batches of the squared batch-loss gradient (fp32)."""
        with gradients_for(model, selectable, self.train_mode) as params:
            sens = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in selectable}
            for x, y in iter_batches(batches, model_device(model), self.max_batches):
                out = model(x)
                if y is None:
                    raise ValueError("SPT needs targets in the selection batches (its sensitivity is a task-loss gradient)")
                loss = F.cross_entropy(out, y) if self.loss == "ce" else self.loss(out, y)
                grads = torch.autograd.grad(loss, [params[n] for n in selectable], allow_unused=True)
                for n, g in zip(selectable, grads):
                    if g is not None:
                        sens[n] += g.float() ** 2
        return sens

    def _closest_n(self, ranked_owner: torch.Tensor, names: list[str], shapes: dict) -> int:
        """The n (within the ranked prefix) whose trained total is closest to the budget; ties to the larger n."""
        by_tensor = torch.argsort(ranked_owner, stable=True)
        ranks = torch.split(by_tensor, torch.bincount(ranked_owner, minlength=len(names)).tolist())

        def total(n: int) -> int:  # non-decreasing in n
            counts = [int(torch.searchsorted(r, n)) for r in ranks]
            return decide(dict(zip(names, counts)), shapes, self.rank, self.alpha, self.beta, STRUCTURED[self.structured][1])[1]

        lo, hi = 1, ranked_owner.numel()
        if total(hi) < self.budget:
            return hi
        while lo < hi:  # smallest n with total(n) >= budget
            mid = (lo + hi) // 2
            if total(mid) >= self.budget:
                hi = mid
            else:
                lo = mid + 1
        return lo - 1 if lo > 1 and self.budget - total(lo - 1) < total(lo) - self.budget else lo

    def choose(self, scored: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entries]:
        scores = dict(scored)
        names = list(scores)
        shapes = {n: tuple(s.shape) for n, s in scores.items()}
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        owner = torch.repeat_interleave(torch.arange(len(names)), torch.tensor([s.numel() for s in scores.values()]))
        if self.budget > flat.numel():
            raise ValueError(f"SPT budget {self.budget:,} is larger than the {flat.numel():,} eligible entries of this model; lower it")
        # Rank only as deep as the search needs (a full sort of a ViT-B's scores takes seconds on a
        # CPU): the top 4 x budget entries, doubled while the budget is not reached there.
        depth = min(flat.numel(), 4 * self.budget)
        while True:
            order = _ranked_top(flat, depth)
            n_best = self._closest_n(owner[order], names, shapes)
            if n_best < len(order) or len(order) == flat.numel():
                break
            depth = min(flat.numel(), 2 * depth)
        chosen_pos = order[:n_best]
        counts = torch.bincount(owner[chosen_pos], minlength=len(names)).tolist()
        kinds, _ = decide(dict(zip(names, counts)), shapes, self.rank, self.alpha, self.beta, STRUCTURED[self.structured][1])
        starts = torch.cumsum(torch.tensor([0] + [s.numel() for s in scores.values()]), 0)
        picked = torch.zeros(flat.numel(), dtype=torch.bool)
        picked[chosen_pos] = True
        out: dict[str, Entries] = {}
        for i, name in enumerate(names):
            kind = kinds[name]
            if kind == "structured":
                out[name] = Entries(STRUCTURED[self.structured][0], shapes[name], rank=self.rank)
            elif kind == "whole":
                out[name] = Entries(WHOLE, shapes[name])
            elif kind == "sparse":
                idx = torch.nonzero(picked[starts[i] : starts[i + 1]]).flatten()
                out[name] = Entries(FLAT, shapes[name], idx)
        self.decisions, self.n_selected = kinds, n_best  # for inspection and tests
        return out
