"""One batch convention for selectors: ``(inputs, targets)`` whatever the loader yields.

Selectors accept plain PyTorch loaders of ``(inputs, targets)`` pairs and MONAI loaders of dicts
with ``"image"`` / ``"label"``, so the same selector runs inside a bundle and in a notebook. A dict
batch that also carries box prompts (``"box"``) gives ``ModelInputs(image, boxes=...)``, and
selectors run the model with ``call_model``, so a selection sees the prompts training will use.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable, Iterator

import torch

PROMPT_KEYS = {"box": "boxes"}  # batch key -> the model's keyword


class ModelInputs(tuple):
    """The image and the prompts a model takes beside it: ``(image, {keyword: tensor})``."""

    @property
    def image(self) -> torch.Tensor:
        return self[0]


def call_model(model, inputs: Any):
    """``model(inputs)``, or ``model(image, boxes=...)`` for inputs that carry prompts."""
    if isinstance(inputs, ModelInputs):
        return model(inputs[0], **inputs[1])
    return model(inputs)


def split_batch(batch: Any, image_key: str = "image", label_key: str = "label") -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch; ``targets`` is ``None`` when the batch has none."""
    if isinstance(batch, dict):
        if image_key not in batch:
            raise KeyError(f"batch dict has no {image_key!r} key (keys: {sorted(batch)}); pass image_key=")
        prompts = {kw: batch[key] for key, kw in PROMPT_KEYS.items() if key in batch}
        inputs = ModelInputs((batch[image_key], prompts)) if prompts else batch[image_key]
        return inputs, batch.get(label_key)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(f"a batch tuple must be (inputs, targets), got {len(batch)} items")
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}; expected (inputs, targets), a dict with 'image', or a tensor")


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        # MONAI MetaTensors would carry their metadata into every gradient and score computed from them
        return x.as_subclass(torch.Tensor).to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def iter_batches(
    batches: Iterable, device: torch.device, max_batches: int | None = None, image_key: str = "image", label_key: str = "label"
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(inputs, targets)`` on ``device``; raise if ``batches`` yields nothing."""
    if isinstance(batches, (torch.Tensor, dict)) or (isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor)):
        batches = [batches]  # a single batch passed directly
    n = 0
    for batch in islice(batches, max_batches):
        x, y = split_batch(batch, image_key, label_key)
        n += 1
        yield to_device(x, device), to_device(y, device)
    if n == 0:
        raise ValueError("the selection batches are empty: pass a non-empty loader or list of (inputs, targets)")
