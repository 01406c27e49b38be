"""What a training checkpoint and a result file hold: only the part of the network that trains.

A resumable checkpoint of a sparse run must not carry the frozen base (360 MB for SAM ViT-B every
epoch); it needs the delta values, the optimizer, the scheduler and the engine state. The selection
itself is written once, beside the checkpoints (``workflows.bundle.select_or_resume``), so a resumed
run re-attaches exactly the same entries instead of selecting again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from medseg_peft.io import atomic_save_safetensors
from medseg_peft.tuning.attach import is_attached, tuning_state
from medseg_peft.tuning.checkpoint import load_delta, save_delta

log = logging.getLogger("medseg_peft")

class TunedState:
    """``state_dict`` / ``load_state_dict`` over the trainable part: delta values, or all weights for full FT."""

    def __init__(self, network: nn.Module):
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors, and each delta's index beside its values (so a checkpoint is never loaded
        onto other entries)."""
        if is_attached(self.network):
            deltas = tuning_state(self.network).deltas
            state = {f"{name}.{key}": t.detach() for name, d in deltas.items() for key, t in d.tensors().items()}
            state.update({f"{name}.index": d.index for name, d in deltas.items() if getattr(d, "index", None) is not None})
            return state
        return self.network.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        if not is_attached(self.network):
            self.network.load_state_dict(state, strict=strict)
            return
        deltas = tuning_state(self.network).deltas
        for name, d in deltas.items():
            saved = state.get(f"{name}.index")
            if saved is not None and not torch.equal(saved.to(d.index.device).long(), d.index.long()):
                raise ValueError(f"the checkpoint's entries of {name!r} differ from the attached selection's: it belongs to another "
                                 "selection (delete the output folder or pick another output_dir)")
        state = {k: v for k, v in state.items() if not k.endswith(".index")}
        targets = {f"{name}.{key}": t for name, d in deltas.items() for key, t in d.tensors().items()}
        if set(state) != set(targets):
            raise ValueError(
                f"checkpoint holds {len(state)} delta tensors, the attached selection has {len(targets)}; "
                "it belongs to another run (delete the output folder or pick another output_dir)"
            )
        with torch.no_grad():
            for key, values in state.items():
                targets[key].copy_(values)


def save_tuned(network: nn.Module, path: str | Path) -> Path:
    """The result file: a delta checkpoint for a selection method, the whole state_dict for full FT."""
    if is_attached(network):
        return save_delta(network, path)
    return atomic_save_safetensors(network.state_dict(), path, {"medseg_peft": '{"format": "full_state_dict"}'})


def load_tuned(network: nn.Module, path: str | Path) -> nn.Module:
    """Read a result file ``save_tuned`` wrote: full weights load in place; a delta checkpoint attaches its entries."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"result file {path} does not exist (a training run writes best_delta.safetensors in its output_dir)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("medseg_peft", "{}")
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"result file {path} is not a readable safetensors file ({err}); rerun training, or use another copy") from err
    if json.loads(raw).get("format") == "full_state_dict":
        result = network.load_state_dict(load_file(str(path)), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path} does not fit this network: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        return network
    return load_delta(network, path)


__all__ = ["TunedState", "load_tuned", "save_tuned"]
