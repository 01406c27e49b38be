"""The classification protocols of the reference scripts: SPT's FGVC transforms, GPS's selection views,
GPS's autocast dtype, raw and EMA top-1 in metrics.json, SPT's per-task budget sweep."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from medseg_peft.workflows.classify import classification_recipe, classification_transforms

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def steps(compose) -> list[str]:
    return [type(t).__name__ for t in compose.transforms]


@pytest.mark.parametrize("size, squash", [(224, 256), (32, 36), (384, 438)])
def test_spt_fgvc_transforms_squash_then_crop(size, squash):
    """ziplab/SPT lib/datasets.py build_transform (no --direct_resize): Resize((256, 256), bicubic), RandomCrop 224
    + flip 0.5 for training, CenterCrop 224 for evaluation, ImageNet mean / std; 256/224 of other input sizes."""
    recipe = classification_recipe("cub", "spt")
    assert recipe["transforms"] == "spt_fgvc" and recipe["label_smoothing"] == 0.0
    train = classification_transforms(recipe, train=True, image_size=size)
    evaluation = classification_transforms(recipe, train=False, image_size=size)
    assert steps(train) == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert steps(evaluation) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    for resize in (train.transforms[0], evaluation.transforms[0]):
        assert resize.size == (squash, squash)
        assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert train.transforms[1].size == (size, size) and train.transforms[1].padding is None
    assert train.transforms[2].p == 0.5 and evaluation.transforms[1].size == (size, size)
    for t in (train, evaluation):
        assert (tuple(t.transforms[-1].mean), tuple(t.transforms[-1].std)) == IMAGENET
    assert train(Image.new("RGB", (50, 40))).shape == (3, size, size) == evaluation(Image.new("RGB", (50, 40))).shape


def test_gps_fgvc_transforms_are_unchanged():
    recipe = classification_recipe("cub", "gps")
    assert recipe["transforms"] == "fgvc"
    train = classification_transforms(recipe, train=True)
    assert steps(train) == ["RandomChoice", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert all(isinstance(c, T.RandomResizedCrop) and c.size == (224, 224) and c.scale == (0.08, 1.0) for c in train.transforms[0].transforms)
    evaluation = classification_transforms(recipe, train=False)
    assert steps(evaluation) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert evaluation.transforms[0].size == 248 and evaluation.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    assert tuple(train.transforms[-1].mean) == (0.5, 0.5, 0.5) == tuple(evaluation.transforms[-1].std)
    # SPT's VTAB transform stays the bicubic squash
    assert steps(classification_transforms(classification_recipe("dtd", "spt"), train=True)) == ["Resize", "ToTensor", "Normalize"]


def test_spt_fgvc_sensitivity_reads_train_images_through_the_training_transform(tmp_path):
    """SPT's JSONDataset builds the "train" split with the training transform, and its sensitivity pass reads that split."""
    from monai.bundle import ConfigWorkflow

    from conftest import BUNDLES, CLASSIFY, bundle_files
    from test_classification_runner import fake_fgvc

    fake_fgvc(tmp_path)
    wf = ConfigWorkflow(config_file=bundle_files([*CLASSIFY, "methods/spt.json"]), meta_file=str(BUNDLES / "classify" / "metadata.json"),
                        logging_file=False, workflow_type=None, output_dir=str(tmp_path / "run"), num_workers=0, task="flowers",
                        data_root=str(tmp_path), image_size=32)
    transform = wf.parser.get_parsed_content("select#dataloader").dataset.transform
    assert steps(transform) == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert steps(wf.parser.get_parsed_content("train#preprocessing")) == steps(transform)
    assert steps(wf.parser.get_parsed_content("validate#preprocessing")) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]


@pytest.mark.parametrize("task, modes", [("cub", {T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC}), ("dtd", {T.InterpolationMode.BICUBIC})])
def test_gps_selection_views_interpolate_as_the_training_crop(task, modes):
    """FightingFighting/GPS train_gps.py: the two-crop transform gets args.train_interpolation ("random") for FGVC;
    VTAB's --no-aug falls back to the model's bicubic."""
    views = classification_transforms(classification_recipe(task), train=True, views=2, image_size=32)
    crop = views.view.transforms[0]
    crops = crop.transforms if isinstance(crop, T.RandomChoice) else [crop]
    assert all(isinstance(c, T.RandomResizedCrop) and c.scale == (0.08, 1.0) for c in crops)
    assert {c.interpolation for c in crops} == modes and len(crops) == len(modes)
    assert steps(views.view)[1:] == ["RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "ToTensor", "Normalize"]
    a, b = views(Image.new("RGB", (50, 40)))
    assert a.shape == b.shape == (3, 32, 32)


def test_gps_amp_dtype_is_validated_and_recorded():
    import medseg_peft as mp

    assert mp.GPS(k=1).amp_dtype == "float16"  # torch.cuda.amp.autocast's dtype in the reference's selection pass
    assert mp.GPS(k=1, amp=True, amp_dtype="bfloat16").hparams()["amp_dtype"] == "bfloat16"
    assert mp.GPS(k=1, amp=True).hparams()["amp"] is True
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        mp.GPS(k=1, amp_dtype="fp16")


def dtype_recording_loss(seen: list):
    import torch.nn.functional as F

    def loss(out, y):
        seen.append(out.dtype)
        return F.cross_entropy(out.float(), y)

    return loss


def test_gps_selection_on_cpu_is_not_autocast(vit, vit_batches):
    import medseg_peft as mp

    seen: list = []
    sel = mp.GPS(k=1, loss=dtype_recording_loss(seen), amp=True).select(vit, vit_batches)
    assert seen and set(seen) == {torch.float32} and sel.num_trainable > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast of the selection pass is CUDA only")
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_gps_selection_autocasts_to_the_chosen_dtype_on_cuda(vit, vit_batches, amp_dtype):
    import medseg_peft as mp

    seen: list = []
    vit = vit.cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in vit_batches]
    mp.GPS(k=1, loss=dtype_recording_loss(seen), amp=True, amp_dtype=amp_dtype).select(vit, batches)
    assert set(seen) == {getattr(torch, amp_dtype)}
    assert all(p.dtype == torch.float32 for p in vit.parameters())


def test_run_report_keeps_each_metrics_own_best(tmp_path):
    """The raw weights may peak at another epoch than their EMA: each best is kept with its epoch, the zero-shot
    score is no candidate, ties keep the earliest epoch, and ``best`` stays the key metric's entry."""
    from types import SimpleNamespace

    from medseg_peft.workflows.report import RunReport

    trainer = SimpleNamespace(state=SimpleNamespace(epoch=0))
    report = RunReport(tmp_path, torch.nn.Linear(2, 2), trainer, key_metric="top1", best_each=["top1", "top1_raw"])
    for epoch, ema, raw in [(0, 90.0, 90.0), (1, 40.0, 60.0), (2, 50.0, 55.0), (3, 50.0, 60.0)]:
        trainer.state.epoch = epoch
        report.on_validation(SimpleNamespace(state=SimpleNamespace(metrics={"top1": ema, "top1_raw": raw})))
    assert report.data["best_each"] == {"top1": {"epoch": 2, "value": 50.0}, "top1_raw": {"epoch": 1, "value": 60.0}}
    assert report.data["best"]["epoch"] == 0  # the untuned model stays the best result file's candidate

    assert json.loads((tmp_path / "metrics.json").read_text())["best_each"] == report.data["best_each"]


def fake_vtab_splits(root, task="dtd", n_train=16, n_val=8, n_test=8):
    """A VTAB-1k task folder with all four split files (the sweep trains train800 and validates val200)."""
    import numpy as np

    from medseg_peft.recipes import load_recipe

    folder = root / load_recipe(task)["folder"]
    rng = np.random.default_rng(0)
    lines = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / rel)
            lines[split].append(f"{rel} {i % 3}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return folder


def test_budget_sweep_writes_the_best_validation_budget_and_the_test_run_reads_it(tmp_path, monkeypatch):
    from conftest import CLASSIFY, bundle_files, run_workflow
    from medseg_peft.models.vit import build_vit
    from medseg_peft.workflows.budget_sweep import choose, main, validation_top1

    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path / "cache"))
    fake_vtab_splits(tmp_path)
    pretrained = tmp_path / "tiny.pth"
    torch.save(build_vit("demo", 10).state_dict(), pretrained)
    common = dict(task="dtd", data_root=str(tmp_path), arch="demo", pretrained=str(pretrained), image_size=32, epochs=1,
                  cooldown_epochs=0, batch_size=8, num_workers=0, budget_file=str(tmp_path / "val" / "budget.json"))
    layers = [*CLASSIFY, "methods/spt.json"]
    argv = ["--config_file", *bundle_files(layers), "--budgets", "2000,6000", "--output_dir", str(tmp_path / "val")]
    chosen = main(argv + [f"--{key}={value}" for key, value in common.items()])  # the command line, in process
    written = json.loads((tmp_path / "val" / "budget.json").read_text())
    assert written == chosen and written["task"] == "dtd" and written["method"] == "spt"
    scores = {b: validation_top1(tmp_path / "val" / f"budget_{b}") for b in (2_000, 6_000)}
    assert written["scores"] == {str(b): s for b, s in scores.items()} and written["budget"] == choose(scores)
    for b in (2_000, 6_000):
        metrics = json.loads((tmp_path / "val" / f"budget_{b}" / "metrics.json").read_text())
        assert metrics["settings"]["split_mode"] == "val" and metrics["settings"]["selector"]["budget"] == b
    run_workflow(layers, output_dir=str(tmp_path / "test"), **common)  # the final run: split_mode test, no --budget
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert metrics["settings"]["split_mode"] == "test" and metrics["settings"]["selector"]["budget"] == written["budget"]


def test_budget_choice_file_and_command_line(tmp_path, caplog):
    import logging

    from medseg_peft.workflows.budget_sweep import choose, parse_args
    from medseg_peft.workflows.classify import classification_budget

    assert choose({200_000: 70.0, 400_000: 72.5, 600_000: 72.0}) == 400_000
    assert choose({800_000: 72.5, 400_000: 72.5, 200_000: 10.0}) == 400_000  # a tie: the fewer parameters
    recipe = classification_recipe("dtd", "spt")
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        assert classification_budget(recipe, str(tmp_path / "none.json"), "spt") == recipe["budget"] == 400_000
    assert "the recipe's" in caplog.text
    (tmp_path / "budget.json").write_text(json.dumps({"task": "dtd", "method": "spt", "budget": 600_000, "scores": {"600000": 71.0}}))
    with caplog.at_level(logging.INFO, logger="medseg_peft"):
        assert classification_budget(recipe, str(tmp_path / "budget.json"), "spt") == 600_000
    assert "chosen on validation" in caplog.text
    with pytest.raises(ValueError, match="chosen for task 'dtd', not 'cifar100'"):
        classification_budget(classification_recipe("cifar100", "spt"), str(tmp_path / "budget.json"), "spt")
    args, overrides = parse_args(["--config_file", "bundles/classify/classify.json", "bundles/methods/spt.json", "--budgets", "2e5,400000",
                                  "--task", "dtd", "--epochs=3", "--data_root", "/data/vtab-1k"])
    assert args.config_file == ["bundles/classify/classify.json", "bundles/methods/spt.json"] and args.budgets == [200_000, 400_000]
    assert overrides == {"task": "dtd", "epochs": 3, "data_root": "/data/vtab-1k"}
    args, _ = parse_args(["--config_file", "['bundles/classify/classify.json','bundles/methods/spt.json']"])
    assert parse_args(["--config_file", "a.json", "--budget", "5"])[1] == {"budget": 5}  # no abbreviation of --budgets
    assert args.config_file == ["bundles/classify/classify.json", "bundles/methods/spt.json"] and args.budgets == [200_000, 400_000, 600_000, 800_000]
    from conftest import CLASSIFY, bundle_files
    from medseg_peft.workflows.budget_sweep import sweep

    with pytest.raises(ValueError, match="SPT's protocol"):
        sweep(bundle_files(CLASSIFY), [1_000], output_dir=str(tmp_path / "gps"))
    with pytest.raises(ValueError, match="sets 'budget' itself"):
        sweep(bundle_files([*CLASSIFY, "methods/spt.json"]), [1_000], budget=5)
    assert not (tmp_path / "gps").exists()
