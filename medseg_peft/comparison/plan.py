"""Planning a comparison: each method's run folder, command and action (run, resume or skip), decided before any run starts.

A folder holding a run made with other settings (or more epochs than asked) stops the command here, since
re-running there would either be refused by the bundle or report the old result under the new settings.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from medseg_peft.comparison.inputs import CompareError
from medseg_peft.comparison.run_metrics import finished, read_metrics

HOW_NOT_WHAT = {"device", "processes"}  # settings that change how a run computes, not what it computes


@dataclass
class Planned:
    method: str
    output_dir: Path
    command: list[str]
    action: str  # "run", "resume" or "skip"
    note: str = ""


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
