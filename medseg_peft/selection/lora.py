"""LoRA, the baseline most users already run, behind the same interface as the selection methods.

Chooses nothing from data: a rank-``r`` branch on every weight whose name matches ``targets`` (by
default the fused ``qkv`` projection of every transformer block: SAM's ViT or TinyViT image encoder,
or a timm ViT), plus the parts every method here trains whole (SAM's prompt encoder and mask decoder,
a ViT's head). A branch spans every output row of the weight it sits beside, so a fused ``qkv`` needs
no known layout of its q, k and v rows (TinyViT's are interleaved per head). Its Selection, delta file, merge and unmerge are those of every other method, so tables compare
selection against LoRA on equal terms.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Iterable

from torch import nn

from medseg_peft.entries import LORA, WHOLE, Entries, Selection
from medseg_peft.selection.base import Selector, model_device, seeded, settings_dataclass
from medseg_peft.selection.eligibility import always_trained
from medseg_peft.selection.rules import check_positive_int, check_rate
from medseg_peft.tuning.attach import attach

DEFAULT_TARGETS = r"(^|\.)blocks\.\d+\.attn\.qkv\.weight$"


@settings_dataclass
class LoRA(Selector):
    """Low-rank adaptation of the weights matching ``targets``.

    Args:
        rank: rank of each branch (A: kaiming-uniform, B: zero, no alpha / r factor).
        targets: regular expression searched in parameter names; ``nn.Linear`` weights only.
        train_whole: regular expression of parameters trained whole; ``"auto"`` as described above,
            ``None`` for none.
        dropout, drop_path: regularisation of the branches while training (``Dropout`` on their input,
            per-sample ``DropPath`` on their output; as SPT's branches, off by default here).
        seed: seeds the A initialisation, so a run is reproducible.
    """

    method = "lora"

    rank: int = 4
    targets: str = field(default=DEFAULT_TARGETS, kw_only=True)
    train_whole: str | None = field(default="auto", kw_only=True)
    dropout: float = field(default=0.0, kw_only=True)
    drop_path: float = field(default=0.0, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.rank, "LoRA rank")
        for key in ("dropout", "drop_path"):
            check_rate(getattr(self, key), f"LoRA {key}")

    def build(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        if self.train_whole == "auto":
            whole = set(always_trained(model))
        else:
            whole = {n for n, _ in model.named_parameters() if self.train_whole and re.search(self.train_whole, n)}
        entries: dict[str, Entries] = {}
        for name, p in model.named_parameters():
            if p.ndim >= 2 and re.search(self.targets, name):
                if self.rank > min(p.shape[0], p[0].numel()):
                    raise ValueError(f"LoRA rank {self.rank} exceeds the smaller side of {name} {tuple(p.shape)}")
                entries[name] = Entries(LORA, tuple(p.shape), rank=self.rank)
            elif name in whole:
                entries[name] = Entries(WHOLE, tuple(p.shape))
        if not any(e.layout == LORA for e in entries.values()):
            raise ValueError(f"LoRA targets {self.targets!r} match no weight of this {type(model).__name__}")
        return Selection(entries, sum(p.numel() for p in model.parameters()), self.method, self.hparams())

    def apply(self, model: nn.Module, selection: Selection) -> nn.Module:
        with seeded(self.seed, model_device(model)):
            return attach(model, selection, dropout=self.dropout, drop_path=self.drop_path)
