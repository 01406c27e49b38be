"""Delta checkpoints: only what was tuned, a few hundred kB for a ViT-B at K=1.

One ``.safetensors`` file: per tuned tensor ``<name>.values`` (float32) and ``<name>.index`` (per-row
``[rows, K]`` or flat, in the narrowest integer type that holds it), or a branch's factors
(``<name>.lora_A`` / ``<name>.lora_B``, ``.<i>`` per row block), plus JSON metadata with the
selection's layout, method and hyperparameters and a fingerprint of the base weights at the tuned
entries, so that a delta is never silently applied to a different base model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from medseg_peft.entries import Selection, entries_from_meta, entry_meta, read_safetensors_with_meta, smallest_int
from medseg_peft.io import atomic_save_safetensors
from medseg_peft.tuning.attach import attach, detach, is_attached, owner_of, tuning_state

DELTA_FORMAT = "medseg_peft.delta"


def _base_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The untouched base tensor of ``name`` on an attached (unmerged) model."""
    module, tensor_name = owner_of(model, name)
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)  # adapters leave the weight itself in place


def _fingerprint(values: torch.Tensor) -> list[float]:
    v = values.detach().double().reshape(-1)
    return [float(v.sum()), float((v * v).sum())]


def save_delta(model: nn.Module, path: str | Path) -> Path:
    """Write the tuned part of ``model`` (attached or merged) to ``path`` (``.safetensors``)."""
    state = tuning_state(model)
    tensors: dict[str, torch.Tensor] = {}
    entries_meta: dict[str, dict] = {}
    for name, delta in state.deltas.items():
        if state.merged:
            base_entries = state.base_values[name]
        else:
            base_entries = delta.gather(_base_tensor(model, name).detach())
        for key, t in delta.tensors().items():
            tensors[f"{name}.{key}"] = t.detach()
        if getattr(delta, "index", None) is not None:
            tensors[f"{name}.index"] = smallest_int(delta.index)
        entries_meta[name] = {**entry_meta(delta.entries), "base": _fingerprint(base_entries)}
        if base_entries.dtype != torch.float32:  # a bf16 base (cast_base): fingerprint the base as rounded to it
            entries_meta[name]["base_dtype"] = str(base_entries.dtype).removeprefix("torch.")
    sel = state.selection
    checksum = tensor_checksum({k: v for k, v in tensors.items()})
    meta = {
        "format": DELTA_FORMAT,
        "version": 1,
        "method": sel.method,
        "hparams": sel.hparams,
        "total_params": sel.total_params,
        "trainable": sel.num_trainable,
        "entries": entries_meta,
        "sha256": checksum,
    }
    return atomic_save_safetensors(tensors, path, {"medseg_peft": json.dumps(meta)})


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``tensors``: a flipped byte changes it."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_delta(base_model: nn.Module, path: str | Path, check_base: bool = True) -> nn.Module:
    """Attach the deltas stored in ``path`` to ``base_model`` (in place) and return it.

    The result computes bit for bit what the saved model computed; ``merge`` it for inference.
    With ``check_base`` the base weights at the tuned entries must match the ones the delta was
    trained on (same checkpoint), else a ``ValueError`` names the first tensor that differs.
    """
    path = Path(path)
    if is_attached(base_model):
        raise ValueError(f"{path}: load_delta needs a plain base model, this one already has attached deltas")
    meta, tensors = read_safetensors_with_meta(path, expected_format=DELTA_FORMAT)
    if "sha256" in meta and tensor_checksum(tensors) != meta["sha256"]:
        raise ValueError(f"{path}: the tensors do not match the file's checksum: the file is damaged (a changed byte); "
                         "use another copy, or the run's checkpoint")
    entries = {n: entries_from_meta(n, d, tensors) for n, d in meta["entries"].items()}
    selection = Selection(entries, int(meta["total_params"]), meta.get("method", "manual"), meta.get("hparams", {}))
    params = dict(base_model.named_parameters())
    selection.check_model(params, what=f"the base model given for {path.name}")
    attach(base_model, selection)
    try:
        _fill_values(base_model, path, meta, tensors, check_base)
    except Exception:
        detach(base_model)
        raise
    return base_model


def _fill_values(base_model: nn.Module, path: Path, meta: dict, tensors: dict, check_base: bool) -> None:
    state = tuning_state(base_model)
    with torch.no_grad():
        for name, delta in state.deltas.items():
            if check_base:
                base_entries = delta.gather(_base_tensor(base_model, name))
                trained_on = meta["entries"][name].get("base_dtype")
                if trained_on:  # trained on a bf16 copy of this base: compare at that precision
                    base_entries = base_entries.to(getattr(torch, trained_on))
                got = _fingerprint(base_entries)
                want = meta["entries"][name]["base"]
                if not all(math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9) for g, w in zip(got, want)):
                    raise ValueError(
                        f"{path}: the base weights of {name!r} differ from those the delta was trained on "
                        f"(fingerprint {got} vs {want}); load the same base checkpoint, or pass check_base=False"
                    )
            for key, target in delta.tensors().items():
                stored = tensors.get(f"{name}.{key}")
                if stored is None or tuple(stored.shape) != tuple(target.shape):
                    got = None if stored is None else tuple(stored.shape)
                    raise ValueError(f"{path}: {key} of {name!r} has shape {got}, expected {tuple(target.shape)}")
                target.copy_(stored)
