"""SAM as a semantic segmenter: images (and optionally boxes) in, mask logits at the image's resolution out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .sam import build_sam, resize_mask_outputs, variant_config  # relative: exported bundles carry a copy

INTENSITIES = ("sam", "minmax")
RESIZES = ("square", "longest_side")
EMPTY_LOGIT = -20.0  # an output channel no box asks for: sigmoid(-20) ~ 2e-9, nothing predicted


def is_padding(boxes: torch.Tensor) -> torch.Tensor:
    """Which rows of ``[..., 4 | 5]`` boxes are padding (every coordinate negative), not boxes."""
    return (boxes[..., :4] < 0).all(-1)


class SamSegmenter(nn.Module):
    """Semantic segmentation with SAM: an image batch in, ``num_outputs`` mask logits out at its resolution.

    Prompt-free by default: no points or boxes, so the decoder works from its learned no-prompt
    embedding, as in GPS's polyp experiments and SAMed's organ segmentation. One output uses SAM's
    single-mask token; ``num_outputs > 1`` resizes the decoder to that many multimask tokens, one per
    channel (classes, with or without a background channel: the caller's choice of softmax or sigmoid).

    Inputs are RGB 0-255 by default (SAM's own convention). ``in_channels=1, input_scale=255`` takes
    grey slices in [0, 1] (a CT window or MR percentile scaling) and repeats them to three channels
    here, so the data pipeline, the inferer and an exported model all see the volume's own channel and
    in-plane size; the resize to SAM's input size and back, and the intensity scaling the checkpoint
    was trained with (``intensity``, ``resize``: see ``SamConfig``), also happen here.

    Box prompts, MedSAM's protocol, in input pixels (x along the width), decoded image by image
    (the decoder would otherwise pair every image with every box):

    * ``[B, 4]`` xyxy: one box per image;
    * ``[B, N, 4]``: up to N boxes per image, one per object; rows of -1 are padding. The image's
      prediction is the union (the highest logit over its boxes);
    * ``[B, N, 5]``: the fifth column is the output channel each box segments (per-class sigmoid
      outputs); a channel no box of the image names is empty (``EMPTY_LOGIT``).
    """

    def __init__(self, sam: nn.Module, num_outputs: int = 1, in_channels: int = 3, input_scale: float = 1.0,
                 intensity: str = "sam", resize: str = "square"):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"SamSegmenter takes 1 (grey) or 3 (RGB) input channels, got {in_channels}")
        if intensity not in INTENSITIES or resize not in RESIZES:
            raise ValueError(f"intensity must be one of {INTENSITIES} and resize one of {RESIZES}, got {intensity!r}, {resize!r}")
        if num_outputs > 1:
            resize_mask_outputs(sam.mask_decoder, num_outputs)
        self.sam = sam
        self.num_outputs = int(num_outputs)
        self.in_channels = in_channels
        self.input_scale = float(input_scale)
        self.intensity, self.resize = intensity, resize
        self._embeddings: dict[str, torch.Tensor] | None = None

    def cache_embeddings(self, enabled: bool = True) -> "SamSegmenter":
        """Compute each distinct image's embedding once and reuse it while the image encoder is frozen.

        Images are recognised by the bytes of their pre-processed tensor, so a cached embedding is
        never used for another image: with random augmentation it simply stops saving time. The cache
        is bypassed whenever any encoder parameter requires grad (a method that trains the encoder).
        """
        self._embeddings = {} if enabled else None
        return self

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.sam.image_encoder
        if self._embeddings is None or any(p.requires_grad for p in encoder.parameters()):
            return encoder(x)
        keys = [hashlib.sha1(xi.detach().float().cpu().numpy().tobytes()).hexdigest() for xi in x]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        missing = [i for k, i in first.items() if k not in self._embeddings]
        if missing:
            with torch.no_grad():
                for i, e in zip(missing, encoder(x[missing])):
                    self._embeddings[keys[i]] = e
        return torch.stack([self._embeddings[k] for k in keys])

    @property
    def variant(self) -> str | None:
        """The SAM variant (``vit_b``, ``lite_medsam``, ``demo``, ...) this segmenter was built as."""
        return getattr(self.sam, "variant", None)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    def _fitted_size(self, h: int, w: int) -> tuple[int, int]:
        s = self.image_size
        if self.resize == "square":
            return s, s
        h, w = int(h), int(w)
        scale = s / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` as the pipeline gives it -> ``[B, 3, S, S]`` as the encoder was trained to see it."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SamSegmenter expects images [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        s = self.image_size
        nh, nw = self._fitted_size(*x.shape[-2:])
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        # always resized, even at (s, s) where it is an exact copy: no size branch, so tracing and
        # torch.export keep the resize and the exported graph takes any slice size
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        if self.intensity == "minmax":
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            x = (x - low) / (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-8)
        else:
            x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        return F.pad(x, (0, s - nw, 0, s - nh))  # bottom-right, zeros after scaling, as SAM and MedSAM pad

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        nh, nw = self._fitted_size(h, w)
        embeddings = self._encode(self.preprocess(x))
        # tuned decoder weights are parametrized; compute them once per batch, not once per image
        with parametrize.cached():
            if boxes is None:
                masks = self._decode(embeddings, None)
            else:
                boxes = self._scaled_boxes(boxes, h, w, nh, nw)
                masks = torch.cat([self._decode_boxes(embeddings[i : i + 1], boxes[i]) for i in range(embeddings.shape[0])])
        if self.resize == "longest_side":  # the padding is not part of the image: crop it off the logits
            cells = masks.shape[-1] / self.image_size  # decoder cells per input pixel
            masks = masks[..., : max(1, int(nh * cells + 0.5)), : max(1, int(nw * cells + 0.5))]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)

    def _scaled_boxes(self, boxes: torch.Tensor, h: int, w: int, nh: int, nw: int) -> torch.Tensor:
        if boxes.ndim == 2:
            boxes = boxes[:, None]
        if boxes.ndim != 3 or boxes.shape[-1] not in (4, 5):
            raise ValueError(f"boxes must be [B, 4], [B, N, 4] or [B, N, 5] (xyxy[, channel]), got shape {tuple(boxes.shape)}")
        boxes = boxes.to(torch.float32)
        scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], device=boxes.device)
        padding = is_padding(boxes)[..., None]
        xyxy = torch.where(padding, boxes[..., :4], boxes[..., :4] * scale)
        return torch.cat([xyxy, boxes[..., 4:]], dim=-1)

    def _decode_boxes(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One image's boxes ``[N, 4|5]`` -> ``[1, num_outputs, h, w]`` low-resolution logits, each channel the union of its boxes."""
        valid = boxes[~is_padding(boxes)]
        side = embedding.shape[-1] * 4
        out = embedding.new_full((1, self.num_outputs, side, side), EMPTY_LOGIT)
        if valid.shape[0] == 0:
            return out
        per_box = self._decode(embedding, valid[:, :4].to(embedding.dtype))[:, 0]  # [N, h, w], single-mask token
        if valid.shape[1] == 4:
            return per_box.amax(0)[None, None].expand(1, self.num_outputs, -1, -1)
        channels = valid[:, 4].long()
        if channels.min() < 0 or channels.max() >= self.num_outputs:
            raise ValueError(f"a box names output channel {int(channels.max())}, but the model has {self.num_outputs} outputs")
        planes = [per_box[channels == c].amax(0) if (channels == c).any() else out[0, c] for c in range(self.num_outputs)]
        return torch.stack(planes)[None]

    def _decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embeddings, image_pe=self.sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=boxes is None and self.num_outputs > 1,
        )
        return low_res


def sam_segmenter(variant: str | None = None, checkpoint: str | Path | None = None, image_size: int | None = None, **wrapper) -> SamSegmenter:
    """``build_sam`` wrapped in a ``SamSegmenter`` that sees images as its variant was trained to (``variant=None``:
    the checkpoint's own); ``wrapper`` keys go to the segmenter (``num_outputs``, ``in_channels``, ...)."""
    sam = build_sam(variant, checkpoint, image_size)
    cfg = variant_config(sam.variant)
    wrapper = {"intensity": cfg.intensity, "resize": cfg.resize, **wrapper}
    return SamSegmenter(sam, **wrapper)


DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_sam.safetensors"


def demo_segmenter(image_size: int | None = None, **wrapper) -> SamSegmenter:
    """The embedded demo model: SAM's architecture at demo widths, pretrained on synthetic shapes."""
    if not DEMO_WEIGHTS.is_file():
        raise FileNotFoundError(f"the demo weights {DEMO_WEIGHTS} are missing; reinstall medseg-peft or run scripts/pretrain_demo_sam.py")
    return sam_segmenter("demo", DEMO_WEIGHTS, image_size, **wrapper)
