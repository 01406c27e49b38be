"""Two pictures of a run, because people would rather look than read: what is tuned, and how training went.

``draw_selection`` shows where a :class:`~medseg_peft.selection.Selection` puts its trainable entries:
a heat map with one row per transformer block (parsed from ``blocks.<i>.`` in the parameter names, so
SAM's ``image_encoder.blocks.N`` and timm's ``blocks.N`` alike; a TinyViT encoder's
``layers.<s>.blocks.<i>.`` give rows "stage s block i", its stage-0 MBConv blocks included) and one
column per kind of weight (attention, MLP, conv, bias, norm, other), coloured by the fraction of that
block's entries of that kind which train; below it, a bar per kind and per part outside the blocks
(SAM's neck, prompt encoder and mask decoder, a ViT's head, patch embedding, tokens, TinyViT's patch
mergings "merge after stage s") with its count of trained entries.

``draw_training_curve`` plots the mean training loss and the validation metrics per epoch.

Each comes as a matplotlib figure (``selection_figure``, ``training_curve_figure``: what tests and
notebooks look at) and as a file written from it; :mod:`medseg_peft.workflows.charts` makes the figures
(no pyplot, no display) and writes them atomically, so a viewer refreshing a picture during training
never sees half a PNG. matplotlib loads on the first drawing, not on import.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from torch import nn

from medseg_peft.entries import WHOLE, Entries, Selection
from medseg_peft.workflows.charts import LIGHT, PALETTE, new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("attention", "mlp", "conv", "bias", "norm", "other")
# a block is "...blocks.<i>." (SAM ViT, timm) or "...layers.<s>.blocks.<i>." (TinyViT: stage s, block i)
BLOCK = re.compile(r"^(.*?)(?:layers\.(\d+)\.)?blocks\.(\d+)\.")
MERGE = re.compile(r"^layers\.(\d+)\.downsample\.")  # TinyViT's patch merging after stage s


# ---- what a parameter is ------------------------------------------------------------------------
def block_of(name: str) -> tuple[int, int] | None:
    """``(stage, block)`` of ``name`` (stage -1 for a model without stages), or None outside the blocks."""
    m = BLOCK.match(name)
    return (int(m.group(2)) if m.group(2) is not None else -1, int(m.group(3))) if m else None


def block_label(block: tuple[int, int]) -> str:
    stage, index = block
    return f"block {index}" if stage < 0 else f"stage {stage} block {index}"


def kind_of(name: str) -> str:
    """attention / mlp / conv / bias / norm / other, for a parameter inside a transformer block.

    Norms first (their weight and bias are one kind: what LayerNorm tuning trains; a BatchNorm's scale
    too), then every other bias (what BitFit trains; a BatchNorm's shift, the bias of TinyViT's bias-free
    convolutions), then the weights by the module they sit in (SAM's relative position tables and
    TinyViT's attention-bias tables are attention's; TinyViT's MBConv and local convolutions are conv)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    if "norm" in module or module == "bn" and parts[-1] == "weight" or re.fullmatch(r"ln_?\d*", module):
        return "norm"  # a BatchNorm's shift is its convolution's bias, its scale a norm's
    if parts[-1] == "bias":
        return "bias"
    if "attn" in parts or "attention" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if any(p.startswith("conv") or p.endswith("_conv") for p in parts):
        return "conv"
    return "other"


def block_prefix(names: Sequence[str]) -> str:
    """The most common text before ``blocks.<i>.`` (``image_encoder.`` for SAM, ``''`` for timm)."""
    counts: dict[str, int] = defaultdict(int)
    for name in names:
        m = BLOCK.match(name)
        if m:
            counts[m.group(1)] += 1
    return max(counts, key=counts.get) if counts else ""


def part_of(name: str, prefix: str) -> str:
    """A readable name for a parameter outside the blocks: the module right under the blocks' parent
    (``image_encoder.neck``, ``head``, ``cls_token``) or right under the model wrapper that holds it
    (``prompt_encoder``, ``mask_decoder``)."""
    encoder = prefix.rstrip(".")
    wrapper = encoder.rpartition(".")[0] + "." if "." in encoder else ""
    if prefix and name.startswith(prefix):
        rest = name[len(prefix):]
        if m := MERGE.match(rest):
            return f"{encoder.rpartition('.')[2]}.merge after stage {m.group(1)}"
        return f"{encoder.rpartition('.')[2]}.{rest.split('.')[0]}"
    rest = name[len(wrapper):] if name.startswith(wrapper) else name
    return rest.split(".")[0]


# ---- counting -----------------------------------------------------------------------------------
def selection_from_flags(network: nn.Module, method: str = "full") -> Selection:
    """A whole-tensor Selection of every parameter with ``requires_grad``: the picture of a run that
    trains without attached deltas (full fine-tuning unfreezes the model instead)."""
    params = list(network.named_parameters())
    entries = {n: Entries(WHOLE, tuple(p.shape)) for n, p in params if p.requires_grad}
    return Selection(entries, sum(p.numel() for _, p in params), method, {"from": "requires_grad"})


def base_numels(network: nn.Module) -> dict[str, int]:
    """Entries per base parameter name of a network, with or without attached deltas: a parametrized
    ``x.parametrizations.weight.original`` counts as ``x.weight``; delta values and branch factors are not
    base parameters and are left out."""
    out = {}
    for name, p in network.named_parameters():
        dotted = f".{name}"  # a parametrized tensor of the model itself (cls_token) has no owner before the marker
        if ".parametrizations." in dotted:
            if not name.endswith(".original"):
                continue
            owner, _, rest = dotted.partition(".parametrizations.")
            name = f"{owner}.{rest.split('.')[0]}".lstrip(".")
        elif ".peft_branch." in dotted:
            continue
        out[name] = p.numel()
    return out


def selection_table(selection: Selection, numels: Mapping[str, int] | None = None) -> dict:
    """Trained and total entries per (block, kind) cell and per group (block kinds, then outside parts).

    ``numels`` (every base parameter's size, e.g. :func:`base_numels`) makes the totals those of the
    whole model; without it they count only the tensors the selection names."""
    numels = dict(numels or {})
    for name, e in selection.entries.items():
        numels.setdefault(name, e.numel)
    prefix = block_prefix(list(numels))
    cells: dict[tuple[tuple[int, int], str], list[int]] = defaultdict(lambda: [0, 0])
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, n in numels.items():
        e = selection.entries.get(name)
        trained = e.count if e is not None else 0
        block = block_of(name)
        if block is None:
            key = part_of(name, prefix)
        else:
            kind = kind_of(name)
            cells[block, kind][0] += trained
            cells[block, kind][1] += n
            key = f"blocks: {kind}"
        groups[key][0] += trained
        groups[key][1] += n
    blocks = sorted({b for b, _ in cells})
    kinds = [k for k in KINDS if any((b, k) in cells for b in blocks)]
    block_groups = [f"blocks: {k}" for k in kinds]
    order = block_groups + sorted(g for g in groups if g not in block_groups)
    return {"blocks": blocks, "kinds": kinds, "cells": dict(cells), "groups": {g: tuple(groups[g]) for g in order}}


# ---- drawing ------------------------------------------------------------------------------------
def _percent(trained: int, total: int) -> str:
    return f"{100 * trained / max(total, 1):.3g} %"


def _heat_map(figure: Figure, ax, table: dict) -> None:
    """One row per block, one column per kind, coloured by the share of the cell's entries that train."""
    import matplotlib
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    blocks, kinds, cells = table["blocks"], table["kinds"], table["cells"]
    if not blocks:
        ax.set_axis_off()
        ax.text(0, 0.5, "no transformer blocks (no 'blocks.<i>.' in the parameter names)", color="grey", fontsize=11,
                transform=ax.transAxes, va="center")
        return
    share = np.full((len(blocks), len(kinds)), np.nan)  # NaN: the block has no weight of that kind
    for i, block in enumerate(blocks):
        for j, kind in enumerate(kinds):
            trained, total = cells.get((block, kind), (0, 0))
            if total:
                share[i, j] = trained / total
    vmax = float(np.nanmax(share)) if not np.isnan(share).all() else 0.0
    vmax = vmax or 1.0
    image = ax.imshow(np.ma.masked_invalid(share), cmap=matplotlib.colormaps["Blues"].with_extremes(bad=LIGHT), vmin=0, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    for i, block in enumerate(blocks):
        for j, kind in enumerate(kinds):
            trained, total = cells.get((block, kind), (0, 0))
            if total:
                text = f"{trained:,} · {_percent(trained, total)}" if trained else "0"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if share[i, j] / vmax > 0.55 else "black")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(blocks)), [block_label(b) for b in blocks], fontsize=9)
    ax.tick_params(length=0)
    bar = figure.colorbar(image, ax=ax, fraction=0.04, pad=0.01)
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g} %"))
    bar.set_label("share trained", fontsize=9)  # short: a map of two blocks has a short colour bar


def _group_bars(ax, groups: Mapping[str, tuple[int, int]]) -> None:
    """A bar per kind and per part with its count of trained entries, the counts and shares written at the right."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    names, rows = list(groups), range(len(groups))
    trained = [t for t, _ in groups.values()]
    ax.barh(rows, trained, height=0.6, color=PALETTE[0])
    ax.set_yticks(rows, names, fontsize=9)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # the first group on top
    ax.set_xlim(0, max(trained, default=0) or 1)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 2.5, 5, 10]))  # whole counts, room for "180,000"
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(True, axis="x", color=LIGHT)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    counts = ax.secondary_yaxis("right")  # tick labels, so the layout makes room for them
    counts.set_yticks(rows, [f"{t:,} of {n:,} ({_percent(t, n)})" for t, n in groups.values()], fontsize=9)
    counts.tick_params(length=0)
    counts.spines["right"].set_visible(False)
    ax.set_title("trained entries per kind (in the blocks) and per part (outside them)", loc="left", fontsize=11)


def selection_figure(selection: Selection, numels: Mapping[str, int] | None = None) -> Figure:
    """Where ``selection`` trains: a heat map per block and kind above, bars per kind and part below.

    Colour is the fraction of a cell's entries that train, scaled to the largest cell (sparse methods
    train well under 1 %, which a 0-100 % scale would paint white); each cell also prints its count and
    percentage. A LoRA or adapter counts its branch parameters against the weight it sits beside."""
    table = selection_table(selection, numels)
    heat_h = 0.7 + 0.3 * len(table["blocks"]) if table["blocks"] else 0.4
    bars_h = 0.9 + 0.3 * len(table["groups"])
    width = max(10.0, 2.8 + 1.5 * len(table["kinds"]))
    figure = new_figure(width, 0.9 + heat_h + bars_h)
    settings = ", ".join(f"{k}={v}" for k, v in selection.hparams.items())
    heading = f"{selection.method} ({settings})" if settings else selection.method
    figure.suptitle(f"{heading}\ntrainable {selection.num_trainable:,} of {selection.total_params:,} parameters "
                    f"({100 * selection.fraction:.3f} %) in {len(selection)} tensors", x=0.01, ha="left", fontsize=12)
    heat_ax, bars_ax = figure.subplots(2, 1, height_ratios=[heat_h, bars_h])
    _heat_map(figure, heat_ax, table)
    _group_bars(bars_ax, table["groups"])
    return figure


def draw_selection(selection: Selection, path: str | Path, numels: Mapping[str, int] | None = None) -> Path:
    """Write :func:`selection_figure` of ``selection`` to ``path`` (atomically)."""
    return save_figure(selection_figure(selection, numels), path)


def curve_series(history: Sequence[Mapping], key_metric: str, losses: Sequence[Mapping] = ()) -> tuple[dict, dict]:
    """(loss series, metric series) from ``metrics.json``'s ``history`` (and its per-epoch ``train_loss``
    list, which also covers epochs without validation): the key metric first, then mIoU / top1_raw and
    the other task metric where recorded. Epoch 0 is the zero-shot validation."""
    loss = {int(d["epoch"]): float(d["loss"]) for d in losses}
    for h in history:
        if "train_loss" in h:
            loss.setdefault(int(h["epoch"]), float(h["train_loss"]))
    names = [key_metric] + [m for m in ("mDice", "mIoU", "top1", "top1_raw") if m != key_metric]
    metrics = {m: [(h["epoch"], h[m]) for h in history if m in h] for m in names}
    return {"train loss (mean per epoch)": sorted(loss.items())}, {m: pts for m, pts in metrics.items() if pts}


def _panel(ax, series: Mapping[str, Sequence[tuple[float, float]]], title: str) -> None:
    """Lines of ``series`` (name -> (epoch, value) points) on ``ax``, with whole epochs and a legend."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, loc="left", fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, color=LIGHT)
    values = [y for pts in series.values() for _, y in pts]
    if not values:
        ax.text(0.02, 0.9, "nothing recorded yet", color="grey", fontsize=10, transform=ax.transAxes, va="top")
        return
    for k, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], color=PALETTE[k % len(PALETTE)], linewidth=2, marker="o", markersize=4,
                markevery=None if len(pts) <= 100 else [len(pts) - 1], label=name)
    low, high = ax.get_ylim()
    if min(values) >= 0 and low < 0:  # scores and losses keep a floor of 0
        ax.set_ylim(0, high)
    ax.legend(loc="best", fontsize=9)


def training_curve_figure(history: Sequence[Mapping], key_metric: str = "mDice", losses: Sequence[Mapping] = (),
                          title: str = "") -> Figure:
    """Loss per epoch above, validation metrics per epoch below (:func:`curve_series`), on one epoch axis."""
    loss, metrics = curve_series(history, key_metric, losses)
    figure = new_figure(8.2, 6.2)
    if title:
        figure.suptitle(title, x=0.01, ha="left", fontsize=12)
    top, bottom = figure.subplots(2, 1, sharex=True)
    _panel(top, loss, "training loss")
    _panel(bottom, metrics, f"validation (key metric {key_metric}; epoch 0 = before tuning)")
    bottom.set_xlabel("epoch")
    return figure


def draw_training_curve(history: Sequence[Mapping], path: str | Path, key_metric: str = "mDice",
                        losses: Sequence[Mapping] = (), title: str = "") -> Path:
    """Write :func:`training_curve_figure` to ``path`` (atomically)."""
    return save_figure(training_curve_figure(history, key_metric, losses, title), path)
