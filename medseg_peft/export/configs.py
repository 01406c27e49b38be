"""The exported bundle's inference side: ``network_def``, ``configs/inference.json`` and ``metadata.json``.

The configs point at the copies in the bundle's ``scripts/`` package, never at medseg_peft, so inference
runs where medseg-peft is not installed (a MONAI Label server, Slicer's Python).
"""

from __future__ import annotations

import json
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
TRACE_POLICY = (
    "traced on one slice; the network has no size-dependent branch (it always resizes to its input size and back), "
    "so the graph takes [B, 1, H, W] grey slices in [0, 1] of any batch and in-plane size"
)


def trace_policy(trace_size: int, image_size: int) -> str:
    """metadata.json's ``torchscript_input_policy`` for a graph traced at ``trace_size``."""
    return TRACE_POLICY + f" (traced at {trace_size} x {trace_size}; the network resizes to {image_size})"


def _version(package: str) -> str:
    try:
        return pkg_metadata.version(package)
    except pkg_metadata.PackageNotFoundError:
        return "unknown"


def network_config(network: nn.Module, sam_variant: str) -> dict:
    """The exported ``network_def``: the plain wrapper of the copied ``scripts/segmenter.py``, random weights until model.pt loads."""
    return {
        "_target_": "scripts.segmenter.sam_segmenter",
        "variant": sam_variant,
        "checkpoint": None,
        "image_size": int(network.image_size),
        "num_outputs": int(network.num_outputs),
        "in_channels": int(network.in_channels),
        "input_scale": float(network.input_scale),
    }


INFERENCE_TEMPLATE = Path(__file__).resolve().parent / "inference.json"  # package data: the exported config, less what a run decides


def inference_config(network: nn.Module, sam_variant: str, intensity, spacing, channel, activation: str, prompt: str = "none") -> dict:
    """The exported ``configs/inference.json``: load, orient, window, slice by slice (with boxes or not), invert, write label volumes.

    ``export/inference.json`` is the config; the run fills in its prompt, channel, classes, activation,
    network and the pre- / post-processing lists (the training's own, pointed at the bundle's ``scripts/``).

    Every input volume's header is checked (3D, its channels) before any model work, and under
    ``python -m monai.bundle`` an error ends the output as one line naming the file (``scripts/bundle_errors.py``).

    ``prompt`` is the default of its ``prompt`` key; the box step of the pre-processing and the inferer are
    there either way (they do nothing without boxes), so ``--prompt box`` / ``--prompt none`` switch at run time.
    """
    from medseg_peft.data.volume_transforms import label_postprocessing_config, volume_preprocessing_config
    from medseg_peft.workflows.prompts import check_prompt

    steps = volume_preprocessing_config(["image"], intensity, spacing, channel, reader="scripts.volume_io.SimpleITKReader",
                                        box_transform="scripts.volume_boxes.VolumeBoxesd")
    post = label_postprocessing_config(activation, writer="scripts.volume_io.SaveLabelVolumed")
    if check_prompt(prompt) == "box" and activation != "sigmoid":
        raise ValueError(f"prompt 'box' needs activation 'sigmoid' (one output channel per class), but activation is {activation!r}")
    config = json.loads(INFERENCE_TEMPLATE.read_text())
    config.update({
        "prompt": prompt,
        "channel": None if channel is None else int(channel),
        "num_classes": int(network.num_outputs) - (1 if activation == "softmax" else 0),
        "activation": activation,
        "network_def": network_config(network, sam_variant),
    })
    config["preprocessing"]["transforms"] = steps
    config["postprocessing"]["transforms"] = post
    return config


def metadata(network: nn.Module, class_names: Mapping[int, str], intensity, modality: str, activation: str, trace_size: int,
             prompt: str = "none") -> dict:
    from medseg_peft.data.volume_transforms import resolve_intensity

    channels = {"0": "background", **{str(int(k)): str(v) for k, v in class_names.items()}}
    return {
        "schema": SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": "exported by medseg-peft: SAM tuned by selection-based PEFT, merged"},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "segment-anything": _version("segment-anything"),
            "SimpleITK": _version("SimpleITK"),
            "nibabel": _version("nibabel"),
            "pytorch-ignite": _version("pytorch-ignite"),
        },
        "name": "SAM organ segmentation (medseg-peft export)",
        "task": "Segmentation of " + ", ".join(channels[c] for c in channels if c != "0") + " in 3D volumes, slice by slice",
        "description": (
            ("A prompt-free SAM" if prompt == "none" else "A SAM prompted by boxes (MedSAM's protocol: a box file per volume)")
            + " adapted by medseg-peft, merged into plain weights. inference.json orients each volume to RAS, "
            f"applies the training intensity preset {resolve_intensity(intensity)}, runs the 2D network over axial slices "
            "(SliceInferer, spatial_dim=2), inverts the orientation and writes a uint8 label volume with the input's geometry."
        ),
        "authors": "medseg-peft users",
        "copyright": "Copyright (c) the exporting user",
        "intended_use": "Research only: not for clinical diagnosis",
        "data_type": "nifti, nrrd, mha, dicom series",
        "image_classes": f"single channel {modality} volume, intensity preset {resolve_intensity(intensity)} to [0, 1]",
        "label_classes": ", ".join(f"{k} = {v}" for k, v in channels.items()),
        "pred_classes": ", ".join(f"{k} = {v}" for k, v in channels.items()),
        "torchscript_input_policy": trace_policy(trace_size, network.image_size),
        "activation": activation,
        "references": ["Kirillov et al., Segment Anything, ICCV 2023", "Zhang et al., Gradient-based Parameter Selection for Efficient Fine-Tuning, CVPR 2024"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "hounsfield" if modality == "CT" else "magnitude", "modality": modality,
                    "num_channels": 1, "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [0, 1],
                    "is_patch_data": False, "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": len(channels), "spatial_shape": ["*", "*", "*"],
                    "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": channels,
                }
            },
        },
    }
