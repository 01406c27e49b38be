"""The task bundles share one trainer / checkpoint skeleton, ``bundles/base.json``, and each default selector is a method layer.

``organ_fps.json`` and ``classify.json`` run as ``[<task>.json, base.json, ...]``: the task first, so MONAI finds
the task's own ``metadata.json`` and ``logging.conf`` beside it; the two files share no key, so neither
overrides the other, and base.json's nested keys (``train#trainer``) go into the task's sections. ``polyp_fps.json`` is the front door and must run alone, so it
holds base.json's keys itself; this test keeps them equal, key by key.
"""

from __future__ import annotations

import json

import pytest
from monai.bundle import ConfigParser

from conftest import BUNDLES, CLASSIFY, ORGAN, bundle_files

BASE = json.loads((BUNDLES / "base.json").read_text())


def _has(config: dict, key: str) -> bool:
    node = config
    for part in key.split("#"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("task", ["organ/organ_fps.json", "classify/classify.json"])
def test_a_task_bundle_sets_none_of_the_base_keys_and_holds_what_they_go_into(task):
    config = json.loads((BUNDLES / task).read_text())
    overlap = [key for key in BASE if _has(config, key)]
    assert not overlap, f"{task} repeats base.json's {overlap}"
    parents = {key.rsplit("#", 1)[0] for key in BASE if "#" in key}
    assert all(_has(config, parent) for parent in parents)  # base.json's "train#trainer" goes into the task's "train"


def test_the_front_door_holds_base_json_key_by_key():
    polyp = ConfigParser(json.loads((BUNDLES / "polyp_fps.json").read_text()))
    for key, value in BASE.items():
        assert polyp[key] == value, f"polyp_fps.json#{key} differs from base.json"


@pytest.mark.parametrize("layers", [ORGAN, CLASSIFY])
def test_task_and_base_merge_into_one_complete_bundle(layers):
    merged = ConfigParser.load_config_files(bundle_files(layers))
    task = json.loads((BUNDLES / layers[0]).read_text())
    assert merged["train"]["trainer"] == BASE["train#trainer"] and merged["train"]["dataset"] == task["train"]["dataset"]
    assert {key for key in merged} == {key for key in task} | {key for key in BASE if "#" not in key}


@pytest.mark.parametrize("task,method", [("polyp_fps.json", "fps"), ("organ/organ_fps.json", "fps"), ("classify/classify.json", "gps")])
def test_each_default_selector_is_its_method_layer(task, method):
    config = json.loads((BUNDLES / task).read_text())
    assert config["selector"] == json.loads((BUNDLES / "methods" / f"{method}.json").read_text())["selector"]
