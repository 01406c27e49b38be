"""Glue the organ bundles call: volume data lists (real or the synthetic CT default), the network, the loss.

As for polyps, each function turns top-level bundle keys into one object, so the JSON stays a list of
MONAI components. Every volume pair is checked (shapes, affines, channels, label values) before the
first training step: a mismatch found an hour into a run, or never, is worse than one found now.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

from torch import nn

from medseg_peft.distributed import main_process_first
from medseg_peft.workflows.bundle import given
from medseg_peft.workflows.networks import polyp_network

log = logging.getLogger("medseg_peft")


def organ_data(dataset_dir: str | None = None, classes: Sequence[str] | Mapping | None = None, val_fraction: float = 0.2,
               seed: int = 0, channel: int | None = None, synthetic_volumes: int = 12) -> dict:
    """``{"train", "val", "test", "classes", "source"}`` for an MSD or plain folder, or the synthetic CT set.

    ``classes`` (names for label values 1..N, or a value -> name mapping) overrides ``dataset.json``
    and is required for the plain ``images/`` + ``labels/`` layout.
    """
    from medseg_peft.data.synthetic_organs import make_synthetic_organs
    from medseg_peft.data.volume_checks import check_volume_pair, label_classes
    from medseg_peft.data.volume_folders import volume_datalists

    if given(dataset_dir):
        root, source = dataset_dir, str(dataset_dir)
    else:
        root = main_process_first(make_synthetic_organs, n_train=synthetic_volumes, seed=seed)
        source = f"synthetic CT organs ({synthetic_volumes} labelled volumes) in {root}"
        log.info("no dataset_dir given: using %s", source)
    data = volume_datalists(root, classes=classes if given(classes) else None, val_fraction=val_fraction, seed=seed)
    allowed = [0, *data["classes"]]
    channel = int(channel) if given(channel) else None
    for item in data["train"] + data["val"]:
        check_volume_pair(item["image"], item["label"], classes=allowed, channel=channel)
    for split in ("train", "val"):  # labels that are background only everywhere would train and score nothing
        if data[split] and not any(label_classes(item["label"]) - {0} for item in data[split]):
            raise ValueError(f"every {'training' if split == 'train' else 'validation'} label of {source} is background only "
                             f"(e.g. {data[split][0]['label']}): no class {data['classes']} appears; check the labels and their values")
    if not data["val"]:
        raise ValueError(f"{source} gives no validation volumes (val_fraction={val_fraction}): a run could measure nothing")
    log.info("data: %d training and %d validation volumes, classes %s, from %s",
             len(data["train"]), len(data["val"]), data["classes"], source)
    data["source"] = source
    return data


ACTIVATIONS = ("softmax", "sigmoid")


def organ_activation(activation: str | None = None, prompt: str = "none") -> str:
    """The output activation a run uses: the ``activation`` key, or with none given softmax prompt-free and sigmoid with boxes.

    Box prompts need per-class sigmoid outputs. MedSAM's protocol prompts one box per object, and the
    decoder answers each box with one mask (SAM's single-mask token); with a class per box, a slice's
    boxes fill the output channels of their own classes (``SamSegmenter``, boxes ``[B, N, 5]``) and a
    class no box asks for is empty. That is one independent binary mask per class, i.e. a sigmoid per
    channel; softmax would need a background channel no box could ever prompt, and would make classes
    whose boxes overlap compete for the same voxels. So ``prompt: box`` implies ``activation: sigmoid``,
    and an explicit ``softmax`` with boxes is refused rather than silently changed.
    """
    from medseg_peft.workflows.prompts import check_prompt

    check_prompt(prompt)
    if not given(activation):
        return "sigmoid" if prompt == "box" else "softmax"
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if prompt == "box" and activation != "sigmoid":
        raise ValueError(f"prompt 'box' needs activation 'sigmoid' (one output channel per class, each segmented by its "
                         f"class's boxes), but activation is {activation!r}: set activation to 'sigmoid' or leave it unset")
    return activation


def num_outputs(num_classes: int, activation: str = "softmax") -> int:
    """Output channels: one per class, plus background for softmax."""
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    return num_classes + 1 if activation == "softmax" else num_classes


def organ_network(sam_checkpoint: str | None = None, sam_variant: str | None = None, image_size: int | None = None,
                  num_classes: int = 1, activation: str = "softmax") -> nn.Module:
    """A SAM taking grey slices in [0, 1], with one decoder output per class (and background with softmax).

    Prompt-free, or with boxes ``[B, N, 5]`` naming each box's class channel (per-class sigmoid outputs).
    """
    wrapper = {"num_outputs": num_outputs(num_classes, activation), "in_channels": 1, "input_scale": 255.0}
    return polyp_network(sam_checkpoint, sam_variant, image_size, **wrapper)


def organ_loss(activation: str = "softmax", prompt: str = "none") -> nn.Module:
    """Dice + cross-entropy on label maps ``[B, 1, H, W]`` of class values: softmax over classes, or per-class sigmoid.

    With box prompts, MedSAM's loss: Dice with squared predictions in the denominator, plus BCE.
    """
    from monai.losses import DiceCELoss

    if activation == "softmax":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if activation == "sigmoid":
        return _SigmoidDiceCE(squared_pred=prompt == "box")
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


class _SigmoidDiceCE(nn.Module):
    """Binary Dice + BCE per class channel; the label map becomes one-hot without its background channel."""

    def __init__(self, squared_pred: bool = False):
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(sigmoid=True, squared_pred=squared_pred)

    def forward(self, logits, label):
        import torch.nn.functional as F

        onehot = F.one_hot(label[:, 0].long(), logits.shape[1] + 1).movedim(-1, 1)[:, 1:].to(logits.dtype)
        return self.loss(logits, onehot)


def organ_postprocessing(num_classes: int, activation: str = "softmax"):
    """Evaluator post-processing: logits to a label map (the inference bundles' rule), then prediction and
    label one-hot for the metrics."""
    from medseg_peft.data.volume_transforms import instantiate, probabilities_config

    onehot = {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": [num_classes + 1] * 2}
    return instantiate(probabilities_config(activation) + [onehot])


def volume_inputs(dataset_dir: str | None = None, classes: Sequence[str] | Mapping | None = None, channel: int | None = None,
                  seed: int = 0, synthetic_volumes: int = 12) -> dict:
    """``{"images": [...], "classes": {...}, "source"}`` for 3D inference.

    ``dataset_dir`` is a volume file, a folder of volumes (NIfTI, NRRD, MHA; DICOM series as
    subfolders) or an MSD task folder (its test images); class names come from ``classes`` or the
    folder's ``dataset.json``. With nothing given: the synthetic CT set's test volumes.
    """
    from pathlib import Path

    from medseg_peft.data.synthetic_organs import make_synthetic_organs
    from medseg_peft.data.volume_checks import check_volumes
    from medseg_peft.data.volume_files import list_volumes
    from medseg_peft.data.volume_folders import class_names, msd_class_names

    root = Path(dataset_dir).expanduser() if given(dataset_dir) else make_synthetic_organs(n_train=synthetic_volumes, seed=seed)
    images = list_volumes(root)
    if given(classes):
        names = class_names(classes)
    elif (root / "dataset.json").is_file():
        names = msd_class_names(root)
    else:
        raise ValueError(f"{root} has no dataset.json to name the classes: pass the names the model was trained with, "
                         "e.g. --classes \"['liver', 'spleen']\"")
    check_volumes(images, int(channel) if given(channel) else None)
    log.info("3D inference on %d volumes from %s, classes %s", len(images), root, names)
    return {"images": [str(p) for p in images], "classes": names, "source": str(root)}
