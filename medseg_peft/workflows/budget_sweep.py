"""SPT's per-task budget: train on the validation protocol at each budget, keep the best validation top-1.

SPT (He et al., ICCV 2023) reports each task at the budget (0.2, 0.4, 0.6 or 0.8 M parameters) that scored
best on validation (the authors' answer in ziplab/SPT issue #1; its scripts loop over the
``param_req_<budget>.pth`` files). This runs the classify bundle once per budget with ``split_mode="val"``
(train800 -> val200 for VTAB, train -> val for FGVC), each in its own folder, picks the budget whose run
reached the highest validation top-1 (the smaller budget on a tie), and writes it to the bundle's
``budget_file``: the file the final ``split_mode="test"`` run reads its default ``budget`` from.

    python -m medseg_peft.workflows.budget_sweep --config_file bundles/classify/classify.json bundles/base.json bundles/methods/spt.json \\
        --budgets 200000,400000,600000,800000 --task dtd --data_root /data/vtab-1k --pretrained ViT-B_16.npz
    python -m monai.bundle run --config_file "['bundles/classify/classify.json','bundles/base.json','bundles/methods/spt.json']" \\
        --task dtd --data_root /data/vtab-1k --pretrained ViT-B_16.npz       # reads the chosen budget

Every option after ``--budgets`` is a bundle override, as ``monai.bundle run`` takes them. A budget whose
run finished earlier is not trained again (its folder's checkpoint says so), so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
from pathlib import Path
from typing import Sequence

from medseg_peft.io import atomic_write_json
from medseg_peft.workflows.report import METRICS_FILE

log = logging.getLogger("medseg_peft")

SPT_BUDGETS = (200_000, 400_000, 600_000, 800_000)


def validation_top1(run_dir: str | Path) -> float:
    """The best validation top-1 of a finished run after tuning began (its metrics.json)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run at this budget did not validate")
    data = json.loads(path.read_text())
    kept = (data.get("best_each") or {}).get("top1")
    if kept is not None:
        return float(kept["value"])
    tuned = [h["top1"] for h in data.get("history", []) if h.get("epoch", 0) > 0 and "top1" in h]
    if not tuned:
        raise ValueError(f"{path} holds no validation after training: the run at this budget did not train")
    return float(max(tuned))


def choose(scores: dict[int, float]) -> int:
    """The budget of the highest score; the smallest such budget on a tie (fewer parameters for the same accuracy)."""
    return max(sorted(scores), key=lambda b: (scores[b], -b))


def _workflow(config_file: Sequence[str], meta_file, logging_file, **overrides):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(config_file=list(config_file), meta_file=meta_file, logging_file=logging_file, workflow_type=None, **overrides)


def sweep(config_file: str | Sequence[str], budgets: Sequence[int] = SPT_BUDGETS, meta_file: str | None = None,
          logging_file: str | bool | None = None, **overrides) -> dict:
    """Run the bundle at each budget on the validation protocol; write and return the choice (``budget_file``'s content).

    ``overrides`` are bundle keys (``task``, ``data_root``, ``epochs``, ``output_dir``, ...). The runs go to
    ``<output_dir>/budget_<b>`` (``output_dir`` as the bundle names the validation run); the choice goes to
    the bundle's ``budget_file``, which the test run reads.
    """
    files = [config_file] if isinstance(config_file, (str, Path)) else list(config_file)
    budgets = [int(b) for b in budgets]
    if not budgets or any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"budgets must be distinct positive parameter counts, got {budgets}")
    for key in ("budget", "split_mode"):
        if key in overrides:
            raise ValueError(f"the sweep sets {key!r} itself (each budget, on split_mode 'val'); do not pass it")
    overrides = {**overrides, "split_mode": "val"}
    parser = _workflow(files, meta_file, False, **overrides).parser
    method, base = parser.get_parsed_content("method"), Path(parser.get_parsed_content("output_dir"))
    target, task = Path(parser.get_parsed_content("budget_file")), parser.get_parsed_content("recipe")["task"]
    if method != "spt":
        raise ValueError(f"the budget sweep is SPT's protocol, but the bundle's method is {method!r}: add bundles/methods/spt.json")
    scores, runs = {}, {}
    for budget in budgets:
        run_dir = base / f"budget_{budget}"
        log.info("budget sweep %s: budget %d on split_mode val -> %s", task, budget, run_dir)
        wf = _workflow(files, meta_file, logging_file, **{**overrides, "budget": budget, "output_dir": str(run_dir)})
        wf.initialize()
        try:
            wf.run()
        finally:
            wf.finalize()
        scores[budget], runs[budget] = validation_top1(run_dir), str(run_dir)
        log.info("budget sweep %s: budget %d reached validation top-1 %.2f", task, budget, scores[budget])
    best = choose(scores)
    chosen = {"task": task, "method": method, "budget": best, "metric": "top1", "split_mode": "val",
              "scores": {str(b): s for b, s in scores.items()}, "runs": {str(b): r for b, r in runs.items()}}
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(chosen, target)
    log.info("budget sweep %s: chose budget %d (validation top-1 %.2f of %s); wrote %s", task, best, scores[best],
             {b: round(s, 2) for b, s in scores.items()}, target)
    print(f"{task}: budget {best:,} (validation top-1 {scores[best]:.2f}); written to {target}", flush=True)
    return chosen


def _value(text: str):
    """A command-line value as ``monai.bundle run`` (python-fire) reads it: a Python literal, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict]:
    p = argparse.ArgumentParser(prog="python -m medseg_peft.workflows.budget_sweep", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Other --key value pairs are bundle overrides (e.g. --task dtd --data_root /data/vtab-1k).")
    p.add_argument("--config_file", nargs="+", required=True, help="the bundle and its layers, e.g. bundles/classify/classify.json bundles/base.json bundles/methods/spt.json")
    p.add_argument("--budgets", default=",".join(str(b) for b in SPT_BUDGETS), help="comma-separated parameter counts (default: SPT's 0.2-0.8 M)")
    p.add_argument("--meta_file", default=None)
    p.add_argument("--logging_file", default=None)
    args, rest = p.parse_known_args(argv)
    if len(args.config_file) == 1 and args.config_file[0].lstrip().startswith("["):
        args.config_file = list(ast.literal_eval(args.config_file[0]))  # the "['a.json','b.json']" form monai.bundle takes
    try:
        args.budgets = [int(float(b)) for b in str(args.budgets).split(",") if b.strip()]
    except ValueError:
        p.error(f"--budgets takes comma-separated numbers, got {args.budgets!r}")
    overrides, i = {}, 0
    while i < len(rest):
        key = rest[i]
        if not key.startswith("--"):
            p.error(f"expected a --key value override, got {key!r}")
        key, eq, value = key[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                p.error(f"override --{key} has no value")
            i, value = i + 1, rest[i + 1]
        overrides[key] = _value(value)
        i += 1
    return args, overrides


def main(argv: Sequence[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    return sweep(args.config_file, args.budgets, meta_file=args.meta_file, logging_file=args.logging_file, **overrides)


if __name__ == "__main__":
    main()
