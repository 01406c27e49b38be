"""Collect classification runs into the per-task table, with both VTAB-1k averages and the FGVC mean.

    python -m medseg_peft.results runs/            # every metrics.json below runs/

VTAB-1k has two averages in the literature and papers mix them: the mean of the 19 tasks (GPS, SSF,
V-PETL) and the mean of the three group means (natural 7, specialized 4, structured 8; VPT, NOAH,
SPT, SNELL). Both are printed, beside the published numbers of GPS, SPT and full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from medseg_peft.recipes import FGVC_TASKS, VTAB_TASKS, load_recipe

# means as published (Zhang et al., CVPR 2024, Tables 1-2; He et al., ICCV 2023, Table 1): 19-task mean, group mean, FGVC mean; None where not reported
PUBLISHED_MEANS = {
    "GPS": {"vtab19": 75.18, "vtab_groups": 77.47, "fgvc": 91.78},
    "SPT-LoRA": {"vtab19": None, "vtab_groups": 76.4, "fgvc": 90.1},
    "SPT-Adapter": {"vtab19": None, "vtab_groups": 76.4, "fgvc": 89.8},
    "full FT": {"vtab19": 65.57, "vtab_groups": 69.0, "fgvc": 88.54},
}


def groups() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task in VTAB_TASKS:
        out.setdefault(load_recipe(task)["group"], []).append(task)
    return out


def vtab_averages(top1: dict[str, float]) -> tuple[float | None, float | None]:
    """(mean of the 19 tasks, mean of the 3 group means); None unless all 19 tasks are present."""
    if not all(t in top1 for t in VTAB_TASKS):
        return None, None
    per_group = [mean(top1[t] for t in tasks) for tasks in groups().values()]
    return mean(top1[t] for t in VTAB_TASKS), mean(per_group)


def fgvc_mean(top1: dict[str, float]) -> float | None:
    return mean(top1[t] for t in FGVC_TASKS) if all(t in top1 for t in FGVC_TASKS) else None


def collect(root: str | Path) -> list[dict]:
    """One row per run folder below ``root`` whose metrics.json names one of the 24 tasks."""
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        data = json.loads(path.read_text())
        task = data.get("settings", {}).get("task")
        if task not in VTAB_TASKS + FGVC_TASKS or not data.get("history"):
            continue
        best = max(h.get("top1", float("-inf")) for h in data["history"] if h.get("epoch", 0) > 0) if len(data["history"]) > 1 else None
        rows.append({"task": task, "method": data.get("method", "?"), "split_mode": data["settings"].get("split_mode", "test"),
                     "best": best, "last": data["history"][-1].get("top1"), "run": str(path.parent)})
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| task | method | split | best top-1 | last top-1 | GPS (published) | run |", "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: ((VTAB_TASKS + FGVC_TASKS).index(r["task"]), r["method"])):
        published = load_recipe(row["task"])["published"].get("gps")
        lines.append(f"| {row['task']} | {row['method']} | {row['split_mode']} | {_fmt(row['best'])} | {_fmt(row['last'])} | "
                     f"{_fmt(published)} | {row['run']} |")
    lines += ["", "| averages | VTAB 19-task mean | VTAB mean of group means | FGVC mean |", "|---|---|---|---|"]
    for method in sorted({r["method"] for r in rows if r["split_mode"] == "test"}):
        best = {r["task"]: r["best"] for r in rows if r["method"] == method and r["split_mode"] == "test" and r["best"] is not None}
        v19, vg = vtab_averages(best)
        n_vtab, n_fgvc = sum(t in best for t in VTAB_TASKS), sum(t in best for t in FGVC_TASKS)
        lines.append(f"| ours: {method} (best; {n_vtab}/19 VTAB, {n_fgvc}/5 FGVC tasks) | {_fmt(v19)} | {_fmt(vg)} | {_fmt(fgvc_mean(best))} |")
    for name, means in PUBLISHED_MEANS.items():
        lines.append(f"| published: {name} | {_fmt(means['vtab19'])} | {_fmt(means['vtab_groups'])} | {_fmt(means['fgvc'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="?", default="runs", help="folder searched for metrics.json (default: runs)")
    args = ap.parse_args(argv)
    rows = collect(args.runs)
    if not rows:
        print(f"no classification runs of the 24 tasks below {args.runs}")
    print(table(rows))


if __name__ == "__main__":
    main()
