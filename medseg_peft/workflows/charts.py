"""Matplotlib figures for every picture the package writes, and the comparison chart of several runs.

Figures are made as :class:`matplotlib.figure.Figure` objects with an Agg canvas of their own, never
through pyplot: no global figure registry to leak into or clean up, nothing that needs a display, and
safe to draw from a training process's handler threads or a server. matplotlib is imported inside the
functions, so importing this module (or ``medseg_peft.compare``, which calls it) stays light.

Every picture is written atomically (:func:`medseg_peft.io.atomic_write`: a temporary file beside the
target renamed over it), so a viewer refreshing it during training never sees half a PNG.

:func:`comparison_chart` draws ``comparison.png`` from the rows of ``medseg_peft.compare``: the best key
metric against the share of tuned parameters (log scale), marker area proportional to wall time, the
zero-shot scores as dashed lines and each marker named by its method (by its run where a method repeats).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from medseg_peft.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100  # a figure's size in inches times this is its size in pixels
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
LIGHT = "#ebebeb"  # cells and grids that carry no data


def duration(seconds) -> str:
    """``seconds`` as a person reads a run's time: ``42 s``, ``3 min 05 s``, ``1 h 02 min`` (``-`` for none)."""
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure with constrained layout (labels never overlap the axes) on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Render ``figure`` as a PNG beside ``path``, then rename it over ``path``."""
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, facecolor="white"))


# ---- the comparison chart ------------------------------------------------------------------------
def chart_points(rows: Sequence[dict]) -> dict:
    """What the comparison chart plots, from compare's rows: per run with a tuned share and a best score its
    label, tuned %, best score, wall time and marker area; the distinct zero-shot scores; the key metric.

    Marker area grows linearly with wall time (from a floor that keeps the fastest run visible); a run
    without a recorded time gets a middle-sized marker. A method run more than once is labelled by its run."""
    key = rows[0]["key_metric"] if rows else "score"
    runs = [r for r in rows if r["tuned_percent"] and r["best"].get(key) is not None]
    zeros = sorted({round(r["zero_shot"][key], 6) for r in rows if r["zero_shot"].get(key) is not None})
    times = [r["wall_time_s"] for r in runs if r["wall_time_s"]]
    longest = max(times) if times else None
    methods = [r["method"] for r in runs]
    points = []
    for i, r in enumerate(runs):
        area = 25 + 575 * r["wall_time_s"] / longest if r["wall_time_s"] and longest else 80
        points.append({"label": r["run"] if methods.count(r["method"]) > 1 else r["method"], "tuned_percent": r["tuned_percent"],
                       "best": r["best"][key], "wall_time_s": r["wall_time_s"], "area": area, "colour": PALETTE[i % len(PALETTE)]})
    return {"key": key, "points": points, "zero_shot": zeros, "longest_s": longest}


def _label_offsets(points: list[dict], x_of, y_of, width_pt: float = 600, height_pt: float = 350) -> list[tuple[float, float, str]]:
    """Per point, where its label goes in points from the marker and its alignment: right of the marker
    (left of it in the chart's right fifth), moved down or up past the markers and the labels already placed.
    ``x_of`` and ``y_of`` give a value's fraction of the axes; the axes are about ``width_pt`` x ``height_pt``."""
    placed, out = [], []
    for p in points:  # every marker is in the way of every label
        x, y, radius = x_of(p["tuned_percent"]) * width_pt, y_of(p["best"]) * height_pt, math.sqrt(p["area"]) / 2
        placed.append((x - radius, y - radius, x + radius, y + radius))
    for p in points:
        fx, fy = x_of(p["tuned_percent"]), y_of(p["best"])
        radius = math.sqrt(p["area"]) / 2
        right = fx > 0.8
        w, h = 7 * len(p["label"]), 13
        dx = -(radius + 4) if right else radius + 4
        x0 = fx * width_pt + dx - (w if right else 0)
        for shift in (0, -h, h, -2 * h, 2 * h, -3 * h, 3 * h):
            y0 = fy * height_pt + shift - h / 2
            if not any(x0 < b[2] and b[0] < x0 + w and y0 < b[3] and b[1] < y0 + h for b in placed):
                break
        placed.append((x0, y0, x0 + w, y0 + h))
        out.append((dx, shift, "right" if right else "left"))
    return out


def comparison_figure(rows: Sequence[dict]) -> Figure:
    """The comparison chart of ``rows`` (compare's rows) as a figure; see :func:`chart_points` for what it plots."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter


    data = chart_points(rows)
    key, points, zeros = data["key"], data["points"], data["zero_shot"]
    figure = new_figure(9, 5.8)
    ax = figure.add_subplot()
    ax.set_title(f"best {key} against the share of tuned parameters", loc="left", fontsize=13)
    if not points:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no run with a tuned share and a best score", ha="center", va="center", fontsize=13, transform=ax.transAxes)
        return figure
    logs = [math.log10(p["tuned_percent"]) for p in points]
    xlo, xhi = math.floor(min(logs)), math.ceil(max(logs))
    xlo -= xlo == xhi
    margin = 0.06 * (xhi - xlo)  # a point at a decade (100 %) stays off the frame
    ys = [p["best"] for p in points] + zeros
    pad = max((max(ys) - min(ys)) * 0.12, 0.02 * (abs(max(ys)) or 1))
    ylo, yhi = min(ys) - pad, max(ys) + pad
    ax.set_xscale("log")
    ax.set_xlim(10 ** (xlo - margin), 10 ** (xhi + margin))
    ax.set_ylim(ylo, yhi)
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} %"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", color="#e6e6e6")
    ax.set_axisbelow(True)
    ax.set_xlabel("tuned parameters, % of the model (log scale)", fontsize=12)
    ax.set_ylabel(f"best {key}", fontsize=12)
    for z in zeros:
        ax.axhline(z, color="#777777", linestyle=(0, (4, 4)), linewidth=1.5)
        ax.annotate(f"zero-shot {z:.3g}", (0, z), xycoords=("axes fraction", "data"), xytext=(6, -4), textcoords="offset points",
                    va="top", color="#555555", fontsize=9)
    if data["longest_s"]:
        ax.set_title(f"marker area ~ wall time (largest {duration(data['longest_s'])})", loc="right", fontsize=9)
    ax.scatter([p["tuned_percent"] for p in points], [p["best"] for p in points], s=[p["area"] for p in points],
               c=[p["colour"] for p in points], alpha=0.7, edgecolors="black", linewidths=0.8, zorder=3)
    x_of = lambda v: (math.log10(v) - xlo + margin) / (xhi - xlo + 2 * margin)  # noqa: E731 - axes fraction of a value
    y_of = lambda v: (v - ylo) / (yhi - ylo)  # noqa: E731
    for p, (dx, dy, align) in zip(points, _label_offsets(points, x_of, y_of)):
        ax.annotate(p["label"], (p["tuned_percent"], p["best"]), xytext=(dx, dy), textcoords="offset points", ha=align, va="center",
                    color=p["colour"], fontsize=11, zorder=4)
    return figure


def comparison_chart(rows: Sequence[dict], path: str | Path) -> Path:
    """Write the comparison chart of ``rows`` to ``path`` (atomically)."""
    return save_figure(comparison_figure(rows), path)
