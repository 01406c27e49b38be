"""The comparison's rows, table and files, made from the run folders' ``metrics.json`` alone.

Reading nothing but the run folders is what makes ``--collect`` on the same folders give the same rows as
the command that ran them.
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg_peft.comparison.inputs import CompareError, method_rank
from medseg_peft.comparison.run_metrics import METRICS_FILE, finished, load_metrics
from medseg_peft.workflows.charts import comparison_chart, duration  # matplotlib loads only when a chart is drawn

SHOWN = ("mDice", "mIoU", "top1")  # the metrics a row shows, those a run has, in this order; the first is the key


def row(folder: Path, data: dict, out: Path) -> dict:
    """One run's line of the comparison, from its metrics.json only (new keys where the run wrote them)."""
    best, zero = data.get("best") or {}, data.get("zero_shot") or {}
    shown = [m for m in SHOWN if m in best or m in zero] or [next((k for k in best if k != "epoch"), "?")]
    if "trainable_fraction" in data:
        percent = 100 * data["trainable_fraction"]
    else:
        percent = data.get("tuned_percent")
    timed = data.get("wall_time_s") is not None  # training's clock; a metrics.json without it has the report's seconds
    return {
        "method": data.get("method") or folder.name,
        "run": os.path.relpath(folder.resolve(), out.resolve()),
        "key_metric": shown[0],
        "metrics": shown,
        "trainable": data.get("trainable"),
        "tuned_percent": percent,
        "zero_shot": {m: zero.get(m) for m in shown},
        "best": {m: best.get(m) for m in shown},
        "best_epoch": best.get("epoch"),
        "epochs": data["history"][-1]["epoch"],
        "wall_time_s": data["wall_time_s"] if timed else data.get("seconds"),
        "wall_time_from": "wall_time_s" if timed else "seconds",
        "peak_memory_mib": data.get("peak_memory_mib"),
        "peak_memory_kind": data.get("peak_memory_kind"),
        "seconds": data.get("seconds"),
        # (seconds since the run began, key metric) at each validation, where the run recorded the times
        "curve": [(data["elapsed_s"][str(h["epoch"])], h.get(shown[0])) for h in data["history"]
                  if str(h["epoch"]) in data.get("elapsed_s", {}) and h.get(shown[0]) is not None],
    }


BASELINE = "decoder"  # the laptop baseline every method's row is held against at equal wall time


def baseline_at_equal_time(rows: list[dict]) -> dict[str, float | None]:
    """Per run: the best key metric the decoder baseline had reached within that run's whole time (selection
    included), from the baseline's validation times; empty without a baseline run that recorded them."""
    base = next((r for r in rows if r["method"] == BASELINE and r["curve"]), None)
    if base is None:
        return {}
    out = {}
    for r in rows:
        if r is base or r["seconds"] is None:
            continue
        reached = [v for t, v in base["curve"] if t <= r["seconds"]]
        out[r["run"]] = max(reached) if reached else None
    return out


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _scores(scores: dict, shown: list[str]) -> str:
    return " / ".join(_number(scores.get(m), 2 if m == "top1" else 3) for m in shown)


def memory(r: dict) -> str:
    if r["peak_memory_mib"] is None:
        return "-"
    return f"{r['peak_memory_mib']:,.0f} MiB" + (f" ({r['peak_memory_kind']})" if r["peak_memory_kind"] else "")


def table(rows: list[dict], unreadable: list[tuple[Path, str]] = (), out: Path | None = None) -> str:
    """The rows as a Markdown table (the README's form), one line per run, then a line per unreadable
    metrics.json (its folder, why, and the folder relative to ``out``)."""
    names = " / ".join("top-1" if m == "top1" else m for m in rows[0]["metrics"])
    versus = baseline_at_equal_time(rows)
    extra = f" {BASELINE} at equal time: its {rows[0]['key_metric']}, beaten? |" if versus else ""
    lines = [f"| method | tuned | tuned % | zero-shot {names} | best {names} | best epoch | wall time | peak memory |{extra} run |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if versus else "")]
    for r in rows:
        tuned = "-" if r["trainable"] is None else f"{r['trainable']:,}"
        percent = "-" if r["tuned_percent"] is None else f"{r['tuned_percent']:.3g}"
        cell = ""
        if versus:
            base, own = versus.get(r["run"]), r["best"].get(r["key_metric"])
            verdict = "-" if base is None or own is None else ("yes" if own > base else "no")
            cell = f" {_number(base, 3)}, {verdict} |" if r["run"] in versus else " (baseline) |"
        lines.append(f"| {r['method']} | {tuned} | {percent} | {_scores(r['zero_shot'], r['metrics'])} | "
                     f"{_scores(r['best'], r['metrics'])} | {r['best_epoch'] if r['best_epoch'] is not None else '-'} "
                     f"(of {r['epochs']}) | {duration(r['wall_time_s'])} | {memory(r)} |{cell} {r['run']} |")
    for path, reason in unreadable:
        run = os.path.relpath(path.parent.resolve(), Path(out or path.parent).resolve())
        lines.append(f"| {path.parent.name} | unreadable: {METRICS_FILE} {reason} |" + " - |" * (lines[1].count("|") - 4) + f" {run} |")
    if any(r["wall_time_from"] != "wall_time_s" for r in rows):
        lines.append("\nwall time: metrics.json's seconds (the report's clock) where a run has no wall_time_s")
    return "\n".join(lines)


def common_parent(folders: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f.resolve().parent) for f in folders]))


def write(rows: list[dict], out: Path, done: list[dict], argv: list[str]) -> None:
    from medseg_peft.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"key_metric": rows[0]["key_metric"], "rows": rows, "runs": done, "command": argv}, out / "comparison.json")
    comparison_chart(rows, out / "comparison.png")


def collect(root: Path) -> tuple[list[tuple[Path, dict]], list[tuple[Path, str]]]:
    """Every finished run below ``root`` (its folder and metrics), in the methods' usual order, and every
    metrics.json that cannot be read (its path and why).

    Unfinished runs are left out with a line each: collecting while runs go on is normal. An unreadable
    metrics.json is not left out silently: the caller names it and writes no comparison without it."""
    if not root.is_dir():
        raise CompareError(f"--collect: {root} is not a folder")
    runs, unfinished, unreadable = [], [], []
    for path in sorted(root.rglob(METRICS_FILE)):
        data, reason = load_metrics(path.parent)
        if reason is not None:
            unreadable.append((path, reason))
        elif data is None:
            print(f"left out {path.parent}: unfinished (no validation yet)")
        else:
            (runs if finished(data) else unfinished).append((path.parent, data))
    for folder, data in unfinished:
        print(f"left out {folder}: unfinished (epoch {data['history'][-1]['epoch']} of {data['settings'].get('epochs')})")
    if not runs:
        if unreadable:
            raise CompareError(f"--collect: no finished run below {root}, and {unreadable_files(unreadable)}")
        raise CompareError(f"--collect: no finished run below {root} (no metrics.json whose history reached its epochs)")
    return sorted(runs, key=lambda run: (method_rank(run[1].get("method", "")), str(run[0]))), unreadable


def unreadable_files(unreadable: list[tuple[Path, str]]) -> str:
    return "unreadable " + "; ".join(f"{path}: {reason}" for path, reason in unreadable)


def report(runs: list[tuple[Path, dict]], out: Path | None, done: list[dict], argv: list[str],
           unreadable: list[tuple[Path, str]] = ()) -> list[dict]:
    """Print the table and write comparison.json (the rows; apart from them, what this command did per method:
    run, resume or skip, with each process's measured time) and comparison.png into ``out`` (default: the
    folders' common parent).

    With ``unreadable`` runs (a metrics.json and why it cannot be read) the table names them and nothing is
    written: a comparison without them would replace one that had them, with no sign of what went missing."""
    out = Path(out) if out is not None else common_parent([folder for folder, _ in runs])
    rows = [row(folder, data, out) for folder, data in runs]
    kinds = sorted({r["key_metric"] for r in rows})
    if len(kinds) > 1:
        raise CompareError(f"the runs have different key metrics ({', '.join(kinds)}): compare one task at a time "
                           "(collect a folder of one task's runs)")
    print(table(rows, unreadable, out))
    if unreadable:
        print(f"\nnothing written: {out / 'comparison.json'} and {out / 'comparison.png'} are left as they were")
        return rows
    write(rows, out, done, argv)
    print(f"\nwrote {out / 'comparison.json'} and {out / 'comparison.png'}")
    return rows
