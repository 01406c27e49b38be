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
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from medseg_peft.export.configs import inference_config, metadata, network_config, trace_policy
from medseg_peft.export.train_configs import multi_gpu_train_config, train_config
from medseg_peft.io import atomic_write, atomic_write_json

log = logging.getLogger("medseg_peft")

BUNDLE_MODEL_SCRIPTS = ("sam", "segmenter", "tiny_vit", "named_checkpoints")  # medseg_peft.models modules copied into <bundle>/scripts/
BUNDLE_DATA_SCRIPTS = ("volume_files", "volume_geometry", "volume_checks", "volume_writers", "volume_io", "volume_boxes", "bundle_errors")  # medseg_peft.data modules copied into <bundle>/scripts/
LOGGING_CONF = Path(__file__).resolve().parents[1] / "bundles" / "logging.conf"  # package data: a wheel has it too
PARTIAL_SUFFIX, PREVIOUS_SUFFIX = ".partial-", ".previous-"  # the hidden siblings of the export folder while it is written / replaced


def merged_network(network: nn.Module, result_file: str | Path | None) -> nn.Module:
    """``network`` with a result file (delta checkpoint or full state_dict) loaded and merged in."""
    from medseg_peft.tuning import is_attached, load_tuned, merge

    network = network.cpu().eval()
    if result_file is None:
        log.warning("no result file given: exporting the base model untuned")
        return network
    network = load_tuned(network, result_file)
    return merge(network) if is_attached(network) else network


def _trace(network: nn.Module, size: int, path: Path, meta: dict, configs: dict) -> None:
    from monai.data import save_net_with_metadata

    example = torch.rand(1, network.in_channels, size, size)
    with torch.no_grad():
        traced = torch.jit.trace(network, example, check_trace=False)
    extra = {f"{name}.json": json.dumps(cfg, indent=2).encode() for name, cfg in configs.items()}
    save_net_with_metadata(traced, str(path), meta_values=meta, more_extra_files=extra)


def trace_model(network: nn.Module, bundle_dir: str | Path, version: str, change: str) -> str:
    """After a training round: ``models/model.ts`` traced again from the new merged ``network`` (with the
    bundle's metadata and configs inside, as the export writes it), ``metadata.json`` at ``version`` with
    ``change`` in its changelog, and a ``models/model.pt2`` of the previous model removed (a ``torch.export``
    program takes minutes to make; exporting the bundle again makes one). Returns the traced file."""
    bundle = Path(bundle_dir)
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = version
    meta["changelog"] = {version: change, **meta.get("changelog", {})}
    size = int(network.image_size)
    meta["torchscript_input_policy"] = trace_policy(size, network.image_size)
    configs = {p.stem: json.loads(p.read_text()) for p in sorted((bundle / "configs").glob("*.json")) if p.stem != "metadata"}
    model_ts = bundle / "models" / "model.ts"
    atomic_write(model_ts, lambda tmp: _trace(network, size, Path(tmp), meta, configs), suffix=".ts")
    atomic_write_json(meta, meta_path)
    stale = bundle / "models" / "model.pt2"
    if stale.exists():
        stale.unlink()
        log.info("removed %s (the previous model's program); export the bundle again for one of the new model", stale)
    return str(model_ts)


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
    train_settings: Mapping | None = None,
) -> Path:
    """Write the bundle folder; returns its path. ``network`` is the plain (untuned) network the run tuned.

    The folder is written beside ``output_dir`` under a hidden name and renamed into place only when
    complete, so a failed export (a missing or damaged result file, a full disk) leaves no half bundle that
    MONAI Label would load, and a previous export stays as it was until the new one replaces it.

    The SAM variant written into ``network_def`` is read off the network's own weights (width and
    depth), so a run on the embedded demo model exports ``demo`` whatever ``sam_variant`` the bundle
    named; ``sam_variant`` is only the fallback for a network of no known variant.

    ``train_settings`` (the run's values of the task's keys, :func:`train_config`) adds ``configs/train.json``
    and ``configs/multi_gpu_train.json``, with which MONAI Label trains the bundle further.
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
    if train_settings is not None:
        network_settings = {k: v for k, v in network_config(merged, sam_variant).items() if k not in ("_target_", "checkpoint")}
        loop_settings = {**train_settings, "intensity": intensity, "spacing": spacing, "channel": channel, "activation": activation,
                         "prompt": prompt}
        configs["train"] = train_config(network_settings, class_names, loop_settings)
        configs["multi_gpu_train"] = multi_gpu_train_config()
    meta = metadata(merged, class_names, intensity, modality, activation, size, prompt)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _sibling(out, PARTIAL_SUFFIX)
    try:
        for sub in ("configs", "models", "scripts", "docs"):
            (partial / sub).mkdir()
        torch.save(state, partial / "models" / "model.pt")
        (partial / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
        for name, config in configs.items():
            (partial / "configs" / f"{name}.json").write_text(json.dumps(config, indent=4))
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
        (partial / "docs" / "README.md").write_text(_readme(meta, exported, prompt, trains="train" in configs))
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


def _readme(meta: dict, exported: bool, prompt: str = "none", trains: bool = False) -> str:
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
With `--prompt box`, an item's `"label"` (a coarse label or ROI volume; MONAI Label's `/infer` passes an uploaded
`label` file there) prompts each axial slice it touches with one box per class.

3D Slicer: copy this folder into a MONAI Label `monaibundle` app's `model/` folder, start the server
(`monailabel start_server --app <app> --studies <images> --conf models <this folder's name>`) and use
the MONAI Label module's auto-segmentation.{_training(trains)}
"""


def _training(trains: bool) -> str:
    if not trains:
        return ""
    return """

Training: MONAI Label's train button runs `configs/train.json` (`configs/multi_gpu_train.json` with several GPUs),
which needs medseg-peft where the server runs. Each request is one round in `rounds/round_<N>/`: it trains from
`models/model.pt` on the datastore's labelled volumes (method, k and lr in the options panel), then replaces
`models/model.pt` with the merged result (the round's start stays in its folder as `previous_model.pt`)."""
