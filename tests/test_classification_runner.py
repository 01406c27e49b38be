"""Classification path: SupCon by hand, EMA, the runner end to end on a tiny fake VTAB task, results averages, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSIFY, error_chain, run_workflow
from medseg_peft.models.vit import build_vit
from medseg_peft.recipes import VTAB_TASKS, load_recipe
from medseg_peft.results import collect, fgvc_mean, table, vtab_averages
from medseg_peft.selection.supcon import supcon_loss
from medseg_peft.workflows.classify import ModelEma


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDSEG_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_supcon_matches_a_hand_computed_value():
    # two images, two views each, unit features: image 0 -> (1,0), (0,1); image 1 -> (1,0), (0,-1); tau = 1
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0]]])
    # each anchor's only positive is its other view (cosine 0); the denominators are 1 + 1 + e or 1 + 1 + 1/e
    expected = (math.log(2 + math.e) + math.log(2 + 1 / math.e)) / 2
    assert supcon_loss(feats, torch.tensor([0, 1]), temperature=1.0, base_temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # temperature 0.5 doubles every similarity: denominators 1 + 1 + e^2 or 1 + 1 + e^-2
    expected_half = (math.log(2 + math.e**2) + math.log(2 + math.e**-2)) / 2
    assert supcon_loss(feats, torch.tensor([0, 1]), 0.5, 0.5).item() == pytest.approx(expected_half, rel=1e-6)


def test_model_ema_update():
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = ModelEma(net, decay=0.75)
    with torch.no_grad():
        net.weight.fill_(4.0)
    ema.ema.update(net)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 1.0))  # 0.75 * 0 + 0.25 * 4
    assert ModelEma(net, None).module is net


def fake_vtab(root, task="dtd", n_train=24, n_test=12):
    folder = root / load_recipe(task)["folder"]
    rng = np.random.default_rng(0)
    lines = {"train800val200": [], "test": []}
    for split, n in (("train800val200", n_train), ("test", n_test)):
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / rel)
            lines[split].append(f"{rel} {i % 3}")
    for split, entries in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return folder


def test_runner_trains_a_tiny_vit_on_a_fake_vtab_task(tmp_path):
    fake_vtab(tmp_path)
    pretrained = tmp_path / "tiny.pth"
    torch.save(build_vit("demo", 10).state_dict(), pretrained)
    out = tmp_path / "run"
    run_workflow(CLASSIFY, task="dtd", data_root=str(tmp_path), arch="demo", pretrained=str(pretrained), image_size=32,
                 epochs=2, cooldown_epochs=0, batch_size=8, num_workers=0, output_dir=str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["task"] == "dtd" and metrics["method"] == "gps"
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2] and all(0 <= h["top1"] <= 100 for h in metrics["history"])
    assert "top1_raw" not in metrics["history"][-1] and list(metrics["best_each"]) == ["top1"]  # no EMA: top1 is the raw weights'
    assert (out / "selection.safetensors").is_file() and (out / "best_delta.safetensors").is_file()
    rows = collect(tmp_path)
    assert len(rows) == 1 and rows[0]["task"] == "dtd" and rows[0]["last"] == metrics["history"][-1]["top1"]
    assert "| dtd | gps | test |" in table(rows)


def test_results_averages_on_known_numbers():
    gps = {t: load_recipe(t)["published"]["gps"] for t in VTAB_TASKS}
    v19, groups = vtab_averages(gps)
    assert v19 == pytest.approx(75.18, abs=0.005)  # GPS's published 19-task mean
    assert groups == pytest.approx(77.47, abs=0.005)  # and its mean of group means
    flat = {t: 50.0 for t in VTAB_TASKS} | {"cifar100": 69.0}  # one natural task higher: 19 vs 3 weighting differs
    v19, groups = vtab_averages(flat)
    assert v19 == pytest.approx(50 + 19 / 19) and groups == pytest.approx(50 + 19 / 7 / 3)
    assert vtab_averages({"cifar100": 1.0}) == (None, None)
    assert fgvc_mean({"cub": 90, "nabirds": 80, "flowers": 100, "dogs": 90, "cars": 90}) == pytest.approx(90.0)


@pytest.mark.parametrize("overrides, message", [
    ({"task": "imagenet"}, "unknown task 'imagenet'"),
    ({"task": "dtd"}, "needs data_root"),
    ({"task": "dtd", "pretrained": "WRONG"}, "does not fit"),
    ({"task": "dtd", "pretrained": "WRONG.npz"}, "does not fit"),
])
def test_bad_classification_input(tmp_path, overrides, message):
    fake_vtab(tmp_path)
    if overrides.get("pretrained") == "WRONG":
        torch.save(build_vit("demo", 10).state_dict(), tmp_path / "wrong.pth")  # a demo ViT file for a ViT-B/16
        overrides = {**overrides, "pretrained": str(tmp_path / "wrong.pth"), "data_root": str(tmp_path)}
    elif overrides.get("pretrained") == "WRONG.npz":  # a JAX checkpoint of another network
        np.savez(tmp_path / "other.npz", **{"conv_1/kernel": np.zeros((3, 3, 3, 8), np.float32)})
        overrides = {**overrides, "pretrained": str(tmp_path / "other.npz"), "data_root": str(tmp_path)}
    with pytest.raises(Exception) as info:
        run_workflow(CLASSIFY, output_dir=str(tmp_path / "run"), epochs=1, cooldown_epochs=0, num_workers=0, **overrides)
    assert message in error_chain(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def fake_fgvc(root, task="flowers"):
    """FGVC JSON splits whose class ids start at 1 and skip numbers, as real ones may; every class has an image."""
    recipe = load_recipe(task)
    folder = root / recipe["folder"]
    rng = np.random.default_rng(1)
    ids = [3 * i + 1 for i in range(recipe["num_classes"])]
    splits = {"train": {f"jpg/tr_{i}.jpg": c for i, c in enumerate(ids)},
              "val": {f"jpg/va_{i}.jpg": ids[i] for i in range(4)}, "test": {f"jpg/te_{i}.jpg": ids[-i - 1] for i in range(6)}}
    for split, entries in splits.items():
        (folder / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.json").write_text(json.dumps(entries))
        for rel in entries:
            (folder / recipe["image_dir"] / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / recipe["image_dir"] / rel)
    return folder


def test_runner_fgvc_recipe_with_mixup_ema_and_resume(tmp_path):
    """The FGVC path: random-resized crops, mixup / cutmix soft targets, EMA evaluated and checkpointed, resumed."""
    fake_fgvc(tmp_path)
    pretrained = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(build_vit("demo", 7).state_dict(), str(pretrained))
    out = tmp_path / "run"
    common = dict(task="flowers", data_root=str(tmp_path), arch="demo", pretrained=str(pretrained), image_size=32,
                  cooldown_epochs=0, batch_size=16, num_workers=0, output_dir=str(out))
    layers = [*CLASSIFY, "methods/fps.json"]
    wf = run_workflow(layers, epochs=1, **common)
    recipe = wf.parser.get_parsed_content("recipe")
    assert recipe["ema"] == 0.99 and recipe["mixup"] == 0.8 and recipe["transforms"] == "fgvc"
    ema = wf.parser.get_parsed_content("ema")
    assert ema.module is not wf.parser.get_parsed_content("network")  # the evaluator sees the EMA copy
    saved = torch.load(next((out / "checkpoints").glob("*.pt")), weights_only=False)
    assert saved["ema"] and set(saved["ema"]) == set(ema.ema.state_dict())
    wf = run_workflow(layers, epochs=2, **common)
    assert wf.parser.get_parsed_content("train#trainer").state.epoch == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2] and metrics["settings"]["ema"] == 0.99
    # the raw weights are evaluated beside the EMA's every time, as GPS's train_gps.py; both bests are kept
    assert all(0 <= h["top1"] <= 100 and 0 <= h["top1_raw"] <= 100 for h in metrics["history"])
    assert metrics["history"][0]["top1"] == metrics["history"][0]["top1_raw"]  # before training EMA = raw
    for name in ("top1", "top1_raw"):
        kept = metrics["best_each"][name]
        assert kept["epoch"] in (1, 2) and kept["value"] == max(h[name] for h in metrics["history"][1:])
    assert metrics["settings"]["top1_of"].startswith("EMA") and metrics["best"]["top1"] == max(h["top1"] for h in metrics["history"])


def jax_npz(model, path, head=True):
    """A Google ViT ``.npz`` (the layout of ViT-B_16.npz / the AugReg files) written from a timm ViT, to load back."""
    n = lambda t: t.detach().numpy()  # noqa: E731
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": n(model.patch_embed.proj.weight).transpose(2, 3, 1, 0), "embedding/bias": n(model.patch_embed.proj.bias),
         "cls": n(model.cls_token), "Transformer/posembed_input/pos_embedding": n(model.pos_embed),
         "Transformer/encoder_norm/scale": n(model.norm.weight), "Transformer/encoder_norm/bias": n(model.norm.bias)}
    if head:
        w.update({"head/kernel": n(model.head.weight).T, "head/bias": n(model.head.bias)})
    for i, block in enumerate(model.blocks):
        p, mha = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            w[f"{mha}{name}/kernel"] = n(block.attn.qkv.weight)[j * d:(j + 1) * d].T.reshape(d, heads, -1)
            w[f"{mha}{name}/bias"] = n(block.attn.qkv.bias)[j * d:(j + 1) * d].reshape(heads, -1)
        w[f"{mha}out/kernel"] = n(block.attn.proj.weight).reshape(d, heads, -1).transpose(1, 2, 0)
        w[f"{mha}out/bias"] = n(block.attn.proj.bias)
        for ln, norm in (("LayerNorm_0", block.norm1), ("LayerNorm_2", block.norm2)):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = n(norm.weight), n(norm.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = n(fc.weight).T, n(fc.bias)
    np.savez(path, **w)


def test_google_npz_weights_load_and_the_head_stays_new(tmp_path):
    torch.manual_seed(3)
    source = build_vit("demo", 21)  # a "21k" head that must not be taken over
    jax_npz(source, tmp_path / "vit.npz")
    torch.manual_seed(4)
    fresh = build_vit("demo", 7)
    head_before = fresh.head.weight.detach().clone()
    torch.manual_seed(4)  # the same fresh head as built, then the body from the file
    loaded = build_vit("demo", 7, tmp_path / "vit.npz")
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
    assert loaded.head.weight.shape == (7, 96) and torch.equal(loaded.head.weight, head_before)
    x = torch.rand(2, 3, 32, 32)
    loaded.eval(), source.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x))


def test_the_papers_transforms():
    from torchvision import transforms as T

    from medseg_peft.workflows.classify import classification_recipe, classification_transforms

    fgvc_eval = classification_transforms(classification_recipe("cub"), train=False).transforms
    assert fgvc_eval[0].size == 248 and fgvc_eval[1].size == (224, 224)  # resize 248 + centre crop 224
    crop = classification_transforms(classification_recipe("cub"), train=True).transforms[0]  # random interpolation, as timm's
    assert isinstance(crop, T.RandomChoice) and {c.interpolation for c in crop.transforms} == {T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC}
    vtab = classification_transforms(classification_recipe("dtd"), train=True).transforms
    assert vtab[0].size == (224, 224) and vtab[0].interpolation == T.InterpolationMode.BICUBIC  # squash, no augmentation
    assert not any(isinstance(t, (T.RandomResizedCrop, T.RandomHorizontalFlip)) for t in vtab)
    assert vtab[-1].mean == (0.5, 0.5, 0.5)  # GPS's normalisation; SPT's recipe uses ImageNet's
    assert classification_transforms(classification_recipe("dtd", "spt"), train=False).transforms[-1].mean == (0.485, 0.456, 0.406)
    views = classification_transforms(classification_recipe("dtd"), train=True, views=2)(Image.new("RGB", (40, 30)))
    assert len(views) == 2 and views[0].shape == (3, 224, 224)


def test_spt_training_decays_only_weight_matrices_and_runs_in_fp32(vit, vit_batches):
    import medseg_peft as mp
    from medseg_peft.workflows.classify import classification_optimizer, classification_recipe

    recipe = classification_recipe("dtd", "spt")
    assert recipe["optimizer"] == "adamw" and recipe["amp"] is False  # the bundle's amp key reads it
    assert classification_recipe("dtd", "gps")["amp"] is True
    model = mp.SPT(budget=3000, rank=2)(vit, vit_batches)
    opt = classification_optimizer(recipe, model)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == recipe["weight_decay"] and no_decay["weight_decay"] == 0.0
    state = mp.tuning.tuning_state(model)
    by_tensor = {id(t): name for name, d in state.deltas.items() for t in d.tensors().values()}
    assert all(len(state.deltas[by_tensor[id(t)]].shape) >= 2 for t in decay["params"])
    assert all(len(state.deltas[by_tensor[id(t)]].shape) == 1 or "cls_token" in by_tensor[id(t)] for t in no_decay["params"])
    assert any("head.bias" in by_tensor[id(t)] for t in no_decay["params"]) and decay["params"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(mp.trainable_parameters(model))


def test_spt_sensitivity_reads_the_first_512_train800_images_in_file_order(tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow
    from torch.utils.data import SequentialSampler

    from conftest import BUNDLES, bundle_files

    wf = ConfigWorkflow(config_file=bundle_files([*CLASSIFY, "methods/spt.json"]), meta_file=str(BUNDLES / "classify" / "metadata.json"),
                        logging_file=False, workflow_type=None, output_dir=str(tmp_path / "run"), num_workers=0)
    wf.initialize()
    try:
        loader = wf.parser.get_parsed_content("select#dataloader")
        data = wf.parser.get_parsed_content("data")
        train800 = (Path(data["source"]) / "train800.txt").read_text().split("\n")
        expected = [line.split()[0] for line in train800 if line.strip()][:512]
        assert [Path(i["image"]).name for i in loader.dataset.items] == [Path(e).name for e in expected]
        assert loader.batch_size == 32 and isinstance(loader.sampler, SequentialSampler) and not loader.drop_last
        gps = wf.parser.get_parsed_content("train#dataloader")
        assert len(data["train"]) > 512 and len(gps.dataset) == len(data["train"])  # training still reads train800val200
    finally:
        wf.finalize()


def test_spt_fgvc_protocol_trains_on_train_only_without_ema_or_mixup(tmp_path):
    from medseg_peft.workflows.classify import classification_data, classification_recipe

    fake_fgvc(tmp_path)
    spt, gps = classification_recipe("flowers", "spt"), classification_recipe("flowers", "gps")
    assert spt["ema"] is None and spt["mixup"] == 0 and spt["cutmix"] == 0 and spt["train_split"] == ["train"]
    assert gps["ema"] == 0.99 and gps["mixup"] == 0.8  # GPS's FGVC recipe is unchanged
    n_spt = len(classification_data(spt, str(tmp_path))["train"])
    n_gps = len(classification_data(gps, str(tmp_path))["train"])
    assert n_gps - n_spt == 4  # the fake set's 4 val images train GPS only
