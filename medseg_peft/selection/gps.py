"""GPS: gradient-based parameter selection (Zhang et al., CVPR 2024, arXiv 2312.10136).

Score = ``|sum over selection batches of the gradient of the batch loss|``: one backward per batch,
gradients accumulated without an optimizer step, so signs of different batches cancel (the
reference's signed sum, not a sum of magnitudes). Then top-K per output row.

Only the selectable weights require grad while scoring, so no gradient is allocated for biases,
norms, heads or decoders that the selection does not rank. The reference scores in train mode
(drop-path active); ``train_mode`` keeps that default.

Losses:
- ``"supcon"`` (the paper's classification default): supervised contrastive loss on the pre-head
  features of two augmented views of each batch; the head gets no gradient.
- ``"ce"``: cross entropy on the model's logits.
- any callable ``loss(outputs, targets) -> scalar``: the task loss (for segmentation, the training loss,
  as GPS does on SAM).
"""

from __future__ import annotations

from dataclasses import field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg_peft.selection.base import NOT_SAVED, TopKSelector, gradients_for, model_device, settings_dataclass
from medseg_peft.selection.batches import call_model, iter_batches
from medseg_peft.selection.supcon import supcon_loss

LOSSES = ("supcon", "ce")
AMP_DTYPES = ("float16", "bfloat16")


def random_views(x: torch.Tensor) -> torch.Tensor:
    """A random-resized crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip of each image.

    The default second-view augmentation when a loader yields single views; the geometric part of
    the reference's two-crop transform (colour jitter belongs in the data pipeline, before
    normalisation: pass two-view batches or ``augment=`` to match the paper exactly).
    """
    from torchvision.transforms import v2

    crop = v2.Compose([v2.RandomResizedCrop(tuple(x.shape[-2:]), scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    return torch.stack([crop(img) for img in x])


def pre_head_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features a classifier head sees: timm's ``pre_logits``, else the input of ``model.head``."""
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"GPS(loss='supcon') needs pre-head features, but {type(model).__name__} is no timm model and has no "
            "`head` module; pass feature_fn=(model, x) -> features"
        )
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0].flatten(1)


@settings_dataclass
class GPS(TopKSelector):
    """Gradient-based selection: ``|sum of gradients|``, top-K per output row.

    Args:
        k: entries per output row.
        loss: ``"supcon"``, ``"ce"`` or a callable ``(outputs, targets) -> loss``.
        temperature: SupCon temperature (0.07 in the reference).
        augment: ``x -> x'`` making one random view of a batch for SupCon when the loader yields one
            view (default :func:`random_views`); a loader may instead yield ``([view1, view2], labels)``.
        feature_fn: ``(model, x) -> features`` for SupCon on a model that is not a timm classifier.
        train_mode: score with the model in train mode (the reference; drop-path active).
        amp: autocast the forward on CUDA, as the reference's selection pass (``torch.cuda.amp.autocast``,
            FightingFighting/GPS train_gps.py ``calculate_gradient``); parameters and their gradients stay fp32.
            CPU runs are never autocast.
        amp_dtype: ``"float16"`` (the reference's autocast default) or ``"bfloat16"``. Like the reference, the
            backward is not loss-scaled (no GradScaler), so float16 may flush tiny gradients to zero as
            it does there; ``"bfloat16"`` has float32's range. A non-finite gradient is an error.
        eligibility, max_batches, seed: see :class:`~medseg_peft.selection.base.ScoredSelector`.
    """

    method = "gps"
    loss: str | Callable = field(default="supcon", kw_only=True)
    temperature: float = field(default=0.07, kw_only=True)
    augment: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, kw_only=True, metadata=NOT_SAVED)
    feature_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = field(default=None, kw_only=True, metadata=NOT_SAVED)
    train_mode: bool = field(default=True, kw_only=True)
    amp: bool = field(default=False, kw_only=True)
    amp_dtype: str = field(default="float16", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.loss) and self.loss not in LOSSES:
            raise ValueError(f"GPS loss must be one of {LOSSES} or a callable (outputs, targets) -> loss, got {self.loss!r}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"GPS amp_dtype must be one of {AMP_DTYPES} (the autocast dtype of the selection pass on CUDA; "
                             f"float16 is the reference's), got {self.amp_dtype!r}")
        self.augment = self.augment or random_views
        self.feature_fn = self.feature_fn or pre_head_features

    def batch_loss(self, model: nn.Module, x, y) -> torch.Tensor:
        if self.loss == "supcon":
            views = list(x) if isinstance(x, (list, tuple)) else [self.augment(x), self.augment(x)]
            feats = self.feature_fn(model, torch.cat(views))
            feats = feats.reshape(len(views), -1, feats.shape[-1]).transpose(0, 1)
            return supcon_loss(feats, y, self.temperature, self.temperature)
        out = call_model(model, x)
        if y is None:
            raise ValueError(f"GPS(loss={self.loss!r}) needs targets, but the selection batches carry none")
        return F.cross_entropy(out, y) if self.loss == "ce" else self.loss(out, y)

    def statistics(self, model: nn.Module, batches: Iterable, selectable: Sequence[str]) -> dict[str, torch.Tensor]:
        """The signed gradient sums (summed over ranks before the absolute value is taken)."""
        device = model_device(model)
        autocast = self.amp and device.type == "cuda"
        with gradients_for(model, selectable, self.train_mode) as params:
            for x, y in iter_batches(batches, device, self.max_batches):
                with torch.autocast(device.type, dtype=getattr(torch, self.amp_dtype), enabled=autocast):
                    loss = self.batch_loss(model, x, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"GPS: the selection loss is {loss.item()}; check the inputs and the loss")
                loss.backward()
            grads = {n: torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad for n in selectable}
            if autocast:
                bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
                if bad:
                    raise FloatingPointError(f"GPS: non-finite gradients under {self.amp_dtype} autocast in {bad[:3]}"
                                             f"{' ...' if len(bad) > 3 else ''}; try amp_dtype='bfloat16' or amp=False")
            return grads

    def scores(self, model: nn.Module, stats: Mapping[str, torch.Tensor], selectable: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, stats[n].abs()) for n in selectable)
