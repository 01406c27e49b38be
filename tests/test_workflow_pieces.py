"""Workflow pieces the bundles use: metrics, schedule, resumable tuned state."""

import math

import pytest
import torch

import medseg_peft as mp
from medseg_peft.workflows import TunedState, per_image_scores, select_or_resume, warmup_cosine


def _mask(rows):
    return torch.tensor(rows, dtype=torch.float32)[None]


def test_metrics_match_hand_computed_values():
    gt = torch.stack([
        _mask([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),  # 4 px
        _mask([[0] * 4] * 4),  # empty, predicted empty -> 1
        _mask([[0] * 4] * 4),  # empty, predicted non-empty -> 0
        _mask([[1, 0, 0, 0], [0] * 4, [0] * 4, [0] * 4]),  # missed entirely -> 0
    ])
    pred = torch.stack([
        _mask([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),  # TP 3, FP 1, FN 1
        _mask([[0] * 4] * 4),
        _mask([[0, 0, 0, 1], [0] * 4, [0] * 4, [0] * 4]),
        _mask([[0] * 4] * 4),
    ])
    s = per_image_scores(pred, gt)
    torch.testing.assert_close(s["dice"], torch.tensor([2 * 3 / (4 + 4), 1.0, 0.0, 0.0]))
    torch.testing.assert_close(s["iou"], torch.tensor([3 / 5, 1.0, 0.0, 0.0]))
    # mDice / mIoU: the mean over images
    assert math.isclose(float(s["dice"].mean()), (0.75 + 1) / 4)
    assert math.isclose(float(s["iou"].mean()), (0.6 + 1) / 4, rel_tol=1e-6)



def test_metrics_agree_with_torchmetrics():
    """An independent implementation (torchmetrics' F1 = Dice and Jaccard = IoU on the pixels of each image,
    an empty mask predicted empty scoring 1) against MONAI's per-image and per-class scores we report."""
    from torchmetrics.functional.classification import (
        binary_f1_score,
        binary_jaccard_index,
        multiclass_f1_score,
        multiclass_jaccard_index,
    )

    from medseg_peft.workflows.metrics import class_dice_metric, class_iou_metric

    g = torch.Generator().manual_seed(0)
    gt = (torch.rand(6, 1, 16, 16, generator=g) > 0.6).float()
    pred = (torch.rand(6, 1, 16, 16, generator=g) > 0.5).float()
    gt[4], pred[4] = 0, 0  # empty and predicted empty
    gt[5] = 0  # empty, predicted non-empty
    s = per_image_scores(pred, gt)
    dice = binary_f1_score(pred.flatten(1), gt.flatten(1).long(), multidim_average="samplewise", zero_division=1.0)
    iou = torch.stack([binary_jaccard_index(p.flatten(), t.flatten().long(), zero_division=1.0) for p, t in zip(pred, gt)])
    torch.testing.assert_close(s["dice"], dice)
    torch.testing.assert_close(s["iou"], iou)
    assert dice[4] == 1 and dice[5] == 0

    # organs: per class (background not scored) per volume, in 3D; class 3 absent from volume 1
    classes = 4
    label = torch.randint(0, 3, (2, 1, 6, 8, 8), generator=g)
    label[0, 0, :2] = 3
    guess = torch.where(torch.rand(label.shape, generator=g) > 0.3, label, torch.randint(0, 3, label.shape, generator=g))
    guess[1] = guess[1].clamp(max=2)  # class 3 absent from volume 1 and not predicted there: scores 1
    onehot = lambda x: torch.nn.functional.one_hot(x[:, 0], classes).movedim(-1, 1).float()  # noqa: E731
    dice = multiclass_f1_score(guess.flatten(1), label.flatten(1), classes, average="none", multidim_average="samplewise", zero_division=1.0)
    iou = torch.stack([multiclass_jaccard_index(p.flatten(), t.flatten(), classes, average="none", zero_division=1.0) for p, t in zip(guess, label)])
    torch.testing.assert_close(class_dice_metric()(onehot(guess), onehot(label)), dice[:, 1:])
    torch.testing.assert_close(class_iou_metric()(onehot(guess), onehot(label)), iou[:, 1:])
    assert dice[1, 3] == 1

def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=20, min_ratio=0.0)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[3] < lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.05


def test_select_or_resume_reattaches_the_saved_selection(vit, vit_batches, tmp_path):
    from conftest import tiny_vit

    first = select_or_resume(mp.GPS(k=2, loss="ce", seed=1), vit, vit_batches, tmp_path)
    masks = mp.tuning.tuning_state(first).selection.masks()
    with torch.no_grad():
        for p in mp.trainable_parameters(first):
            p.add_(0.01)
    state = TunedState(first).state_dict()
    # a second run with another seed would select differently; resuming must not select again
    again = select_or_resume(mp.GPS(k=2, loss="ce", seed=99), tiny_vit(), vit_batches[:1], tmp_path)
    again_masks = mp.tuning.tuning_state(again).selection.masks()
    assert masks.keys() == again_masks.keys() and all(torch.equal(masks[n], again_masks[n]) for n in masks)
    TunedState(again).load_state_dict(state)
    x = vit_batches[0][0]
    first.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(first(x), again(x))
    with pytest.raises(ValueError, match="made by 'gps'"):
        select_or_resume(mp.FPS(k=1), tiny_vit(), vit_batches, tmp_path)


def test_tuned_state_rejects_a_checkpoint_of_another_selection(vit, vit_batches):
    model = mp.FPS(k=1)(vit, vit_batches)
    with pytest.raises(ValueError, match="another run"):
        TunedState(model).load_state_dict({"nope": torch.zeros(1)})


def test_full_method_trains_everything(vit, vit_batches):
    model = mp.Full()(vit, vit_batches)
    assert all(p.requires_grad for p in model.parameters())
    assert len(mp.trainable_parameters(model)) == len(list(model.parameters()))
    assert set(TunedState(model).state_dict()) == set(model.state_dict())


def test_selector_by_name_refuses_settings_it_does_not_take():
    fps, gps, full = mp.selector("fps", k=3, seed=5), mp.selector("GPS", k=3, loss="ce"), mp.selector("full", seed=5)
    assert isinstance(fps, mp.FPS) and fps.k == 3 and fps.seed == 5
    assert isinstance(gps, mp.GPS) and gps.loss == "ce"
    assert isinstance(full, mp.Full) and full.seed == 5
    with pytest.raises(ValueError, match="unknown method 'adamix'; known methods"):
        mp.selector("adamix")
    with pytest.raises(TypeError, match=r"FPS \('fps'\) takes no setting\(s\) \['loss', 'rank'\]"):
        mp.selector("fps", k=3, loss="ce", rank=2)
    with pytest.raises(TypeError, match=r"takes no setting\(s\) \['lr'\]"):  # a misspelt or foreign setting
        mp.selector("lora", rank=2, lr=1e-3)
    lora = mp.selector("lora", rank=2, seed=5)
    assert isinstance(lora, mp.LoRA) and lora.rank == 2 and lora.seed == 5


def test_device_takes_cuda_n_and_refuses_what_this_machine_lacks(monkeypatch):
    from medseg_peft.workflows import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")
    else:
        monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))  # auto under torchrun: this process's GPU
        assert resolve_device("auto") == torch.device("cuda", torch.cuda.device_count() - 1)
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_the_multi_gpu_layer_keeps_the_device_asked_for(monkeypatch):
    from monai.bundle import ConfigParser

    from conftest import BUNDLES

    monkeypatch.setenv("LOCAL_RANK", "1")
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "polyp_fps.json"), str(BUNDLES / "multi_gpu.json")])
    parser["device"] = "cpu"
    assert parser.get_parsed_content("torch_device") == torch.device("cpu")
    if torch.cuda.device_count() > 1:
        parser["device"] = "cuda"
        assert parser.get_parsed_content("torch_device", lazy=False) == torch.device("cuda", 1)


@pytest.mark.parametrize("meta", ["metadata.json", "organ/metadata.json", "classify/metadata.json"])
def test_each_task_bundle_has_metadata_that_verifies(meta):
    import json

    from monai.bundle import verify_metadata

    from conftest import BUNDLES

    verify_metadata(meta_file=str(BUNDLES / meta), filepath=str(BUNDLES / "schema.json"))  # raises on a schema violation
    described = json.loads((BUNDLES / meta).read_text())
    task = {"metadata.json": "polyp", "organ/metadata.json": "organ", "classify/metadata.json": "classification"}[meta]
    assert task in described["name"].lower() or task in described["task"].lower()


def test_classification_lr_follows_timms_per_epoch_cosine():
    from timm.scheduler import CosineLRScheduler

    from medseg_peft.workflows import timm_epoch_cosine

    base, iters, epochs, cooldown = 1e-2, 7, 100, 10
    ours_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=base)
    ours = timm_epoch_cosine(ours_opt, iters, epochs, warmup_epochs=10, warmup_lr=1e-7, min_lr=1e-8)
    ref_opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=base)
    ref = CosineLRScheduler(ref_opt, t_initial=epochs, lr_min=1e-8, warmup_t=10, warmup_lr_init=1e-7, cycle_limit=1, t_in_epochs=True)
    seen = {}
    for epoch in range(epochs + cooldown):
        ref.step(epoch)  # as the reference scripts step it, at each epoch's start
        for it in range(iters):
            seen.setdefault(epoch, set()).add(ours_opt.param_groups[0]["lr"])
            ours.step()
        assert all(v == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12) for v in seen[epoch]), epoch
    assert min(seen[0]) == pytest.approx(1e-7) and min(seen[105]) == pytest.approx(1e-8)  # warm-up start, cool-down at min_lr
    assert len(seen[50]) == 1  # constant within an epoch
