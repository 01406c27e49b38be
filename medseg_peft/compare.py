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
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The command's pieces (kept out of the docstring, which is the --help text): medseg_peft.comparison's inputs
# (arguments checked), plan (each method's folder, command and action), run_metrics (reading a run folder) and
# table (rows, table, comparison files). Here: the command line, and launching the runs.
from medseg_peft.comparison.inputs import (
    DEFAULT_METHODS,
    CompareError,
    beside,
    config_files,
    method_layers,
    methods,
    overrides,
)
from medseg_peft.comparison.plan import Planned, plan
from medseg_peft.comparison.run_metrics import LOG_FILE, finished, read_metrics
from medseg_peft.comparison.table import collect, report, unreadable_files
from medseg_peft.workflows.charts import duration

__all__ = ["CompareError", "launch", "main", "method_layers", "overrides", "plan", "run_all"]


# ---- launching ---------------------------------------------------------------------------------
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


# ---- command line ------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m medseg_peft.compare", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Any other --key value is a bundle setting, passed to every run.")
    ap.add_argument("--config_file", help="the task bundle (or a MONAI list of files) each method's layer is appended to")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated layers of bundles/methods/ (default {DEFAULT_METHODS})")
    ap.add_argument("--collect", metavar="FOLDER", help="only collect the finished runs below FOLDER; run nothing")
    ap.add_argument("--output_dir", help="a subfolder per method here (default: each bundle's own runs/<task>_<method>)")
    ap.add_argument("--meta_file", help="default: metadata.json beside the config (each task's folder has its own)")
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
                print(f"medseg_peft.compare: {unreadable_files(unreadable)}: no comparison written; fix or delete "
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
        meta = args.meta_file or beside(files, "metadata.json")
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
