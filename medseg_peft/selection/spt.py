"""SPT: sensitivity-aware parameter-efficient tuning (He et al., ICCV 2023; ziplab/SPT).

Sensitivity of a weight = the sum over selection batches of its squared batch-loss gradient
(first-order Taylor), in fp32, task loss by default (ziplab/SPT ``engine.py``). Then one global
budget over every eligible entry: matrices (attention / MLP weights) and vectors (norms, biases)
compete together. The units are SPT's: q, k and v of a fused ``qkv`` Linear (timm ViT, SAM) are
three units, row blocks of the one weight (and of its bias), as SPT's ViT has three Linears (a
TinyViT encoder's qkv, whose rows are per head, is one unit; see :func:`units_of`). Of the
global top-N, a matrix unit holding at least ``cost / alpha`` selected entries gets a structured
branch instead (LoRA, cost ``rank * (in + out)``, or an adapter), otherwise exactly its selected
entries are tuned; a vector unit holding at least ``len / beta`` selected entries is tuned whole.

The budget counts what is trained: sparse + structured + whole vectors + the cls token (the
reference adds 768, a ViT-B's cls token). N is searched as the reference does: on a grid of
``step`` (0.02 M in ``engine.py``), keeping the N whose total is closest to the budget, ties to the
larger N (its ``<=``). ``step=None`` is our option, an exact search over every N, which can land
closer to the budget (e.g. 3,079 instead of 3,500 for a budget of 3,000 on a tiny ViT).

Defaults as the reference's scripts (``configs/vtab_supervised_spt_lora.sh``): ``alpha=10``,
``beta=5``, ``rank=8``, train mode while scoring; branches get ``Dropout(0.1)`` on their input
(not on the attention projection's) and ``DropPath(0.1)`` on their output while training
(``StructuredTuningModule``). With ``structured="adapter"`` a unit gets a bottleneck adapter on its
output (``2 * rank * out + rank + out``), on the attention projection one beside it on its input, as
the reference places them; adapters stay modules and are not mergeable.
"""

from __future__ import annotations

import math
import re
from dataclasses import field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.entries import ADAPTER, FLAT, LORA, WHOLE, Entries, Selection, branch_cost, row_view_shape
from medseg_peft.selection.base import ScoredSelector, gradients_for, model_device, seeded, settings_dataclass
from medseg_peft.selection.batches import call_model, iter_batches
from medseg_peft.selection.eligibility import FREEZE, SELECT, TRAIN, UNUSED_HEAD, auto_preset, in_tiny_vit
from medseg_peft.selection.rules import check_positive_int, check_rate
from medseg_peft.tuning.attach import attach

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
    # SAM with a TinyViT encoder: spt_sam's rule on TinyViT's parts
    "spt_sam_tiny_vit": [
        {"exclude": r"(^|\.)image_encoder\.", "role": TRAIN},
        # MobileSAM's ImageNet head sees no input
        {"match": UNUSED_HEAD.pattern, "role": FREEZE},
        # patch embedding, position tables (TinyViT's attention_biases) and neck frozen, as spt_sam's
        {"match": r"patch_embed|attention_biases|neck", "role": FREEZE},
        # the transformer blocks' Linears (qkv, proj, fc1, fc2); convolutions (MBConv, patch merging, local
        # depthwise) are no SPT unit, as spt_sam's patch embedding is not: its branches sit beside Linears
        {"match": r"(^|\.)blocks\.\d+\.(attn|mlp)\.\w+\.weight$", "min_ndim": 2, "role": SELECT},
        # every norm / bias vector, a BatchNorm's scale and shift included
        {"match": r"norm|bias|\.bn\.weight$", "max_ndim": 1, "role": SELECT},
        {"role": FREEZE},
    ],
}


FUSED_QKV = re.compile(r"(^|\.)qkv\.(weight|bias)$")
ATTENTION_PROJ = re.compile(r"(^|\.)attn\.proj\.weight$")
CLS_TOKEN = re.compile(r"(^|\.)cls_token$")
STRUCTURED = {"lora": LORA, "adapter": ADAPTER}
REFERENCE_STEP = 20_000  # ziplab/SPT engine.py sweeps the top count in 0.02 M steps


def units_of(name: str, shape: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """SPT's units of one tensor as ``(unit name, first row, stop row)``: q / k / v of a fused qkv, else the tensor.

    A TinyViT encoder's fused qkv stays one unit: its rows are laid out per head (q, k, v of head 0,
    then of head 1, ...), so no block of rows holds "the queries", and a unit of interleaved rows would
    need a branch over scattered rows, which ``Entries`` (one branch per contiguous row block) does not have.
    """
    rows = shape[0]
    if FUSED_QKV.search(name) and not in_tiny_vit(name) and rows % 3 == 0:
        d = rows // 3
        return [(f"{name}[{part}]", i * d, (i + 1) * d) for i, part in enumerate("qkv")]
    return [(name, 0, rows)]


def unit_cost(layout: str, name: str, shape: tuple[int, ...], rank: int) -> int:
    """What a structured branch on a matrix unit costs (an adapter on the attention projection sits on its input)."""
    rows, cols = row_view_shape(shape)
    return branch_cost(layout, rows, cols, rank, on_input=layout == ADAPTER and bool(ATTENTION_PROJ.search(name)))


def decide(counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]], costs: Mapping[str, int], alpha: float, beta: float) -> tuple[dict[str, str], int]:
    """Per unit "structured" / "sparse" / "whole" / "none" for the given selected counts, and the total trained."""
    kinds: dict[str, str] = {}
    total = 0
    for name, n in counts.items():
        shape = shapes[name]
        if n == 0:
            kinds[name] = "none"
        elif len(shape) >= 2:
            kinds[name], add = ("structured", costs[name]) if n >= costs[name] / alpha else ("sparse", n)
            total += add
        else:
            kinds[name], add = ("whole", shape[0]) if n >= shape[0] / beta else ("sparse", n)
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
    """Sensitivity-aware selection with a global budget and structured (LoRA / adapter) upgrades.

    Args:
        budget: total trainable count in the eligible part plus the cls token (sparse + structured +
            whole vectors + cls token), as the reference counts it.
        structured: ``"lora"`` (mergeable) or ``"adapter"`` (kept as a module).
        rank, alpha, beta: as in the reference (8, 10, 5).
        step: the grid of top counts searched: ``"auto"`` is the reference's 20,000 for budgets of
            0.2 M and more (its 0.02 M steps) and ``budget // 20`` below (small demo models); an
            integer; or ``None`` for our exact search over every count.
        dropout, drop_path: the branches' regularisation while training (reference 0.1 and 0.1; no
            dropout on the attention projection's branch, as in the reference).
        loss: ``"ce"`` or a callable ``(outputs, targets) -> loss`` (the task loss).
        eligibility: ``"auto"`` picks ``"spt_sam_tiny_vit"`` for a SAM with a TinyViT encoder, ``"spt_sam"``
            for other SAM models, else ``"spt_vit"``; or a rule list.
    """

    method = "spt"
    counted_outside = 0  # trained whole and counted in the total (the cls token), set from the model in build

    budget: int = 400_000
    structured: str = field(default="lora", kw_only=True)
    rank: int = field(default=8, kw_only=True)
    alpha: float = field(default=10, kw_only=True)
    beta: float = field(default=5, kw_only=True)
    step: int | str | None = field(default="auto", kw_only=True)
    dropout: float = field(default=0.1, kw_only=True)
    drop_path: float = field(default=0.1, kw_only=True)
    loss: str | Callable = field(default="ce", kw_only=True)
    train_mode: bool = field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.budget, "SPT budget", "trainable parameters")
        if self.structured not in STRUCTURED:
            raise ValueError(f"SPT structured must be one of {sorted(STRUCTURED)}, got {self.structured!r}")
        check_positive_int(self.rank, "SPT rank")
        if self.step not in ("auto", None) and (isinstance(self.step, bool) or not isinstance(self.step, int) or self.step <= 0):
            raise ValueError(f"SPT step must be 'auto', a positive integer or None (exact search), got {self.step!r}")
        for key in ("dropout", "drop_path"):
            check_rate(getattr(self, key), f"SPT {key}")
        if self.loss != "ce" and not callable(self.loss):
            raise ValueError(f"SPT loss must be 'ce' or a callable (outputs, targets) -> loss, got {self.loss!r}")

    def grid_step(self) -> int | None:
        if self.step != "auto":
            return self.step
        return REFERENCE_STEP if self.budget >= 10 * REFERENCE_STEP else max(1, self.budget // 20)

    def rules(self, model: nn.Module) -> str | Sequence[Mapping]:
        if self.eligibility == "auto":
            return SPT_PRESETS[f"spt_{auto_preset(model)}"]
        if isinstance(self.eligibility, str):
            return SPT_PRESETS.get(self.eligibility, self.eligibility)
        return self.eligibility

    def build(self, model: nn.Module, batches: Iterable) -> Selection:
        # the reference's total counts the cls token (trained whole, outside the eligible part)
        self.counted_outside = sum(p.numel() for n, p in model.named_parameters() if CLS_TOKEN.search(n))
        return super().build(model, batches)

    def statistics(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per entry, the sum over batches of the squared batch-loss gradient (fp32)."""
        with gradients_for(model, selectable, self.train_mode) as params:
            sens = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in selectable}
            for x, y in iter_batches(batches, model_device(model), self.max_batches):
                out = call_model(model, x)
                if y is None:
                    raise ValueError("SPT needs targets in the selection batches (its sensitivity is a task-loss gradient)")
                loss = F.cross_entropy(out, y) if self.loss == "ce" else self.loss(out, y)
                grads = torch.autograd.grad(loss, [params[n] for n in selectable], allow_unused=True)
                for n, g in zip(selectable, grads):
                    if g is not None:
                        sens[n] += g.float() ** 2
        return sens

    def _search(self, total, depth: int, available: int) -> int | None:
        """The top count N whose total is closest to the budget (ties to the larger N), or None when
        that needs more than the ``depth`` entries ranked so far."""
        step = self.grid_step()
        if step is None:  # exact: bisection over every N (the total is non-decreasing in N)
            lo, hi = 1, depth
            if total(hi) < self.budget:
                return hi if depth == available else None
            while lo < hi:  # smallest N with total(N) >= budget
                mid = (lo + hi) // 2
                if total(mid) >= self.budget:
                    hi = mid
                else:
                    lo = mid + 1
            return lo - 1 if lo > 1 and self.budget - total(lo - 1) < total(lo) - self.budget else lo
        best, best_gap, n = None, None, step
        while True:
            n_eff = min(n, available)
            if n_eff > depth:
                return None
            trained = total(n_eff)
            gap = abs(trained - self.budget)
            if best_gap is not None and gap > best_gap and trained > self.budget:
                return best  # totals only grow from here
            if best_gap is None or gap <= best_gap:
                best, best_gap = n_eff, gap
            if n_eff == available:
                return best
            n += step

    def choose(self, scored: Iterator[tuple[str, torch.Tensor]]) -> dict[str, Entries]:
        scores = dict(scored)
        names = list(scores)
        shapes = {n: tuple(s.shape) for n, s in scores.items()}
        layout = STRUCTURED[self.structured]
        units, unit_shapes, unit_owner = [], {}, []  # unit_owner: per flat position, its unit number
        for name in names:
            shape = shapes[name]
            cols = math.prod(shape[1:])  # entries per row (1 for a vector)
            for unit, a, b in units_of(name, shape):
                unit_owner.append(torch.full(((b - a) * cols,), len(units), dtype=torch.long))
                units.append((unit, name, a, b))
                unit_shapes[unit] = (b - a, *shape[1:])
        unit_names = [u[0] for u in units]
        costs = {u: unit_cost(layout, u.partition("[")[0], unit_shapes[u], self.rank) for u in unit_names if len(unit_shapes[u]) >= 2}
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        owner = torch.cat(unit_owner)
        if self.budget > flat.numel():
            raise ValueError(f"SPT budget {self.budget:,} is larger than the {flat.numel():,} eligible entries of this model; lower it")

        def decisions(order_owner: torch.Tensor, n: int) -> tuple[dict[str, str], int]:
            counts = torch.bincount(order_owner[:n], minlength=len(units)).tolist()
            kinds, total = decide(dict(zip(unit_names, counts)), unit_shapes, costs, self.alpha, self.beta)
            return kinds, total + self.counted_outside

        # Rank only as deep as the search needs (a full sort of a ViT-B's scores takes seconds on a
        # CPU): the top 4 x budget entries, doubled while the search runs past them.
        depth = min(flat.numel(), 4 * self.budget)
        while True:
            order = _ranked_top(flat, depth)
            order_owner = owner[order]
            n_best = self._search(lambda n: decisions(order_owner, n)[1], len(order), flat.numel())
            if n_best is not None:
                break
            depth = min(flat.numel(), 2 * depth)
        kinds, self.total = decisions(order_owner, n_best)
        picked = torch.zeros(flat.numel(), dtype=torch.bool)
        picked[order[:n_best]] = True
        self.decisions, self.n_selected = kinds, n_best  # for inspection and tests
        return self._entries(units, kinds, shapes, picked, layout)

    def _entries(self, units, kinds, shapes, picked, layout) -> dict[str, Entries]:
        """One Entries per tensor from its units' decisions: branches on structured units' rows, whole
        vector units and sparse units as single entries."""
        out: dict[str, Entries] = {}
        start = 0
        by_tensor: dict[str, list] = {}
        for unit, name, a, b in units:
            by_tensor.setdefault(name, []).append((unit, a, b))
        for name, parts in by_tensor.items():
            shape = shapes[name]
            cols = math.prod(shape[1:])
            numel = shape[0] * cols
            mine = picked[start : start + numel]
            start += numel
            blocks, single = [], torch.zeros(numel, dtype=torch.bool)
            for unit, a, b in parts:
                kind = kinds[unit]
                if kind == "structured":
                    blocks.append((a, b))
                elif kind == "whole":
                    single[a * cols : b * cols] = True
                elif kind == "sparse":
                    single[a * cols : b * cols] = mine[a * cols : b * cols]
            index = torch.nonzero(single).flatten()
            if blocks:
                whole_rows = blocks == [(0, shape[0])]
                out[name] = Entries(layout, shape, index if index.numel() else None, self.rank, None if whole_rows else tuple(blocks),
                                    on_input=layout == ADAPTER and bool(ATTENTION_PROJ.search(name)))
            elif index.numel() == numel:
                out[name] = Entries(WHOLE, shape)
            elif index.numel():
                out[name] = Entries(FLAT, shape, index)
        return out

    def apply(self, model: nn.Module, selection: Selection) -> nn.Module:
        """Attach with the reference's branch regularisation: dropout on every branch input but the
        attention projection's, drop-path on every branch output."""
        dropout = {n: 0.0 if ATTENTION_PROJ.search(n) else self.dropout for n in selection.entries}
        with seeded(self.seed, model_device(model)):  # the branches' initialisation is reproducible
            return attach(model, selection, dropout=dropout, drop_path=self.drop_path)
