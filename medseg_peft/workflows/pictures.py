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

Both draw with Pillow, as the contour sheet does: no plotting library is needed for a few lines and
boxes. Every picture is written atomically (a temporary file in the same folder renamed over the
target), so a viewer refreshing it during training never sees half a PNG.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont
from torch import nn

from medseg_peft.io import atomic_write
from medseg_peft.selection.selection import WHOLE, Entries, Selection

KINDS = ("attention", "mlp", "conv", "bias", "norm", "other")
# a block is "...blocks.<i>." (SAM ViT, timm) or "...layers.<s>.blocks.<i>." (TinyViT: stage s, block i)
BLOCK = re.compile(r"^(.*?)(?:layers\.(\d+)\.)?blocks\.(\d+)\.")
MERGE = re.compile(r"^layers\.(\d+)\.downsample\.")  # TinyViT's patch merging after stage s
WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (128, 128, 128), (235, 235, 235)
COLD, HOT = (247, 251, 255), (8, 48, 107)  # the ends of the heat map's colour scale (light to dark blue)
LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


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
def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's own scalable font (Pillow >= 10.1 with FreeType), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an older Pillow: one size only
        return ImageFont.load_default()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG beside ``path``, then rename it over ``path``."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def blend(t: float, low=COLD, high=HOT) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0)
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high))


def _percent(trained: int, total: int) -> str:
    return f"{100 * trained / max(total, 1):.3g} %"


def draw_selection(selection: Selection, path: str | Path, numels: Mapping[str, int] | None = None) -> Path:
    """Draw where ``selection`` trains (heat map per block and kind, bars per kind and part) to ``path``.

    Colour is the fraction of a cell's entries that train, scaled to the largest cell (sparse methods
    train well under 1 %, which a 0-100 % scale would paint white); each cell also prints its count and
    percentage. A LoRA or adapter counts its branch parameters against the weight it sits beside."""
    table = selection_table(selection, numels)
    blocks, kinds, cells, groups = table["blocks"], table["kinds"], table["cells"], table["groups"]
    f, small = font(13), font(11)
    row_h, cell_w, bar_w = 20, 150, 420
    label_w = 120 if any(stage >= 0 for stage, _ in blocks) else 80
    width = max(label_w + cell_w * max(len(kinds), 1) + 90, 260 + bar_w + 170)
    heat_h = 24 + row_h * len(blocks) if blocks else 24
    height = 56 + heat_h + 34 + row_h * len(groups) + 16
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    settings = ", ".join(f"{k}={v}" for k, v in selection.hparams.items())
    draw.text((10, 8), f"{selection.method} ({settings})" if settings else selection.method, fill=BLACK, font=f)
    draw.text((10, 28), f"trainable {selection.num_trainable:,} of {selection.total_params:,} parameters "
                        f"({100 * selection.fraction:.3f} %) in {len(selection)} tensors", fill=BLACK, font=f)
    top = 56
    if blocks:
        vmax = max((t / n for t, n in cells.values() if n), default=0.0) or 1.0
        for j, kind in enumerate(kinds):
            draw.text((label_w + j * cell_w + 6, top), kind, fill=BLACK, font=f)
        for i, block in enumerate(blocks):
            y = top + 20 + i * row_h
            draw.text((6, y + 3), block_label(block), fill=BLACK, font=small)
            for j, kind in enumerate(kinds):
                x = label_w + j * cell_w
                trained, total = cells.get((block, kind), (0, 0))
                if not total:
                    draw.rectangle([x, y, x + cell_w - 2, y + row_h - 2], fill=LIGHT)
                    continue
                t = trained / total / vmax
                draw.rectangle([x, y, x + cell_w - 2, y + row_h - 2], fill=blend(t))
                text = f"{trained:,} · {_percent(trained, total)}" if trained else "0"
                draw.text((x + 5, y + 4), text, fill=WHITE if t > 0.55 else BLACK, font=small)
        x = label_w + len(kinds) * cell_w + 14  # the colour scale
        span = row_h * len(blocks)
        for k in range(span):
            draw.line([x, top + 20 + k, x + 14, top + 20 + k], fill=blend(1 - k / max(span - 1, 1)))
        draw.text((x + 18, top + 18), f"{100 * vmax:.3g} %", fill=BLACK, font=small)
        draw.text((x + 18, top + 8 + span), "0 %", fill=BLACK, font=small)
    else:
        draw.text((10, top), "no transformer blocks (no 'blocks.<i>.' in the parameter names)", fill=GREY, font=f)
    top += heat_h + 10
    draw.text((10, top), "trained entries per kind (in the blocks) and per part (outside them)", fill=BLACK, font=f)
    top += 24
    most = max((t for t, _ in groups.values()), default=0) or 1
    for i, (name, (trained, total)) in enumerate(groups.items()):
        y = top + i * row_h
        draw.text((10, y + 3), name, fill=BLACK, font=small)
        draw.rectangle([250, y + 2, 250 + bar_w, y + row_h - 4], outline=LIGHT)
        if trained:
            draw.rectangle([250, y + 2, 250 + max(1, round(bar_w * trained / most)), y + row_h - 4], fill=LINE_COLOURS[0])
        draw.text((250 + bar_w + 8, y + 3), f"{trained:,} of {total:,} ({_percent(trained, total)})", fill=BLACK, font=small)
    return save_png(image, path)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: Mapping[str, Sequence[tuple[float, float]]],
               title: str) -> None:
    """Lines of ``series`` (name -> (epoch, value) points) in ``box``, with axes, ticks and a legend."""
    f, small = font(13), font(11)
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill=BLACK, font=f)
    px0, py0, px1, py1 = x0 + 60, y0 + 24, x1 - 10, y1 - 30  # the plot area inside the labels
    draw.rectangle([px0, py0, px1, py1], outline=GREY)
    points = [p for pts in series.values() for p in pts]
    if not points:
        draw.text((px0 + 10, py0 + 10), "nothing recorded yet", fill=GREY, font=small)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 0.5, xhi + 0.5
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 0.5
    ylo, yhi = (ylo - pad if ylo - pad >= 0 or ylo < 0 else 0.0), yhi + pad  # scores and losses >= 0 keep a floor of 0
    sx = lambda x: px0 + (x - xlo) / (xhi - xlo) * (px1 - px0)
    sy = lambda y: py1 - (y - ylo) / (yhi - ylo) * (py1 - py0)
    for v in _ticks(ylo, yhi):
        draw.line([px0 - 4, sy(v), px0, sy(v)], fill=GREY)
        draw.text((x0, sy(v) - 6), f"{v:.3g}", fill=BLACK, font=small)
    step = max(1, round((xhi - xlo) / 10))
    for e in range(int(xlo + 0.99), int(xhi) + 1, step):
        draw.line([sx(e), py1, sx(e), py1 + 4], fill=GREY)
        draw.text((sx(e) - 4, py1 + 6), str(e), fill=BLACK, font=small)
    draw.text(((px0 + px1) // 2 - 15, py1 + 16), "epoch", fill=BLACK, font=small)
    for k, (name, pts) in enumerate(series.items()):
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        xy = [(sx(x), sy(y)) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 100 else xy[-1:]:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    text_w = max(draw.textlength(name, font=small) for name in series)
    lx = px1 - text_w - 40  # the legend, top right, on white over the lines
    draw.rectangle([lx - 4, py0 + 3, px1 - 3, py0 + 9 + 16 * len(series)], fill=WHITE, outline=LIGHT)
    for k, name in enumerate(series):
        ly = py0 + 6 + 16 * k
        draw.line([lx, ly + 7, lx + 20, ly + 7], fill=LINE_COLOURS[k % len(LINE_COLOURS)], width=3)
        draw.text((lx + 26, ly), name, fill=BLACK, font=small)


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


def draw_training_curve(history: Sequence[Mapping], path: str | Path, key_metric: str = "mDice",
                        losses: Sequence[Mapping] = (), title: str = "") -> Path:
    """Loss per epoch above, validation metrics per epoch below, written atomically to ``path``."""
    loss, metrics = curve_series(history, key_metric, losses)
    image = Image.new("RGB", (820, 620), WHITE)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((10, 6), title, fill=BLACK, font=font(13))
    draw_panel(draw, (10, 28, 810, 318), loss, "training loss")
    draw_panel(draw, (10, 326, 810, 616), metrics, f"validation (key metric {key_metric}; epoch 0 = before tuning)")
    return save_png(image, path)
