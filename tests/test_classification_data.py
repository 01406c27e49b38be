"""Classification path, first floor: the 24 recipes load and name their sources; VTAB-1k and FGVC layouts parse."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medseg_peft.data.classification_folders import fgvc_splits, vtab_split
from medseg_peft.recipes import CONFIG_DIR, FGVC_TASKS, VTAB_TASKS, benchmark_of, load_recipe


@pytest.mark.parametrize("task", VTAB_TASKS + FGVC_TASKS)
def test_every_recipe_loads_and_names_its_source(task):
    recipe = load_recipe(task)
    assert recipe["benchmark"] == benchmark_of(task) and recipe["num_classes"] >= 2
    gps = recipe["gps"]
    assert gps["optimizer"] == "adam" and gps["epochs"] + gps["cooldown_epochs"] == 110 and gps["seed"] == 42
    assert gps["k"] >= 1 and gps["lr"] > 0 and gps["batch_size"] in (16, 32, 64)
    assert (recipe["benchmark"] == "fgvc") == (gps["ema"] is not None)  # EMA only in the FGVC scripts
    text = (CONFIG_DIR / recipe["benchmark"] / f"{task}.yaml").read_text()
    # each file says where its numbers come from: the reference's real script folder, never a file outside the repository
    gps_folder = {"cifar100": "cifar_100", "cub": "cub_2011", "flowers": "oxford_flowers", "dogs": "stanford_dogs", "cars": "stanford_cars"}
    assert f"train_scripts/vit/{recipe['benchmark']}/{gps_folder.get(task, task)}/train_gps.sh" in text
    assert "research/" not in text and "methods.md" not in text and "../shared" not in text


def test_recipe_tables_match_the_published_counts():
    assert len(VTAB_TASKS) == 19 and len(FGVC_TASKS) == 5
    groups = [load_recipe(t)["group"] for t in VTAB_TASKS]
    assert groups.count("natural") == 7 and groups.count("specialized") == 4 and groups.count("structured") == 8
    assert load_recipe("patch_camelyon")["gps"]["k"] == 2 and load_recipe("nabirds")["gps"]["k"] == 20
    with pytest.raises(ValueError, match="unknown task 'imagenet'.*cifar100"):
        load_recipe("imagenet")


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_vtab_split_and_its_errors(tmp_path):
    for i in range(3):
        image(tmp_path / "images" / "train800" / f"{i:06d}.jpg")
    (tmp_path / "train800.txt").write_text("".join(f"images/train800/{i:06d}.jpg {i}\n" for i in range(3)))
    items = vtab_split(tmp_path, "train800", num_classes=3)
    assert [it["label"] for it in items] == [0, 1, 2] and items[2]["image"].endswith("000002.jpg")
    with pytest.raises(ValueError, match=r"outside 0\.\.1.*000002"):
        vtab_split(tmp_path, "train800", num_classes=2)
    (tmp_path / "test.txt").write_text("images/test/a.jpg 0\nimages/test/b.jpg 1\n")
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\) that do not exist.*a\.jpg"):
        vtab_split(tmp_path, "test")
    (tmp_path / "val200.txt").write_text("images/train800/000000.jpg cat\n")
    with pytest.raises(ValueError, match=r"val200\.txt:1"):
        vtab_split(tmp_path, "val200")
    with pytest.raises(FileNotFoundError, match="train800val200.txt"):
        vtab_split(tmp_path, "train800val200")


def test_fgvc_remaps_class_ids_over_all_splits(tmp_path):
    splits = {"train": {"images/a.jpg": 3, "images/b.jpg": 7}, "val": {"images/c.jpg": 3}, "test": {"images/d.jpg": 12}}
    for split, entries in splits.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(entries))
        for p in entries:
            image(tmp_path / p)
    out = fgvc_splits(tmp_path, num_classes=3)
    assert [it["label"] for it in out["train"]] == [0, 1] and out["test"][0]["label"] == 2
    with pytest.raises(ValueError, match="3 classes.*expects 200"):
        fgvc_splits(tmp_path, num_classes=200)
    (tmp_path / "images" / "d.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"test\.json names 1 image"):
        fgvc_splits(tmp_path)


def test_every_relative_link_in_the_documents_names_a_file_of_the_repository():
    """README.md and docs/*.md link only to files that exist inside the repository (a link to a file outside it, or to
    a moved or deleted one, is broken for every reader of the project)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    documents = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    links = [(doc, target) for doc in documents for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
             if not re.match(r"[a-z]+:", target) and not target.startswith("#")]  # web addresses and anchors aside
    assert links
    broken = [f"{doc.relative_to(root)}: {target}" for doc, target in links
              if not (path := (doc.parent / target.split("#")[0]).resolve()).exists() or root not in path.parents]
    assert not broken
