"""Partial fine-tuning (Ye et al., arXiv 2312.15681): whole layers trained, everything else frozen.

Layers are chosen either by a hand-written ``strategy`` or by the paper's fine-tuned angle metric
(``angle_top=N``): per unit (the attention and the MLP of each block, separately), the angle
``arccos(cos(w_before, w_after))`` over the unit's parameters concatenated and flattened, between the
pre-trained weights and *fine-tuned* ones, keeping the ``N`` units that turned most
(``order="smallest"``: the least-turned). ``finetuned=`` names those fine-tuned weights (a completed
full fine-tuning run of the same bundle, or a user's file): that is the paper's metric. Without it a
short probe (a copy of the model fine-tuned for ``probe_steps`` Adam steps on the selection batches)
stands in, as a cheap approximation that can rank layers differently; the log says which one ranked
them. The paper has no public code (Ye et al., arXiv 2312.15681): its eight manual strategies, and
whether larger or smaller angles are preferred, are our reading of it; the names here cover its
attention-only / FFN-only / first-half / last-half families, plus ``last_blocks:N``, ``norm_bias`` and
free glob lists.

Units. A unit is every parameter under ``blocks.N.attn.`` or ``blocks.N.mlp.``, so the same names work
on a timm ViT (``blocks.N.attn.qkv``, ``.proj``; ``blocks.N.mlp.fc1``, ``.fc2``) and on SAM's image encoder
(``...image_encoder.blocks.N.attn.qkv``, ``.proj``, **and the relative-position tables** ``rel_pos_h`` /
``rel_pos_w``, which live in SAM's attention module and are trained with it; ``...mlp.lin1``, ``.lin2``).
Weights and biases both belong to the unit; the blocks' LayerNorms (``norm1``, ``norm2``) and layer-scale
gammas do not (they are in ``last_blocks:N`` and, norms, in ``norm_bias``).

A TinyViT encoder (MobileSAM, LiteMedSAM) has stages: a block is ``layers.S.blocks.N``, told apart and
ordered stage by stage. Its attention unit holds ``qkv``, ``proj`` and the attention-bias tables (its
position encoding, as SAM's ``rel_pos`` tables), not the pre-norm ``attn.norm`` (nor the MLP unit its
``mlp.norm``), as a ViT's ``norm1`` stays out. Its layers that are neither attention nor MLP are
``conv`` units, so the angle metric can rank them too: each block's ``local_conv`` and each stage-0
MBConv block (its three convolutions with their BatchNorms, one layer of the inverted residual). The
``attn`` / ``ffn`` strategies and their halves count only the blocks that have such a unit;
``last_blocks:N`` counts every block, MBConv ones included. The patch mergings between stages are no
block.

Always trained (``train_head=True``, the default, as GPS does): a classifier's ``head.*``, or, for a
model with an ``image_encoder``, everything outside the image encoder (SAM's prompt encoder and
mask decoder). ``train_head=False`` trains exactly the strategy's parameters.

The selection holds only whole-tensor entries, so it attaches, saves, merges and soups like every
other method's.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
from dataclasses import field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.distributed import average_gradients
from medseg_peft.entries import WHOLE, Entries, Selection
from medseg_peft.selection.base import Selector, check_max_batches, model_device, seeded, settings_dataclass
from medseg_peft.selection.batches import call_model, iter_batches
from medseg_peft.selection.eligibility import UNUSED_HEAD, always_trained
from medseg_peft.selection.rules import check_positive_int
from medseg_peft.tuning import load_delta, merge

log = logging.getLogger("medseg_peft")

# a block: "...blocks.<i>." (timm ViT, SAM's ViT) or "...layers.<s>.blocks.<i>." (TinyViT: block i of stage s)
BLOCK = re.compile(r"(^|\.)(?:layers\.(\d+)\.)?blocks\.(\d+)\.")
# a block's layer that is a unit: attention and MLP (the paper's), TinyViT's local depthwise convolution
SUBLAYER = re.compile(r"(attn|local_conv|mlp)\.")
MBCONV = re.compile(r"conv\d+\.")  # a TinyViT stage-0 block (MBConv) is convolutions only: one unit
KIND_OF = {"attn": "attn", "local_conv": "conv", "mlp": "mlp"}
KIND_ORDER = {"attn": 0, "conv": 1, "mlp": 2}  # within a block, as the layers run
STRATEGIES = ("attn", "ffn", "attn_first_half", "attn_last_half", "ffn_first_half", "ffn_last_half", "last_blocks:N", "norm_bias")
ORDERS = ("largest", "smallest")
_GLOB_CHARS = set("*?[")


def block_key(name: str) -> tuple[str, int, int] | None:
    """A block's identity and place: the path before it, its stage (-1 without stages) and its index, so
    TinyViT's ``layers.S.blocks.N`` of different stages are different blocks, ordered stage by stage."""
    m = BLOCK.search(name)
    return (name[: m.start()], -1 if m.group(2) is None else int(m.group(2)), int(m.group(3))) if m else None


def unit_of(name: str) -> tuple[str, str] | None:
    """``(unit, kind)`` of a parameter (kind ``attn``, ``mlp`` or ``conv``), or None outside every unit.

    A LayerNorm inside TinyViT's attention or MLP (``attn.norm``, ``mlp.norm``) is no part of the unit,
    as a ViT's ``norm1`` / ``norm2`` in front of them are not."""
    m = BLOCK.search(name)
    if not m:
        return None
    rest = name[m.end():]
    if sub := SUBLAYER.match(rest):
        if rest[sub.end():].startswith("norm."):
            return None
        return name[: m.end() + sub.end() - 1], KIND_OF[sub.group(1)]
    if MBCONV.match(rest):
        return name[: m.end() - 1], "conv"
    return None


def _units(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """``{unit: (kind, [parameter names])}`` in block order, a block's units as its layers run."""
    units: dict[str, tuple[str, list[str]]] = {}
    order: dict[str, tuple] = {}
    for name, _ in model.named_parameters():
        found = unit_of(name)
        if found:
            unit, kind = found
            units.setdefault(unit, (kind, []))[1].append(name)
            order[unit] = (*block_key(name), KIND_ORDER[kind])
    return {u: units[u] for u in sorted(units, key=order.__getitem__)}


def units_of(model: nn.Module) -> dict[str, list[str]]:
    """``{unit: [parameter names]}``, the unit named by its module path (``"blocks.3.attn"``,
    ``"sam.image_encoder.blocks.3.mlp"``, TinyViT's ``"...layers.1.blocks.0.local_conv"`` and MBConv block
    ``"...layers.0.blocks.1"``), in block order, attention before MLP."""
    return {u: names for u, (_, names) in _units(model).items()}


def strategy_names(model: nn.Module, strategy: str | Sequence[str]) -> list[str]:
    """The parameter names a manual strategy trains, in model order (head / decoder not included)."""
    names = [n for n, _ in model.named_parameters()]
    if isinstance(strategy, str) and _GLOB_CHARS & set(strategy):
        strategy = [strategy]  # one glob pattern given as a plain string (a config value)
    if not isinstance(strategy, str):
        globs = list(strategy)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise ValueError(f"partial strategy must be a name or a non-empty list of glob strings, got {strategy!r}")
        picked = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
        if not picked:
            raise ValueError(f"partial strategy globs {globs} match no parameter (names look like {names[:3]})")
        return picked

    units = _units(model)
    kinds = {"attn": "attn", "ffn": "mlp"}
    m_half = re.fullmatch(r"(attn|ffn)_(first|last)_half", strategy)
    m_last = re.fullmatch(r"last_blocks:(\d+)", strategy)
    if strategy in kinds:
        picked = [n for kind, ns in units.values() if kind == kinds[strategy] for n in ns]
    elif m_half:
        kind = kinds[m_half.group(1)]
        blocks = sorted({block_key(ns[0]) for k, ns in units.values() if k == kind})  # the blocks that have one
        half = len(blocks) // 2  # an odd depth puts the middle block in the last half
        chosen = set(blocks[:half] if m_half.group(2) == "first" else blocks[half:])
        picked = [n for k, ns in units.values() if k == kind and block_key(ns[0]) in chosen for n in ns]
    elif m_last:
        n = int(m_last.group(1))
        blocks = sorted({key for x in names if (key := block_key(x)) is not None})  # TinyViT's MBConv blocks count
        if not blocks:
            picked = []
        elif n <= 0 or n > len(blocks):
            raise ValueError(f"partial strategy {strategy!r}: N must be in 1..{len(blocks)}; the model has {len(blocks)} blocks")
        else:
            tail = set(blocks[-n:])
            picked = [x for x in names if block_key(x) in tail]
    elif strategy == "norm_bias":  # a BatchNorm's scale is a norm's; MobileSAM's unused head is left out
        picked = [n for n in names if not UNUSED_HEAD.search(n) and ("norm" in n or n.endswith((".bias", ".bn.weight")))]
    else:
        raise ValueError(
            f"unknown partial strategy {strategy!r}; known: {list(STRATEGIES)} (N a number), or a list of glob patterns"
        )
    if not picked:
        raise ValueError(
            f"partial strategy {strategy!r} matches no parameter of this {type(model).__name__} "
            f"(it looks for blocks.N.attn. / blocks.N.mlp. / layers.S.blocks.N. in names like {names[:3]})"
        )
    wanted = set(picked)
    return [n for n in names if n in wanted]


def finetuned_state(model: nn.Module, source: str | Path) -> dict[str, torch.Tensor]:
    """The fine-tuned weights named like ``model``'s parameters, from a run folder (its
    ``best_delta.safetensors``), a result or delta file of this package, a plain ``.safetensors`` state
    dict, or a ``.pt`` / ``.pth`` state dict (read with ``weights_only=True``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "best_delta.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuned weights {path} do not exist (a run folder holds best_delta.safetensors)")
    if path.suffix == ".safetensors":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("medseg_peft", "{}"))
        if meta.get("format") == "medseg_peft.delta":  # a sparse / LoRA result: apply it to a copy of the base
            return {n: p.detach() for n, p in merge(load_delta(copy.deepcopy(model), path)).named_parameters()}
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def angle(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """``arccos`` of the cosine between two parameter sets, each concatenated and flattened (radians)."""
    a = torch.cat([t.detach().double().reshape(-1) for t in before])
    b = torch.cat([t.detach().double().reshape(-1) for t in after])
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0 if na == nb else math.pi / 2
    cos = float(torch.dot(a, b)) / (na * nb)
    return math.acos(max(-1.0, min(1.0, cos)))


@settings_dataclass
class Partial(Selector):
    """Partial fine-tuning: whole layers by a manual ``strategy`` or by the fine-tuned angle metric.

    Args:
        strategy: ``"attn"``, ``"ffn"``, ``"attn_first_half"``, ``"attn_last_half"``, ``"ffn_first_half"``,
            ``"ffn_last_half"``, ``"last_blocks:N"`` (every parameter of the last N blocks),
            ``"norm_bias"`` (every norm parameter and every bias), or a list of glob patterns matched
            (``fnmatch``) against parameter names (one pattern may also be given as a string).
        angle_top: instead of a strategy, the number of units (a block's attention or MLP; TinyViT's
            convolutions too) to train, ranked by their angle to ``finetuned`` weights, or after a short
            probe fine-tune without them. Give exactly one of the two.
        finetuned: a run folder (its ``best_delta.safetensors``), a result / delta file of this package,
            or a ``.safetensors`` / ``.pt`` state dict of the fine-tuned model: the paper's angle.
        order: ``"largest"`` (default) or ``"smallest"`` angles first.
        probe_steps, probe_lr: the probe: this many Adam steps over the selection batches (cycled;
            only the first ``probe_steps`` batches are ever read), all weights trainable, train mode.
        loss: the probe's loss: ``"ce"`` or a callable ``(outputs, targets) -> loss`` (for SAM, the
            segmentation loss). Only used with ``angle_top``.
        train_head: also train the classifier head / SAM's prompt encoder and mask decoder whole.
        max_batches: read at most this many selection batches for the probe.
        seed: RNG seed for the probe (dropout, drop-path).

    After an angle selection ``self.angles`` holds ``{unit: angle in radians}`` (the table is also logged
    at INFO on the ``medseg_peft`` logger). The probe trains a deep copy, so the model's parameters,
    buffers (e.g. BatchNorm statistics), ``requires_grad`` flags, gradients and train/eval mode are left
    exactly as they were; it costs one extra model plus Adam state in memory while it runs.
    """

    method = "partial"

    strategy: str | Sequence[str] | None = None
    angle_top: int | None = None
    order: str = field(default="largest", kw_only=True)
    probe_steps: int = field(default=20, kw_only=True)
    probe_lr: float = field(default=1e-3, kw_only=True)
    loss: str | Callable = field(default="ce", kw_only=True)
    train_head: bool = field(default=True, kw_only=True)
    max_batches: int | None = field(default=None, kw_only=True)
    finetuned: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_max_batches(self.max_batches)
        strategy, angle_top = self.strategy, self.angle_top
        if (strategy is None) == (angle_top is None):
            raise ValueError(
                "Partial needs exactly one of strategy= (a strategy name or a list of globs) and angle_top= "
                f"(a number of units to pick by the fine-tuned angle), got strategy={strategy!r}, angle_top={angle_top!r}"
            )
        if angle_top is not None:
            check_positive_int(angle_top, "angle_top")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        check_positive_int(self.probe_steps, "probe_steps")
        if not self.probe_lr > 0:
            raise ValueError(f"probe_lr must be positive, got {self.probe_lr!r}")
        if not callable(self.loss) and self.loss != "ce":
            raise ValueError(f"Partial's angle probe needs loss='ce' or a callable (outputs, targets) -> loss, got {self.loss!r}")
        if self.finetuned is not None:
            if angle_top is None:
                raise ValueError("finetuned= ranks units by their angle: it needs angle_top=N")
            if not isinstance(self.finetuned, (str, Path)):
                raise ValueError(f"finetuned must be a weights file or a run folder, got {type(self.finetuned).__name__}")
            self.finetuned = str(self.finetuned)
        self.ranked_by = ""
        self.strategy = strategy if strategy is None or isinstance(strategy, str) else list(strategy)
        self.probe_lr = float(self.probe_lr)
        self.angles: dict[str, float] = {}

    def build(self, model: nn.Module, batches: Iterable = ()) -> Selection:
        if self.strategy is not None:
            names = strategy_names(model, self.strategy)
        else:
            with seeded(self.seed, model_device(model)):
                names = self.angle_units(model, batches)
        wanted = set(names)
        if self.train_head:
            wanted |= set(always_trained(model))
        params = dict(model.named_parameters())
        entries = {n: Entries(WHOLE, tuple(p.shape)) for n, p in params.items() if n in wanted}
        return Selection(entries, sum(p.numel() for p in params.values()), self.method, self.hparams())

    def probe_angles(self, model: nn.Module, batches: Iterable) -> dict[str, float]:
        """Fine-tune a copy of ``model`` briefly; ``{unit: angle between its weights before and after}``."""
        units = units_of(model)
        if not units:
            raise ValueError(f"the angle probe finds no blocks.N.attn / blocks.N.mlp units in this {type(model).__name__}")
        device = model_device(model)
        limit = self.probe_steps if self.max_batches is None else min(self.probe_steps, self.max_batches)
        data = list(islice(iter_batches(batches, device, limit), limit))
        if any(y is None for _, y in data):
            raise ValueError("the angle probe fine-tunes on the selection batches and needs their targets")
        probe = copy.deepcopy(model)  # the probe trains a copy: the model itself is never written
        for p in probe.parameters():
            p.grad = None
            p.requires_grad_(True)
        opt = torch.optim.Adam(probe.parameters(), lr=self.probe_lr)
        probe.train()
        for step in range(self.probe_steps):
            x, y = data[step % len(data)]
            out = call_model(probe, x)
            loss = F.cross_entropy(out, y) if self.loss == "ce" else self.loss(out, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Partial angle probe: the loss is {loss.item()} at step {step}; check the inputs, loss and probe_lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(probe.parameters())  # under torchrun: one data-parallel probe, the same on every rank
            opt.step()
        before, after = dict(model.named_parameters()), dict(probe.named_parameters())
        angles = {u: angle([before[n] for n in ns], [after[n] for n in ns]) for u, ns in units.items()}
        del probe, opt
        return angles

    def finetuned_angles(self, model: nn.Module) -> dict[str, float]:
        """``{unit: angle between the base weights and those of the fine-tuned model in self.finetuned}``: the paper's metric."""
        tuned = finetuned_state(model, self.finetuned)
        before = dict(model.named_parameters())
        units = units_of(model)
        missing = [n for ns in units.values() for n in ns if n not in tuned]
        if missing:
            raise ValueError(f"the fine-tuned weights in {self.finetuned} lack {len(missing)} unit parameter(s) of this model, e.g. {missing[:3]}")
        return {u: angle([before[n] for n in ns], [tuned[n] for n in ns]) for u, ns in units.items()}

    def angle_units(self, model: nn.Module, batches: Iterable) -> list[str]:
        """The parameter names of the ``angle_top`` units ranked first by their angles: to a fine-tuned model
        (``finetuned``, the paper's metric) or after a short probe (the cheap approximation)."""
        units = units_of(model)
        if self.angle_top > len(units):
            raise ValueError(f"angle_top={self.angle_top} but the model has only {len(units)} units "
                             "(attention and MLP per block, and TinyViT's convolutions)")
        if self.finetuned is not None:
            self.angles = self.finetuned_angles(model)
            self.ranked_by = f"the fine-tuned model {self.finetuned}"
        else:
            self.angles = self.probe_angles(model, batches)
            self.ranked_by = (f"a probe of {self.probe_steps} Adam steps at lr {self.probe_lr:g} "
                              "(an approximation of the fine-tuned angle; pass finetuned= for the paper's metric)")
        ranked = sorted(units, key=self.angles.__getitem__, reverse=self.order == "largest")  # stable: ties keep model order
        chosen = set(ranked[: self.angle_top])
        width = max(len(u) for u in units)
        table = "\n".join(
            f"  {u.ljust(width)}  {math.degrees(self.angles[u]):10.5f}{'  *' if u in chosen else ''}" for u in units
        )
        log.info("Partial: angle per unit in degrees, ranked by %s (* = the %d %s):\n%s", self.ranked_by, self.angle_top, self.order, table)
        return [n for u in units if u in chosen for n in units[u]]
