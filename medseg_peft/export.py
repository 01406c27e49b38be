"""Export a tuned SAM as a self-contained MONAI bundle folder for MONAI Label and 3D Slicer.

The tuned entries are merged into the base weights first, so the exported model is SAM's plain
architecture at zero extra cost: ``models/model.pt`` is an ordinary ``state_dict`` that loads strictly
into the network ``configs/inference.json`` builds, with no delta or PEFT keys.

The folder must run where medseg-peft is not installed (a MONAI Label server, Slicer's Python), so
the modules its configs need, the SAM wrapper, the volume reader / label writer and the box prompts
(box files, the slice inferer that passes them), are copied into the bundle's ``scripts/`` package (a
bundle's root is on ``sys.path`` when it runs), and the inference pre-processing is the very config
list training used (``volume_preprocessing_config``), pointed at those copies. Only MONAI,
segment-anything, SimpleITK and nibabel are needed there.

``configs/inference.json`` has a ``prompt`` key, ``"none"`` unless the run trained with boxes: with
``"box"`` each volume's boxes are read from ``<stem>.boxes.json`` beside it (or in ``box_dir``) and
checked before any inference work (``volume_boxes``); prompt-free inference stays available either way.

``models/model.ts`` is a *traced* TorchScript (SAM's encoder cannot be scripted), and
``models/model.pt2`` a ``torch.export`` program where the installed torch can make one; both come
from the merged model and take grey slices ``[B, 1, H, W]`` in [0, 1].
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger("medseg_peft")

BUNDLE_MODEL_SCRIPTS = ("sam", "segmenter", "tiny_vit", "named_checkpoints")  # medseg_peft.models modules copied into <bundle>/scripts/
BUNDLE_DATA_SCRIPTS = ("volume_files", "volume_geometry", "volume_checks", "volume_writers", "volume_io", "volume_boxes", "bundle_errors")  # medseg_peft.data modules copied into <bundle>/scripts/
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
LOGGING_CONF = Path(__file__).resolve().parent / "bundles" / "logging.conf"  # package data: a wheel has it too
PARTIAL_SUFFIX, PREVIOUS_SUFFIX = ".partial-", ".previous-"  # the hidden siblings of the export folder while it is written / replaced
TRACE_POLICY = (
    "traced on one slice; the network has no size-dependent branch (it always resizes to its input size and back), "
    "so the graph takes [B, 1, H, W] grey slices in [0, 1] of any batch and in-plane size"
)


def _version(package: str) -> str:
    try:
        return pkg_metadata.version(package)
    except pkg_metadata.PackageNotFoundError:
        return "unknown"


def merged_network(network: nn.Module, result_file: str | Path | None) -> nn.Module:
    """``network`` with a result file (delta checkpoint or full state_dict) loaded and merged in."""
    from medseg_peft.tuning import is_attached, load_tuned, merge

    network = network.cpu().eval()
    if result_file is None:
        log.warning("no result file given: exporting the base model untuned")
        return network
    network = load_tuned(network, result_file)
    return merge(network) if is_attached(network) else network


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


def inference_config(network: nn.Module, sam_variant: str, intensity, spacing, channel, activation: str, prompt: str = "none") -> dict:
    """The exported ``configs/inference.json``: load, orient, window, slice by slice (with boxes or not), invert, write label volumes.

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
    classes = int(network.num_outputs) - (1 if activation == "softmax" else 0)
    return {
        "imports": ["$import torch", "$import scripts", "$import scripts.volume_io", "$import scripts.volume_boxes",
                    "$import scripts.bundle_errors", "$from monai.engines import PrepareBatchExtraInput",
                    "$from monai.engines import default_prepare_batch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": None,
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": "seg",
        "sw_batch_size": 16,
        "prompt": prompt,
        "box_dir": None,
        "datalist": (f"$scripts.volume_boxes.box_datalist(scripts.volume_io.check_volumes(scripts.volume_io.list_volumes(@dataset_dir), "
                     f"channel={channel if channel is None else int(channel)}), prompt=@prompt, box_dir=@box_dir, "
                     f"num_classes={classes}, activation={activation!r})"),
        "network_def": network_config(network, sam_variant),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": {"_target_": "scripts.volume_boxes.BoxSliceInferer", "roi_size": [-1, -1], "spatial_dim": 2,
                    "sw_batch_size": "@sw_batch_size"},
        "prepare_batch": "$PrepareBatchExtraInput({'boxes': 'box'}) if @prompt == 'box' else default_prepare_batch",
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'", "load_dict": {"model": "@network"},
             "strict": True, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader", "prepare_batch": "@prepare_batch",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing", "val_handlers": "@handlers"},
        "initialize": ["$scripts.bundle_errors.short_errors()"],
        "run": ["$@evaluator.run()"],
    }


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
        "torchscript_input_policy": TRACE_POLICY + f" (traced at {trace_size} x {trace_size}; the network resizes to {network.image_size})",
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


def _trace(network: nn.Module, size: int, path: Path, meta: dict, configs: dict) -> None:
    from monai.data import save_net_with_metadata

    example = torch.rand(1, network.in_channels, size, size)
    with torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False)
    extra = {f"{name}.json": json.dumps(cfg, indent=2).encode() for name, cfg in configs.items()}
    save_net_with_metadata(traced, str(path), meta_values=meta, more_extra_files=extra)


def _torch_export(network: nn.Module, size: int, path: Path) -> bool:
    """A ``torch.export`` program with dynamic batch and slice size, where this torch can export SAM; False (logged) otherwise."""
    try:
        dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=8, max=8192),
                3: torch.export.Dim("width", min=8, max=8192)}
        example = torch.rand(2, network.in_channels, size, size - 4)
        program = torch.export.export(network, (example,), dynamic_shapes=(dims,))
        torch.export.save(program, str(path))
        return True
    except Exception as err:  # torch.export support for SAM varies between torch versions
        log.warning("torch.export of the merged network failed on torch %s (%s: %s); model.ts and model.pt are written anyway",
                    torch.__version__, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False


def export_bundle(
    output_dir: str | Path,
    network: nn.Module,
    result_file: str | Path | None,
    class_names: Mapping[int, str] | Sequence[str],
    intensity="ct_soft_tissue",
    spacing: Sequence[float] | None = None,
    channel: int | None = None,
    activation: str = "softmax",
    prompt: str = "none",
    sam_variant: str | None = None,
    modality: str | None = None,
    trace_size: int | None = None,
    torch_export: bool = True,
) -> Path:
    """Write the bundle folder; returns its path. ``network`` is the plain (untuned) network the run tuned.

    The folder is written beside ``output_dir`` under a hidden name and renamed into place only when
    complete, so a failed export (a missing or damaged result file, a full disk) leaves no half bundle that
    MONAI Label would load, and a previous export stays as it was until the new one replaces it.

    The SAM variant written into ``network_def`` is read off the network's own weights (width and
    depth), so a run on the embedded demo model exports ``demo`` whatever ``sam_variant`` the bundle
    named; ``sam_variant`` is only the fallback for a network of no known variant.
    """
    from medseg_peft.data import volume_io
    from medseg_peft.data.volume_transforms import resolve_intensity
    from medseg_peft.models import sam as sam_module
    from medseg_peft.models.sam import detect_variant

    if not isinstance(class_names, Mapping):
        class_names = {i + 1: name for i, name in enumerate(class_names)}
    if modality is None:
        modality = "MR" if "percentiles" in resolve_intensity(intensity) else "CT"
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export folder {out} exists and is not a folder: pick another export_dir")
    merged = merged_network(network, result_file)  # a missing or damaged result file stops here, before any folder is made
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    found = detect_variant({k[len("sam."):]: v for k, v in state.items() if k.startswith("sam.")})
    if found is None and sam_variant is None:
        raise ValueError("the network matches no known SAM variant; pass sam_variant")
    if found is not None and sam_variant not in (None, found):
        log.info("exporting the network as SAM %s (read off its weights), not the configured %s", found, sam_variant)
    sam_variant = found or sam_variant
    size = int(trace_size or merged.image_size)
    configs = {"inference": inference_config(merged, sam_variant, intensity, spacing, channel, activation, prompt)}
    meta = metadata(merged, class_names, intensity, modality, activation, size, prompt)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(out, PARTIAL_SUFFIX)
    try:
        for sub in ("configs", "models", "scripts", "docs"):
            (partial / sub).mkdir()
        torch.save(state, partial / "models" / "model.pt")
        (partial / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
        (partial / "configs" / "inference.json").write_text(json.dumps(configs["inference"], indent=4))
        shutil.copy(LOGGING_CONF, partial / "configs" / "logging.conf")
        (partial / "scripts" / "__init__.py").write_text('"""Copies of medseg-peft modules the bundle configs need (SAM wrapper, volume IO, one-line errors)."""\n')
        models_dir = Path(sam_module.__file__).parent
        for name in BUNDLE_MODEL_SCRIPTS:
            shutil.copy(models_dir / f"{name}.py", partial / "scripts" / f"{name}.py")
        data_dir = Path(volume_io.__file__).parent
        for name in BUNDLE_DATA_SCRIPTS:
            shutil.copy(data_dir / f"{name}.py", partial / "scripts" / f"{name}.py")
        _trace(merged, size, partial / "models" / "model.ts", meta, configs)
        exported = torch_export and _torch_export(merged, size, partial / "models" / "model.pt2")
        (partial / "LICENSE").write_text("The exported weights inherit the licence of the base SAM checkpoint and of the training data.\n")
        (partial / "docs" / "README.md").write_text(_readme(meta, exported, prompt))
        _put_in_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already when the export succeeded
    log.info("exported %s (%d tensors, classes %s)", out, len(state), meta["network_data_format"]["outputs"]["pred"]["channel_def"])
    return out


def _sibling(out: Path, suffix: str) -> Path:
    """A new empty hidden folder beside ``out``, made with the user's umask (``tempfile.mkdtemp``'s 0700 would
    keep a MONAI Label server running as another user out of the exported bundle)."""
    while True:
        path = out.parent / f".{out.name}{suffix}{os.getpid()}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _put_in_place(built: Path, out: Path) -> None:
    """Move the complete folder ``built`` to ``out`` (same parent: renames, no copy), replacing a previous export.

    A folder cannot be renamed over a non-empty one, so the previous export is first renamed aside and
    deleted only once the new one is in place (and put back if that fails): at every moment ``out`` is
    either the previous complete bundle or the new one, apart from the instant between the two renames."""
    if not out.exists():
        os.replace(built, out)
        return
    aside = _sibling(out, PREVIOUS_SUFFIX)
    os.replace(out, aside)  # an empty folder, replaced
    try:
        os.replace(built, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _readme(meta: dict, exported: bool, prompt: str = "none") -> str:
    return f"""# {meta['name']}

{meta['description']}

Classes: {meta['pred_classes']}.

- `models/model.pt`: merged plain state_dict for `network_def` in `configs/inference.json`.
- `models/model.ts`: TorchScript, {meta['torchscript_input_policy']}.
- `models/model.pt2`: {'torch.export program (dynamic batch, height and width)' if exported else 'not written: this torch could not export the model'}.

Run on a folder of volumes (NIfTI, NRRD, MHA, DICOM series folders):

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir <folder> --output_dir <out>

Every volume's header is checked before inference (a 3D volume, one channel); a run that fails ends with one
line naming the file at fault (`MEDSEG_PEFT_TRACEBACK=1` prints the full traceback instead).

Box prompts (MedSAM's protocol; this bundle's default prompt is `{prompt}`): `--prompt box` reads each volume's
boxes from `<volume stem>.boxes.json` beside it (`case_1.nii.gz` -> `case_1.boxes.json`), or from `--box_dir <folder>`:
`{{"boxes": [[i1, j1, k1, i2, j2, k2], ...]}}`, inclusive voxel indices along the volume's stored axes (3D Slicer's
IJK), each optionally `{{"box": [...], "label": class}}`. Every file is checked before inference starts; slices
no box spans stay empty. `--prompt none` runs prompt-free. `model.ts` and `model.pt2` are the prompt-free graph.

3D Slicer: copy this folder into a MONAI Label `monaibundle` app's `model/` folder, start the server
(`monailabel start_server --app <app> --studies <images> --conf models <this folder's name>`) and use
the MONAI Label module's auto-segmentation.
"""
