"""Glue the classification bundle calls: recipe, data, transforms, network, mixup, EMA, top-1.

The recipe of one of the 24 tasks (``configs/<benchmark>/<task>.yaml``) decides batch size, lr, K,
drop-path, EMA, mixup / cutmix / smoothing and the schedule; bundle keys override single values.
With no task, a synthetic counting task in the VTAB-1k layout and the embedded demo ViT stand in,
so the whole path runs in minutes on a CPU.

Splits, as the papers: ``split_mode="test"`` trains on train800val200 (VTAB) or train + val (FGVC) and
evaluates on test every epoch; ``"val"`` trains on train800 / train and evaluates on val200 / val,
for honest hyperparameter search.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from medseg_peft.distributed import main_process_first
from medseg_peft.workflows.bundle import given

log = logging.getLogger("medseg_peft")

# the embedded default: a VTAB-like recipe for the synthetic counting task at 32 px
SYNTHETIC_RECIPE = {
    "task": "synthetic_counting", "benchmark": "vtab", "group": "structured", "num_classes": 4, "transforms": "vtab",
    "image_size": 32, "batch_size": 32, "lr": 2e-3, "k": 2, "drop_path": 0.0, "ema": None, "mixup": 0.0, "cutmix": 0.0,
    "label_smoothing": 0.0, "epochs": 12, "cooldown_epochs": 0, "warmup_epochs": 1, "min_lr": 1e-6, "normalisation": "inception",
    "budget": 10_000, "published": {},
}
NORMALISATION = {"inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def classification_recipe(task: str | None = None, method: str = "gps", **overrides) -> dict:
    """The effective settings: the task's GPS recipe (SPT's own for ``method="spt"``), then the given overrides."""
    from medseg_peft.recipes import load_recipe

    if not given(task):
        recipe = dict(SYNTHETIC_RECIPE)
    else:
        full = load_recipe(task)
        recipe = {k: v for k, v in full.items() if k not in ("gps", "spt")}
        recipe.update(full["gps"])
        if method == "spt":
            recipe.update({k: v for k, v in full["spt"].items() if k != "budgets"})
            if recipe["benchmark"] == "fgvc":  # SPT's FGVC protocol: train split only, without GPS's EMA, mixup and
                # smoothing (as its VTAB scripts pass --mixup=0 --cutmix=0 --smoothing=0), and its own transforms
                recipe.update(train_split=["train"], ema=None, mixup=0.0, cutmix=0.0, label_smoothing=0.0, transforms="spt_fgvc")
        recipe.setdefault("image_size", 224)
        recipe["budget"] = 400_000  # SPT picks 0.2-0.8 M per task on validation (full["spt"]["budgets"]); the middle
    recipe.update({k: v for k, v in overrides.items() if given(v)})
    return recipe


def classification_budget(recipe: dict, budget_file: str | None = None, method: str | None = None) -> int:
    """SPT's budget: the one ``budget_sweep`` chose on validation for this task when ``budget_file`` exists, else the recipe's."""
    import json

    path = Path(budget_file).expanduser() if given(budget_file) else None
    if path is None or not path.is_file():
        if method == "spt":
            log.info("SPT budget %d: the recipe's (no %s; python -m medseg_peft.workflows.budget_sweep chooses one per task "
                     "on validation, as SPT does)", recipe["budget"], path)
        return int(recipe["budget"])
    try:
        chosen = json.loads(path.read_text())
        budget = int(chosen["budget"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is no budget file of medseg_peft.workflows.budget_sweep ({err}); move it away or pass --budget") from err
    if chosen.get("task") != recipe["task"]:
        raise ValueError(f"{path} holds the budget chosen for task {chosen.get('task')!r}, not {recipe['task']!r}: "
                         "pass the task's own --budget_file or --budget")
    if method == "spt":
        log.info("SPT budget %d: chosen on validation (top-1 %s over budgets %s) in %s", budget, chosen.get("scores", {}).get(str(budget)),
                 list(chosen.get("scores", {})), path)
    return budget


SPT_SENSITIVITY_IMAGES = 512  # ziplab/SPT: sensitivity from the first 512 train800 images, in file order, batch 32
SPT_SENSITIVITY_BATCH = 32


def selection_protocol(method: str, batch_size: int) -> dict:
    """How each method's reference scores its selection on classification: GPS on two random views of each
    image (its supervised-contrastive loss needs pairs), SPT on the first 512 training images in file
    order, batch 32 (ziplab/SPT), the others on shuffled training batches of the run's ``batch_size``."""
    if method == "spt":
        return {"views": 1, "batch_size": SPT_SENSITIVITY_BATCH, "shuffle": False}
    return {"views": 2 if method == "gps" else 1, "batch_size": batch_size, "shuffle": True}


def classification_data(recipe: dict, data_root: str | None = None, split_mode: str = "test", seed: int = 0,
                        method: str | None = None) -> dict:
    """``{"train", "eval", "select": [{"image", "label"}], "source"}`` from the task folder under ``data_root``.

    ``select`` are the selection batches' images: the training images, except for SPT, whose sensitivity
    the reference computes on the first 512 images of ``train800`` (``train`` for FGVC) in file order."""
    from medseg_peft.data.classification_folders import fgvc_splits, vtab_split
    from medseg_peft.data.synthetic_classes import make_synthetic_vtab

    if split_mode not in ("test", "val"):
        raise ValueError(f"split_mode must be 'test' (train on train+val, evaluate on test) or 'val', got {split_mode!r}")
    if recipe["task"] == SYNTHETIC_RECIPE["task"]:
        folder = main_process_first(make_synthetic_vtab, "counting", seed=seed)
    elif not given(data_root):
        raise ValueError(f"task {recipe['task']!r} needs data_root: the folder holding {recipe['folder']}/ "
                         f"({'VTAB-1k split files' if recipe['benchmark'] == 'vtab' else 'FGVC JSON splits'})")
    else:
        folder = Path(data_root).expanduser() / recipe["folder"]
        if not folder.is_dir():
            raise FileNotFoundError(f"task folder {folder} does not exist (data_root {data_root}, task {recipe['task']})")
    c = recipe["num_classes"]
    if recipe["benchmark"] == "vtab":
        train_split, eval_split = ("train800val200", "test") if split_mode == "test" else ("train800", "val200")
        train, evaluation = vtab_split(folder, train_split, c), vtab_split(folder, eval_split, c)
    else:
        splits = fgvc_splits(folder, ("train", "val", "test"), recipe.get("image_dir", ""), c)
        parts = recipe.get("train_split") or ["train", "val"]
        train = [item for part in parts for item in splits[part]] if split_mode == "test" else splits["train"]
        evaluation = splits["test"] if split_mode == "test" else splits["val"]
    select = train
    if method == "spt":
        first = vtab_split(folder, "train800", c) if recipe["benchmark"] == "vtab" else fgvc_splits(folder, ("train",), recipe.get("image_dir", ""), c)["train"]
        select = first[:SPT_SENSITIVITY_IMAGES]
    log.info("%s: %d training and %d evaluation images from %s (split_mode %s)", recipe["task"], len(train), len(evaluation), folder, split_mode)
    return {"train": train, "eval": evaluation, "select": select, "source": str(folder)}


def classification_transforms(recipe: dict, train: bool, views: int = 1, image_size: int | None = None):
    """The papers' transforms: VTAB a bicubic squash to the input size, no augmentation; FGVC random-resized
    crop (random interpolation) + flip for training, bicubic resize to floor(size / 0.9) (248 for 224, timm's crop_pct 0.9) + centre
    crop for evaluation. SPT on FGVC (``transforms="spt_fgvc"``) squashes to 256 x 256 (bicubic; 256/224 of
    the input size), then crops the input size, randomly with a flip for training, centred for evaluation
    (ziplab/SPT lib/datasets.py ``build_transform`` without ``--direct_resize``; its ``JSONDataset`` uses the
    training transform for the sensitivity pass as well).

    ``views=2`` gives GPS's selection views: two independent random-resized crops with flip, colour
    jitter and grey-scale (the reference's two-crop transform, FightingFighting/GPS
    data/transforms_factory.py). Its crop interpolates as the task's training crop: timm's "random" for FGVC,
    bicubic for VTAB, whose ``--no-aug`` makes train_gps.py fall back to the model's bicubic.
    """
    from torchvision import transforms as T

    size = int(image_size if given(image_size) else recipe["image_size"])
    mean, std = NORMALISATION[recipe.get("normalisation", "inception")]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if views == 2:
        crop = random_resized_crop(size, "random" if recipe["transforms"] == "fgvc" else "bicubic")
        one = T.Compose([crop, T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                         T.RandomGrayscale(p=0.2), *tail])
        return TwoViews(one)
    if recipe["transforms"] == "spt_fgvc":
        squash = T.Resize((256 * size // 224,) * 2, interpolation=T.InterpolationMode.BICUBIC)  # int(256 / 224 * size), as SPT
        crop = [T.RandomCrop(size), T.RandomHorizontalFlip(0.5)] if train else [T.CenterCrop(size)]
        return T.Compose([squash, *crop, *tail])
    if recipe["transforms"] == "fgvc":
        if train:
            return T.Compose([random_resized_crop(size, "random"), T.RandomHorizontalFlip(), *tail])
        return T.Compose([T.Resize(math.floor(size / 0.9), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), *tail])
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), *tail])


class TwoViews:
    """Two independent draws of ``view`` from one image: GPS's selection batches for SupCon."""

    def __init__(self, view):
        self.view = view

    def __call__(self, img) -> list:
        return [self.view(img), self.view(img)]


def random_resized_crop(size: int, interpolation: str):
    """A random-resized crop (scale 0.08-1, ratio 3/4-4/3) interpolating ``"bicubic"``, or ``"random"``: timm's
    ``RandomResizedCropAndInterpolation`` default in the GPS scripts, bilinear or bicubic drawn per image."""
    from torchvision import transforms as T

    modes = {"bicubic": [T.InterpolationMode.BICUBIC], "random": [T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC]}[interpolation]
    crops = [T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=mode) for mode in modes]
    return crops[0] if len(crops) == 1 else T.RandomChoice(crops)


class ImageList(torch.utils.data.Dataset):
    """``{"image", "label"}`` items of an image list, loaded with PIL as RGB."""

    def __init__(self, items: list[dict], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        import numpy as np
        from PIL import Image

        from medseg_peft.data.polyp_transforms import image_to_rgb

        item = self.items[i]
        try:
            with Image.open(item["image"]) as img:
                rgb = image_to_rgb(img)  # 16-bit / float images scaled by their own range, not clipped white
                if rgb.mode == "F":  # torchvision's transforms take 8-bit RGB
                    rgb = Image.fromarray(np.repeat(np.asarray(rgb).round().astype(np.uint8)[..., None], 3, axis=-1))
                image = self.transform(rgb)
        except OSError as err:
            raise OSError(f"cannot read image {item['image']}: {err}") from err
        return {"image": image, "label": torch.tensor(item["label"], dtype=torch.long)}


def classification_network(recipe: dict, pretrained: str | None = None, arch: str | None = None) -> nn.Module:
    """The task's ViT: the demo ViT for the synthetic default; else ``arch`` with the user's pre-trained file."""
    from medseg_peft.models.vit import DEFAULT_ARCH, build_vit, demo_vit

    c, dp = recipe["num_classes"], float(recipe.get("drop_path") or 0.0)
    if recipe["task"] == SYNTHETIC_RECIPE["task"] and not given(pretrained) and not given(arch):
        return demo_vit(c, dp)
    if not given(pretrained):
        log.warning("no pretrained file given: %s starts from random weights (pass --pretrained "
                    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz or ViT-B_16.npz)", arch or DEFAULT_ARCH)
    return build_vit(arch if given(arch) else DEFAULT_ARCH, c, pretrained if given(pretrained) else None, dp)


def classification_loss(recipe: dict) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if (recipe.get("mixup") or 0) > 0 or (recipe.get("cutmix") or 0) > 0:
        return SoftTargetCrossEntropy()  # mixup / cutmix make soft targets, smoothing included
    if (recipe.get("label_smoothing") or 0) > 0:
        return LabelSmoothingCrossEntropy(recipe["label_smoothing"])
    return nn.CrossEntropyLoss()


def mixup_batches(recipe: dict):
    """``prepare_batch`` for MONAI's trainer applying timm's Mixup / CutMix (FGVC recipes), or None."""
    from monai.engines.utils import default_prepare_batch
    from timm.data import Mixup

    if not ((recipe.get("mixup") or 0) > 0 or (recipe.get("cutmix") or 0) > 0):
        return default_prepare_batch
    mix = Mixup(mixup_alpha=recipe.get("mixup") or 0.0, cutmix_alpha=recipe.get("cutmix") or 0.0,
                switch_prob=recipe.get("mixup_switch_prob", 0.5), label_smoothing=recipe.get("label_smoothing") or 0.0,
                num_classes=recipe["num_classes"])

    def prepare(batch, device=None, non_blocking=False, **kwargs):
        x, y = default_prepare_batch(batch, device, non_blocking, **kwargs)
        if x.shape[0] % 2:  # timm's batch mixup pairs images; drop_last keeps batches even, guard anyway
            x, y = x[:-1], y[:-1]
        return mix(x, y)

    return prepare


class ModelEma:
    """timm's ``ModelEmaV3`` updated after every training iteration; evaluate ``.module`` for the EMA weights.

    ``networks`` / ``pred_keys`` are what the evaluator runs: with EMA both the EMA weights (``"pred"``, the key
    metric's) and the raw ones (``"pred_raw"``), as FightingFighting/GPS train_gps.py validates both every epoch."""

    def __init__(self, network: nn.Module, decay: float | None):
        from timm.utils import ModelEmaV3

        self.network = network
        self.ema = ModelEmaV3(network, decay=float(decay)) if decay else None

    @property
    def module(self) -> nn.Module:
        return self.network if self.ema is None else self.ema.module

    @property
    def networks(self) -> list[nn.Module]:
        return [self.network] if self.ema is None else [self.ema.module, self.network]

    @property
    def pred_keys(self) -> list[str]:
        return ["pred"] if self.ema is None else ["pred", "pred_raw"]

    def raw_metrics(self) -> dict:
        """``{"top1_raw": ...}``: the raw weights' top-1 beside the EMA's ``top1`` (nothing without EMA)."""
        return {} if self.ema is None else {"top1_raw": top1_metric("pred_raw")}

    def state_dict(self) -> dict:
        """For the resumable checkpoint: the EMA weights (empty without EMA), so a resumed run keeps its average."""
        return {} if self.ema is None else self.ema.state_dict()

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        if self.ema is not None and state:
            self.ema.load_state_dict(state, strict=strict)

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        if self.ema is not None:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: self.ema.update(self.network))


def top1_metric(pred_key: str = "pred"):
    """Top-1 accuracy in percent (ignite's Accuracy on the batched logits under ``pred_key``)."""
    from ignite.metrics import Accuracy

    return Accuracy(output_transform=lambda out: (out[pred_key].float(), out["label"])) * 100.0


def decay_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable tensors in two groups, as timm's ``param_groups_weight_decay`` sorts a model's parameters
    for the SPT script (ziplab/SPT train_spt.py): decay for the tensors of weight matrices, none for what
    belongs to a 1-D parameter (biases, norms) or to the cls token. With deltas attached, a delta's group is
    that of the parameter it changes, whatever the shape of its values."""
    from medseg_peft.tuning import is_attached, tuning_state

    decay, no_decay = [], []
    if is_attached(network):
        for name, delta in tuning_state(network).deltas.items():
            matrix = len(delta.shape) >= 2 and "cls_token" not in name
            (decay if matrix else no_decay).extend(delta.tensors().values())
    else:
        for name, p in network.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "cls_token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def classification_optimizer(recipe: dict, network: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """Adam with no weight decay (GPS's scripts), or AdamW with the recipe's decay on weight matrices only
    (SPT's); ``lr`` overrides the recipe's."""
    from medseg_peft.tuning import trainable_parameters

    lr, wd = float(lr if given(lr) else recipe["lr"]), float(recipe.get("weight_decay") or 0.0)
    if recipe.get("optimizer", "adam") == "adamw":
        return torch.optim.AdamW(decay_groups(network, wd), lr=lr, weight_decay=wd)
    return torch.optim.Adam(trainable_parameters(network), lr=lr, weight_decay=wd)
