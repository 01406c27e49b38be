"""Training rounds of an exported bundle, as MONAI Label's ``BundleTrainTask`` runs ``configs/train.json``.

The loop in 3D Slicer is: label a few volumes, train, let the model label the next one, correct it, train
again. Each training request is one *round*, and a round:

1. locks ``<bundle>/rounds`` (a second round started while one runs is refused, naming the pid) and
   makes ``rounds/round_<N>``, its own run folder (``run.json``, selection, checkpoints, ``metrics.json``);
2. builds the network from ``models/model.pt``: the exported model in round 1, the previous round's
   merged model after that. MONAI Label also adds a ``CheckpointLoader`` of that file; it finds the same
   weights already there;
3. selects again on this round's data and base, then trains (the selection is recomputed each round:
   the base weights and the labelled volumes both changed, and FPS / GPS selection costs one pass);
4. merges the best delta (or the last epoch's, when no volume was left for validation) into the base
   and replaces ``models/model.pt`` atomically, so MONAI Label's infer task uses the new model with no
   change; the delta goes beside it as ``models/delta.safetensors``, ``model.ts`` is traced again, and the
   model the round started from stays in the round folder (``previous_model.pt``: copy it back to undo).

MONAI Label runs only the ``run`` list of a single-process round (no ``initialize`` / ``finalize``),
so the whole round lives there.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from medseg_peft.distributed import broadcast_object, is_distributed, is_main_process
from medseg_peft.io import atomic_write, atomic_write_json
from medseg_peft.workflows.run_folder import lock_output_dir, release_output_dir

log = logging.getLogger("medseg_peft")

ROUNDS_DIR = "rounds"
ROUND_FILE = "round.json"
MODEL_FILE, DELTA_FILE = "model.pt", "delta.safetensors"
PREVIOUS_MODEL = "previous_model.pt"  # in the round folder: the model the round started from


def option(value):
    """A ``displayable_configs`` value as a round uses it: MONAI Label shows a list as a choice whose first
    item is the default, and sends back the one picked; numbers typed in its panel may arrive as text."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty choice in displayable_configs")
        value = value[0]
    if isinstance(value, str):
        text = value.strip()
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text
    return value


def round_selector(method: str, **settings):
    """The selector of ``method`` with the settings it takes, out of every method's settings: the method is a
    choice in MONAI Label's train panel, so the round cannot know in advance which of them apply."""
    from medseg_peft.selection.registry import method_class, settings_of

    cls = method_class(method)
    takes = set(settings_of(cls))
    if "loss" in takes:
        settings["loss"] = settings.get("gps_loss") if cls.method == "gps" else settings.get("task_loss")
    return cls(**{k: v for k, v in settings.items() if k in takes})


def start_round(bundle_root: str | Path) -> str:
    """Lock ``<bundle_root>/rounds`` and make the next ``round_<N>`` folder; returns it (every rank gets rank 0's)."""
    rounds = Path(bundle_root) / ROUNDS_DIR
    out = None
    if is_main_process():
        lock_output_dir(rounds)
        done = [int(m.group(1)) for p in rounds.iterdir() if (m := re.fullmatch(r"round_(\d+)", p.name))]
        out = rounds / f"round_{max(done, default=0) + 1}"
        out.mkdir()
        log.info("training round %s of %s", out.name.split("_")[1], bundle_root)
    if is_distributed():
        out = broadcast_object(out)
    return str(out)


def end_round(bundle_root: str | Path) -> None:
    release_output_dir(Path(bundle_root) / ROUNDS_DIR)


def saved_network(model_file: str | Path, variant: str, image_size: int, **wrapper) -> nn.Module:
    """The bundle's network with ``model_file`` (a plain ``state_dict``) loaded strictly: the base of this round."""
    from medseg_peft.models.segmenter import sam_segmenter

    path = Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a round trains from the bundle's model; export the bundle again")
    network = sam_segmenter(variant, None, image_size, **wrapper)
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return network


def round_data(train: Sequence[Mapping], val: Sequence[Mapping] | None, classes: Mapping, channel: int | None = None) -> dict:
    """MONAI Label's datastore lists as a checked run's data: every pair readable, 3D, with known label values.

    ``val`` may be empty (a validation split of 0, or too few volumes to split): the round then trains and
    keeps its last epoch, and reports no score rather than one measured on nothing."""
    from medseg_peft.data.volume_checks import check_volume_pair, label_classes

    classes = {int(k): str(v) for k, v in dict(classes).items()}
    train, val = [dict(i) for i in train or []], [dict(i) for i in val or []]
    if not train:
        raise ValueError("no labelled volume to train on: label at least one volume in the datastore (val_split leaves the rest)")
    for item in train + val:
        missing = [k for k in ("image", "label") if not item.get(k)]
        if missing:
            raise ValueError(f"a datastore item lacks {missing}: {item}")
        check_volume_pair(item["image"], item["label"], classes=[0, *classes], channel=channel)
    if not any(label_classes(item["label"]) - {0} for item in train):
        raise ValueError(f"every training label is background only (e.g. {train[0]['label']}): no class {classes} appears")
    if not val:
        log.warning("no validation volume (val_split 0, or too few volumes): this round keeps its last epoch and reports no score")
    log.info("data: %d training and %d validation volumes from the MONAI Label datastore, classes %s", len(train), len(val), classes)
    return {"train": train, "val": val, "classes": classes, "source": f"MONAI Label datastore ({len(train) + len(val)} labelled volumes)"}


class RoundHandlers:
    """The task's training handlers, with validation only when the round has validation volumes.

    ``train#handlers`` is a list of components because MONAI Label inserts its ``CheckpointLoader`` there."""

    def __init__(self, lr_scheduler, validator, val_interval: int, output_dir: str | Path, validate: bool = True):
        self.lr_scheduler, self.validator, self.val_interval = lr_scheduler, validator, val_interval
        self.output_dir, self.validate = output_dir, bool(validate)

    def attach(self, engine) -> None:
        from medseg_peft.workflows.handlers import train_handlers

        for handler in train_handlers(self.lr_scheduler, self.validator if self.validate else None, self.val_interval, self.output_dir):
            handler.attach(engine)


def finish_round(network: nn.Module, network_def: Mapping, output_dir: str | Path, bundle_root: str | Path, validated: bool,
                 method: str = "") -> Path | None:
    """Merge the round's result into the base and put it in place as ``models/model.pt`` (rank 0)."""
    from medseg_peft.export import merged_network, trace_model
    from medseg_peft.tuning import save_tuned
    from medseg_peft.workflows.report import BEST_FILE

    if not is_main_process():
        return None
    out, models = Path(output_dir), Path(bundle_root) / "models"
    result = out / BEST_FILE
    if not validated:
        result = save_tuned(network, out / "last_delta.safetensors")
    elif not result.is_file():
        raise FileNotFoundError(f"{result} was not written: the round validated nothing")
    settings = dict(network_def)
    plain = saved_network(models / MODEL_FILE, **settings)  # the round's base, as it was before this round
    merged = merged_network(plain, result)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"the merged model of {out} has non-finite weights in {bad[:3]}: models/model.pt is left as it was")
    number, metrics = int(out.name.split("_")[1]), _metrics(out)
    change = f"training round {number} from MONAI Label ({method or metrics.get('method', '')}, rounds/{out.name})"
    # model.pt last: it is the file MONAI Label's infer task loads, and a failure before it leaves the previous model in use
    traced = trace_model(merged, bundle_root, version=f"0.1.{number}", change=change)
    atomic_write(out / PREVIOUS_MODEL, lambda tmp: shutil.copyfile(models / MODEL_FILE, tmp))  # to roll this round back
    atomic_write(models / DELTA_FILE, lambda tmp: shutil.copyfile(result, tmp))
    atomic_write(models / MODEL_FILE, lambda tmp: torch.save(state, tmp))
    summary = {"round": number, "method": method, "result": str(result.name), "validated": bool(validated),
               "zero_shot": metrics.get("zero_shot"), "best": metrics.get("best") if validated else None,
               "model": str(models / MODEL_FILE), "delta": str(models / DELTA_FILE), "model_ts": traced}
    atomic_write_json(summary, out / ROUND_FILE)
    best = summary["best"] or {}
    score = ("no validation volume, no score" if not validated else
             f"validation {_fmt(summary['zero_shot'])} at the round's start -> {_fmt(best)} at epoch {best.get('epoch', '-')}")
    print(f"round {summary['round']} done ({score}); models/model.pt now holds the merged result", flush=True)
    return models / MODEL_FILE


def _metrics(out: Path) -> dict:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(entry: dict | None) -> str:
    """The mean scores of a metrics entry (per-class scores stay in metrics.json)."""
    shown = [k for k in (entry or {}) if k in ("mDice", "mIoU", "top1")]
    return ", ".join(f"{k} {entry[k]:.4f}" for k in shown) or "n/a"


__all__ = ["RoundHandlers", "end_round", "finish_round", "option", "round_data", "round_selector", "saved_network", "start_round"]
