"""The exported bundle's training configs: ``configs/train.json`` and ``configs/multi_gpu_train.json``.

MONAI Label's ``monaibundle`` app trains any bundle folder with ``configs/train.json`` (its
``BundleTrainTask``): it overrides ``bundle_root``, ``train#trainer#max_epochs``, ``train#dataset#data``,
``validate#dataset#data`` (datastore items ``{"image", "label"}``), ``device``, ``train#handlers`` (the
config's own list, with a ``CheckpointLoader`` of ``models/model.pt`` into ``@network`` put first) and
``displayable_configs`` (the values picked in its train panel), then runs only the ``run`` list.

``train.json`` is the task's own training bundle, ``organ/organ_fps.json`` with ``base.json``, flattened,
with the run's settings written in as values and the changes a round needs (``label_loop``): the data
from those overrides, the network built from ``models/model.pt``, a fresh ``rounds/round_<N>`` run folder,
the method, k and learning rate read from ``displayable_configs`` (the learning rate a tenth of the run's:
:data:`ROUND_LR_SCALE`), and the whole round in ``run``.
Rounds need medseg-peft where MONAI Label runs; inference does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"  # package data
TASK_LAYERS = ("organ/organ_fps.json", "base.json")
MULTI_GPU_LAYER = "multi_gpu.json"
PANEL_METHODS = ("fps", "gps", "spt", "partial", "lora", "full", "random")  # the train panel's choice, the run's own first
# user keys of the organ bundle a round keeps at the run's values (a setting the round changes is not here)
KEPT_SETTINGS = ("rank", "budget", "strategy", "angle_top", "weight_decay", "warmup_epochs", "seed", "val_interval",
                 "slices_per_volume", "background_ratio", "sw_batch_size", "amp", "checkpointing", "base_dtype", "num_workers",
                 "cache_rate", "select_batches", "intensity", "spacing", "channel", "prompt", "activation")
LOOP = "medseg_peft.workflows.label_loop"
# A round continues training a tuned model on the few volumes of a datastore: at the run's own learning rate,
# rounds on 3 new synthetic volumes lowered held-out Dice from 0.455 to 0.36-0.39; at a tenth they kept it
# within 0.02 and, with the run's 12 volumes in the datastore too, raised it to 0.47 (docs/slicer.md)
ROUND_LR_SCALE = 0.1


def train_config(network_settings: Mapping, class_names: Mapping, settings: Mapping) -> dict:
    """``configs/train.json``. ``network_settings``: the exported ``network_def``'s arguments (variant, sizes);
    ``settings``: the run's values of the organ bundle's keys (``method``, ``k``, ``lr``, ``epochs``,
    ``volumes_per_batch`` and :data:`KEPT_SETTINGS`)."""
    from monai.bundle import ConfigParser

    missing = [k for k in ("method", "k", "lr", "epochs", "volumes_per_batch", *KEPT_SETTINGS) if k not in settings]
    if missing:
        raise KeyError(f"the training settings to export lack {missing}")
    parser = ConfigParser(ConfigParser.load_config_files([str(BUNDLES / name) for name in TASK_LAYERS]))
    config = parser.get()
    for key in ("export", "export_dir", "dataset_dir", "synthetic_volumes", "classes"):
        config.pop(key, None)
    config["imports"] = [*config["imports"], f"$import {LOOP} as loop"]
    for key in KEPT_SETTINGS:
        config[key] = settings[key]
    method = str(settings["method"]).lower()
    config.update({
        "bundle_root": ".",
        "displayable_configs": {
            "method": [method, *(m for m in PANEL_METHODS if m != method)],
            "k": int(settings["k"]),
            "lr": float(settings["lr"]) * ROUND_LR_SCALE,
        },
        "method": "$loop.option(@displayable_configs#method)",
        "k": "$loop.option(@displayable_configs#k)",
        "lr": "$loop.option(@displayable_configs#lr)",
        "selector": {"_target_": f"{LOOP}.round_selector", "method": "@method", "k": "@k", "rank": "@rank", "budget": "@budget",
                     "strategy": "@strategy", "angle_top": "@angle_top", "task_loss": "@task_loss", "gps_loss": "@gps_loss",
                     "amp": "@use_amp", "seed": "@seed"},
        "class_labels": {str(int(k)): str(v) for k, v in class_names.items()},
        "data": "$loop.round_data(@train#dataset#data, @validate#dataset#data, @class_labels, channel=@channel)",
        "sam_checkpoint": None,
        "network_settings": dict(network_settings),
        "network_def": "$loop.saved_network(@bundle_root + '/models/model.pt', **@network_settings)",
        "output_dir": "$loop.start_round(@bundle_root)",
        "max_epochs": int(settings["epochs"]),
        "epochs": "@train#trainer#max_epochs",
        # a datastore starts with one to three volumes: a batch never asks for more volumes than a process gets
        "volumes_per_batch": f"$max(1, min({int(settings['volumes_per_batch'])}, len(@train#dataset#data) // wf.world_size()))",
        "initialize": [],
        "run": [
            "$@start_run",
            "$@data",
            "$wf.train(@train#trainer, @validate#evaluator, @report, @checkpoints)",
            "$loop.finish_round(@network, @network_settings, @output_dir, @bundle_root, validated=bool(@validate#dataset#data), method=@method)",
            "$wf.end_run(@output_dir)",
            "$loop.end_round(@bundle_root)",
        ],
        "finalize": [],
    })
    config["train"]["dataset"]["data"] = []
    config["validate"]["dataset"]["data"] = []
    config["train"]["handlers"] = [{
        "_target_": f"{LOOP}.RoundHandlers", "lr_scheduler": "@lr_scheduler", "validator": "@validate#evaluator",
        "val_interval": "@val_interval", "output_dir": "@output_dir", "validate": "$bool(@validate#dataset#data)",
    }]
    return config


def multi_gpu_train_config() -> dict:
    """``configs/multi_gpu_train.json``: the task's multi-GPU layer, with the process group started in
    ``initialize`` (MONAI Label's ``torchrun`` runs all three lists there) and the round itself in ``run``."""
    import json

    layer = json.loads((BUNDLES / MULTI_GPU_LAYER).read_text())
    layer["initialize"] = ["$wf.init_distributed(@torch_device)",
                           "$wf.check_shardable(@validate#dataset, 'validation') if @validate#dataset#data else None"]
    layer["finalize"] = ["$wf.destroy_distributed()"]
    return layer
