"""Compare methods in one command: one bundle under each method's layer, then one table and one picture.

    python -m medseg_peft.compare --config_file bundles/polyp_fps.json --methods fps,gps,spt,partial,lora,full --epochs 3
    python -m medseg_peft.compare --collect runs/            # only collect finished runs, run nothing

Every method runs the same bundle with ``bundles/methods/<method>.json`` appended to the config file list, so
data, seed, epochs and every other override are the same for all of them; each run gets its own folder (the
bundle's own ``runs/<task>_<method>``, or ``<output_dir>/<method>`` when ``--output_dir`` is given).

Each run is its own ``python -m monai.bundle run`` process rather than a call into ``monai.bundle.run``
in this one: its peak memory (and CUDA context, caches, an out-of-memory) is its own, so one method's
leftovers neither inflate the next one's memory column nor sink the rest of the comparison; and the bundles'
guards (command-line key check on ``sys.argv``, run-folder lock released at exit, global seeding) are written
for one run per process. The command each run used is at the top of its ``compare.log``.

Before anything runs, every folder is checked: a finished ``metrics.json`` made with the settings this
command would use is not re-run; an interrupted one is re-run into the same folder, where the bundle resumes
it; a folder holding a run made with other settings (or more epochs than asked) stops the command, since
re-running there would either be refused by the bundle or report the old result under the new settings.
The settings compared are the bundle's own ``report#settings`` resolved with this command's overrides, except
``device`` and ``processes``, which change how a run computes, not what.

The table, ``comparison.json`` and ``comparison.png`` are made from the run folders' ``metrics.json``
alone, so ``--collect`` on the same folders gives the same rows as the command that ran them: wall time and
peak memory are the runs' own (``wall_time_s``, ``peak_memory_mib``; ``seconds`` and "-" for a metrics.json without
those keys), and each process's time measured here is kept apart, under ``runs`` in comparison.json.
``--collect`` leaves out unfinished runs with a line each; a metrics.json it cannot read (truncated, damaged)
is named in the table as unreadable, and then nothing is written over the previous comparison (exit 1).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medseg_peft.workflows.charts import comparison_chart, duration  # matplotlib loads only when a chart is drawn

PACKAGE_BUNDLES = Path(__file__).resolve().parent / "bundles"
TASK_METADATA = {"organ_fps.json": "organ_metadata.json", "classify.json": "classify_metadata.json"}
DEFAULT_METHODS = "fps,gps,spt,partial,lora,full"
METHOD_ORDER = ("fps", "gps", "spt", "partial", "lora", "full", "random", "decoder")
HOW_NOT_WHAT = {"device", "processes"}  # settings that change how a run computes, not what it computes
SHOWN = ("mDice", "mIoU", "top1")  # the metrics a row shows, those a run has, in this order; the first is the key
METRICS_FILE = "metrics.json"
LOG_FILE = "compare.log"


class CompareError(ValueError):
    """A problem with the command's input or its folders: printed as one line, before any run starts."""


# ---- input -------------------------------------------------------------------------------------
def config_files(value: str) -> list[str]:
    """``bundles/polyp_fps.json`` or a MONAI list ``"['a.json','b.json']"``; every file must exist."""
    try:
        files = ast.literal_eval(value) if value.strip().startswith("[") else [value]
    except (ValueError, SyntaxError) as err:
        raise CompareError(f"--config_file {value!r} is neither a file nor a list of files ({err})") from err
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CompareError(f"config file {missing[0]} does not exist")
    return [str(f) for f in files]


def method_layers(files: list[str]) -> dict[str, Path]:
    """``{method: layer file}``: the package's layers, and those beside the config (``<its folder>/methods``) first."""
    layers = {}
    for folder in (PACKAGE_BUNDLES / "methods", Path(files[0]).parent / "methods"):
        layers.update({p.stem: p for p in sorted(folder.glob("*.json"))})
    return layers


def methods(value: str, layers: dict[str, Path]) -> list[str]:
    names = list(dict.fromkeys(m.strip() for m in value.split(",") if m.strip()))
    unknown = [m for m in names if m not in layers]
    if unknown or not names:
        raise CompareError(f"unknown method(s) {', '.join(unknown) or '(none given)'}: the layers available are "
                           f"{', '.join(sorted(layers, key=_method_rank))}")
    return names


def overrides(tokens: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs, kept as typed: they go to every run's command line as they are."""
    out, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise CompareError(f"unexpected argument {token!r}: bundle settings are given as --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise CompareError(f"--{key} needs a value")
            i, value = i + 1, tokens[i + 1]
        out[key], i = value, i + 1
    return out


def beside(files: list[str], name: str) -> str | None:
    """``name`` beside the first config file, else the package's (the metadata and logging files of a task)."""
    for folder in (Path(files[0]).parent, PACKAGE_BUNDLES):
        if (folder / name).is_file():
            return str(folder / name)
    return None


# ---- planning: which runs to launch ------------------------------------------------------------
@dataclass
class Planned:
    method: str
    output_dir: Path
    command: list[str]
    action: str  # "run", "resume" or "skip"
    note: str = ""


def load_metrics(folder: Path) -> tuple[dict | None, str | None]:
    """``(metrics, None)`` for the folder's metrics.json with at least one validation; ``(None, None)`` with no
    such file or no validation yet (a run not started or not that far); ``(None, reason)`` for a file that is
    there but is not a run's metrics (truncated, damaged, another file's content), which must not pass for an
    absent run: a comparison without it would drop a method unnoticed."""
    path = folder / METRICS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"cannot be read ({err.strerror or err})"
    try:
        data = json.loads(text)
    except ValueError as err:
        return None, f"not valid JSON, truncated or damaged: {err}"
    if not isinstance(data, dict):
        return None, f"holds a JSON {type(data).__name__}, not a run's metrics object"
    history = data.get("history")
    if not history:
        return None, None
    if not isinstance(history, list) or not all(isinstance(h, dict) and _is_number(h.get("epoch")) for h in history):
        return None, "its history is not a list of validations with their epochs"
    wrong = [k for k in ("settings", "best", "zero_shot") if not isinstance(data.get(k) or {}, dict)]
    if wrong:
        return None, f"its {', '.join(wrong)} {'is not an object' if len(wrong) == 1 else 'are not objects'}"
    return data, None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(folder: Path) -> dict | None:
    """The folder's metrics.json with at least one validation, or None (absent, not validated yet, or unreadable)."""
    return load_metrics(folder)[0]


def finished(data: dict) -> bool:
    epochs = (data.get("settings") or {}).get("epochs")
    return epochs is None or data["history"][-1]["epoch"] >= epochs


def _normal(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _resolve(parser, ident: str, method: str):
    from medseg_peft.workflows.errors import root_cause

    try:
        return parser.get_parsed_content(ident)
    except Exception as err:  # the bundle's own error, one line
        cause = root_cause(err)
        raise CompareError(f"{method}: the bundle's {ident} does not resolve ({type(cause).__name__}: {cause})") from err


def decide(method: str, folder: Path, parser) -> tuple[str, str]:
    """``(action, note)`` for one method's folder; a folder this command must not touch is a CompareError."""
    data = read_metrics(folder)
    if data is None:
        return "run", ""
    expected = _normal(_resolve(parser, "report#settings", method)) if "report" in parser.config else {}
    found = _normal(data.get("settings") or {})
    differ = [f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in sorted(set(found) | set(expected))
              if k not in HOW_NOT_WHAT | {"epochs"} and found.get(k) != expected.get(k)]
    if differ:
        raise CompareError(f"{folder} holds a run made with other settings ({'; '.join(differ)}): delete it, or pass "
                           "--output_dir for a new comparison")
    done, asked = data["history"][-1]["epoch"], expected.get("epochs", found.get("epochs"))
    if asked is None or (done == asked and finished(data)):
        return "skip", f"{folder} holds a finished run with the same settings: not re-run"
    if done > asked:
        raise CompareError(f"{folder} holds a run of {done} epoch(s), {asked} asked: delete it, or pass --output_dir "
                           "for a new comparison")
    return "resume", f"resuming the run in {folder} (epoch {done} of {asked})"


def plan(files: list[str], names: list[str], layers: dict[str, Path], settings: dict[str, str], run_args: list[str],
         output_root: str | None) -> list[Planned]:
    """Each method's folder, command and action, and every input checked, before any run starts."""
    from fire.parser import DefaultParseValue  # how `monai.bundle run` reads a command-line value
    from monai.bundle import ConfigParser

    from medseg_peft.workflows.cli import unknown_keys

    bad = unknown_keys(list(settings), ConfigParser.load_config_files(files))
    if bad:
        raise CompareError("unknown setting(s) for this bundle: " + "; ".join(
            f"--{k}" + (f" (did you mean {', '.join('--' + m for m in near)}?)" if near else "") for k, near in bad.items()))
    values = {k: DefaultParseValue(v) for k, v in settings.items()}
    planned = []
    for method in names:
        layered = files + [str(layers[method])]
        parser = ConfigParser()
        parser.read_config(layered)
        parser.update(values)
        if output_root is not None:
            parser["output_dir"] = str(Path(output_root) / method)
        folder = Path(str(_resolve(parser, "output_dir", method)))
        action, note = decide(method, folder, parser)
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(layered), *run_args,
                   *[a for k, v in settings.items() for a in (f"--{k}", v)], "--output_dir", str(folder)]
        planned.append(Planned(method, folder, command, action, note))
    folders = [str(p.output_dir.resolve()) for p in planned]
    if len(set(folders)) < len(folders):
        raise CompareError(f"two methods would share one output folder ({', '.join(folders)}): give --output_dir, "
                           "which gets a subfolder per method")
    return planned


def launch(p: Planned) -> tuple[bool, float]:
    """Run one method's bundle in its own process, its output in ``<output_dir>/compare.log``."""
    p.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(p.output_dir / LOG_FILE, "a") as log:
        log.write(f"\n$ {shlex.join(p.command)}\n")
        log.flush()
        code = subprocess.run(p.command, stdout=log, stderr=subprocess.STDOUT).returncode
    return code == 0, time.perf_counter() - start


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- rows, table, picture ----------------------------------------------------------------------
def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


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
            raise CompareError(f"--collect: no finished run below {root}, and {_unreadable_files(unreadable)}")
        raise CompareError(f"--collect: no finished run below {root} (no metrics.json whose history reached its epochs)")
    return sorted(runs, key=lambda run: (_method_rank(run[1].get("method", "")), str(run[0]))), unreadable


def _unreadable_files(unreadable: list[tuple[Path, str]]) -> str:
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


# ---- command line ------------------------------------------------------------------------------
def run_all(planned: list[Planned]) -> tuple[list[tuple[Path, dict]], list[dict]]:
    """Launch the planned runs one after the other; a failed one is reported and the others go on.
    Returns the finished runs and, per method, what was done (with the process's measured seconds)."""
    runs, done = [], []
    for i, p in enumerate(planned, 1):
        head = f"[{i}/{len(planned)}] {p.method}:"
        record = {"method": p.method, "action": p.action, "run": str(p.output_dir), "command": shlex.join(p.command)}
        if p.action == "skip":
            print(f"{head} {p.note}", flush=True)
        else:
            print(f"{head} {p.note or 'running'} -> {p.output_dir} (log: {p.output_dir / LOG_FILE})", flush=True)
            ok, seconds = launch(p)
            print(f"{head} {'done' if ok else 'FAILED'} in {duration(seconds)}", flush=True)
            if not ok:
                print(_tail(p.output_dir / LOG_FILE), flush=True)
            record.update(ok=ok, process_seconds=round(seconds, 1))
        done.append(record)
        data = read_metrics(p.output_dir)
        if data is not None and finished(data):  # a run that failed after its last validation still has its result
            runs.append((p.output_dir, data))
    return runs, done


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m medseg_peft.compare", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any other --key value is a bundle setting, passed to every run.")
    ap.add_argument("--config_file", help="the task bundle (or a MONAI list of files) each method's layer is appended to")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated layers of bundles/methods/ (default {DEFAULT_METHODS})")
    ap.add_argument("--collect", metavar="FOLDER", help="only collect the finished runs below FOLDER; run nothing")
    ap.add_argument("--output_dir", help="a subfolder per method here (default: each bundle's own runs/<task>_<method>)")
    ap.add_argument("--meta_file", help="default: the task's metadata beside the config (organ_metadata.json, ...)")
    ap.add_argument("--logging_file", help="default: logging.conf beside the config")
    ap.add_argument("--out", help="where comparison.json and comparison.png go (default: the run folders' common parent)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser().parse_known_args(argv)
    try:
        if args.collect is not None:
            if rest or args.config_file:
                raise CompareError("--collect runs nothing: it takes no config file or bundle settings")
            runs, unreadable = collect(Path(args.collect))
            report(runs, args.out, [], argv, unreadable)
            if unreadable:
                print(f"medseg_peft.compare: {_unreadable_files(unreadable)}: no comparison written; fix or delete "
                      f"{'that file' if len(unreadable) == 1 else 'those files'} (a deleted one's run is then left out)",
                      file=sys.stderr)
                return 1
            return 0
        if not args.config_file:
            raise CompareError("give --config_file (the task bundle), or --collect FOLDER")
        files = config_files(args.config_file)
        layers = method_layers(files)
        names = methods(args.methods, layers)
        settings = overrides(rest)
        meta = args.meta_file or beside(files, TASK_METADATA.get(Path(files[0]).name, "metadata.json"))
        logging_file = args.logging_file or beside(files, "logging.conf")
        run_args = [a for flag, value in (("--meta_file", meta), ("--logging_file", logging_file)) if value for a in (flag, value)]
        planned = plan(files, names, layers, settings, run_args, args.output_dir)
        runs, done = run_all(planned)
        failed = [f"{p['method']} ({p['run']}/{LOG_FILE})" for p in done if not p.get("ok", True)]
        if not runs:
            raise CompareError(f"no run finished: {', '.join(failed)}")
        report(runs, args.out, done, argv)
        if failed:
            print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    except CompareError as err:
        print(f"medseg_peft.compare: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medseg_peft.compare: interrupted; the same command resumes (finished runs are not re-run)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
