"""What MONAI Label training rounds do to an exported organ bundle, measured by a real server's own ``/infer``.

For each seed: the organ bundle trains on the synthetic set (seed S) and is exported; a MONAI Label server (the
app, server and request helpers of ``tests/test_monailabel_server.py``) gets the datastore's labels, and two
rounds are requested as the Train button does (``POST /train/<model>?run_sync=true``); after the export and after
each round, 3D Dice of the server's ``/infer`` labels on held-out volumes of the same generator (never seen by
the export run or the rounds). Prints a markdown table of means over seeds; ``--json`` keeps every number.

    PYTHONPATH=<where monailabel is> python benchmarks/label_loop_rounds.py --seeds 0 1 2 --export-epochs 40 \\
        --datastore new --lr-scale 0.1 --val-split 0.34

``--datastore new``: three new volumes; ``all``: the export run's twelve as well. ``--lr-scale`` multiplies the
train panel's default ``lr`` (already a tenth of the run's). Installing monailabel beside the environment:
docs/slicer.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import export_organ_bundle  # noqa: E402
from test_monailabel_server import APP_MAIN, NAME, Server, infer, put_label, train  # noqa: E402

CLASSES = {1: "liver", 2: "spleen", 3: "kidneys"}
TEST_IDS = range(12, 18)  # 12, 13: the export set's own test volumes; 14-17: further volumes of the generator
NEW_IDS = range(18, 21)  # the datastore's new cases


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for value, name in CLASSES.items():
        p, g = pred == value, truth == value
        denom = p.sum() + g.sum()
        out[name] = float(2 * (p & g).sum() / denom) if denom else float("nan")
    return out


def export(seed: int, root: Path, epochs: int) -> tuple[Path, Path]:
    """The exported bundle of a run on the synthetic set of ``seed``, and a labelled set of the same generator
    (volume i depends only on the seed and i, so its volumes 0-11 are the run's and 12-13 its test volumes)."""
    from medseg_peft.data.synthetic_organs import make_synthetic_organs

    bundle, cache = export_organ_bundle(root, epochs=epochs, image_size=64, synthetic_volumes=12, seed=seed)
    return bundle, make_synthetic_organs(cache, n_train=21, n_test=0, seed=seed)


def rounds(exported: Path, full: Path, root: Path, store_ids: list[int], request: dict, lr_scale: float) -> dict[str, float]:
    """Mean Dice over classes and held-out volumes: exported, after round 1, after round 2."""
    app, studies = root / "app", root / "studies"
    (app / "model").mkdir(parents=True)
    (app / "main.py").write_text(APP_MAIN)
    shutil.copytree(exported, app / "model" / NAME)
    studies.mkdir()
    test, store = [f"organs_{i:03d}" for i in TEST_IDS], [f"organs_{i:03d}" for i in store_ids]
    for stem in test + store:
        shutil.copy(full / "imagesTr" / f"{stem}.nii.gz", studies / f"{stem}.nii.gz")
    truth = {s: np.asanyarray(nib.load(full / "labelsTr" / f"{s}.nii.gz").dataobj) for s in test}
    scores = {}
    server = Server(app, studies, root / "server.log")
    try:
        panel = server.wait_ready()["trainers"][NAME]["config"]
        choice = {"method": panel["method"][0], "k": panel["k"], "lr": panel["lr"] * lr_scale}
        for stem in store:
            put_label(server, stem, full / "labelsTr" / f"{stem}.nii.gz")
        for stage in ("exported", "round 1", "round 2"):
            if stage != "exported":
                train(server, **request, **choice)
            per_volume = [dice(infer(server, s, root / f"{stage.replace(' ', '_')}_{s}.nii.gz"), truth[s]) for s in test]
            scores[stage] = float(np.mean([np.nanmean([v[c] for v in per_volume]) for c in CLASSES.values()]))
    finally:
        server.stop()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--export-epochs", type=int, default=40)
    ap.add_argument("--datastore", choices=("new", "all"), default="new")
    ap.add_argument("--lr-scale", type=float, default=1.0)
    ap.add_argument("--val-split", type=float, default=0.34)
    ap.add_argument("--round-epochs", type=int, default=10)
    ap.add_argument("--work", default="runs/label_loop_rounds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    store_ids = ([*range(12)] if args.datastore == "all" else []) + [*NEW_IDS]
    request = {"max_epochs": args.round_epochs, "val_split": args.val_split, "device": "cpu", "multi_gpu": False}
    results = []
    for seed in args.seeds:
        root = Path(args.work) / f"seed{seed}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        started = time.time()
        exported, full = export(seed, root, args.export_epochs)
        results.append({"seed": seed, **rounds(exported, full, root / "server", store_ids, request, args.lr_scale),
                        "seconds": time.time() - started})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"datastore {args.datastore}, lr x {args.lr_scale} of the panel's, val_split {args.val_split}, "
          f"{args.round_epochs} epochs per round, export after {args.export_epochs} epochs, seeds {args.seeds}\n")
    print("| model | mean Dice over classes (mean ± sd over seeds) |\n|---|---|")
    for stage in ("exported", "round 1", "round 2"):
        values = [r[stage] for r in results]
        print(f"| {stage} | {np.mean(values):.3f} ± {np.std(values):.3f} |")


if __name__ == "__main__":
    main()
