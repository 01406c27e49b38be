"""SAM models: segment-anything's classes with a ViT or TinyViT image encoder, the official variants, the demo and test sizes.

The three official variants mirror ``segment_anything.build_sam`` exactly (same classes and
arguments), but take the input size as a parameter: SAM's 1024 px is often more than a medical task
or a CPU needs, so a smaller size builds a smaller position grid and a checkpoint trained at 1024 is
resized on load (position embedding: bicubic; relative-position tables of the global-attention
blocks: linear, as SAMed and MedSAM-style projects do). Windowed blocks keep their tables, since the
window size does not change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# relative imports: an exported bundle carries these modules as its own scripts/ package
from .named_checkpoints import resolve_checkpoint
from .tiny_vit import TinyViT, TinyViTConfig


@dataclass(frozen=True)
class SamConfig:
    """One SAM variant: its image encoder, its decoder widths, and how its checkpoint was trained to see images.

    ``encoder`` is ``None`` for SAM's own ViT (``embed_dim`` ... ``window_size``) or a ``TinyViTConfig``.
    ``intensity``: ``"sam"`` takes 0-255 RGB and subtracts SAM's pixel mean / divides by its std;
    ``"minmax"`` scales each image to [0, 1] by its own minimum and maximum, as MedSAM and LiteMedSAM
    were trained. ``resize``: ``"square"`` resizes to the input size on both axes; ``"longest_side"``
    resizes the longest side to the input size, keeps the aspect ratio and pads bottom-right (SAM's
    and MedSAM's own protocol), so the output is cropped to the image before it is resized back.
    """

    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    global_attn_indexes: tuple[int, ...] = ()
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    encoder: TinyViTConfig | None = None
    intensity: str = "sam"
    resize: str = "square"


SAM_VARIANTS: dict[str, SamConfig] = {
    # Meta's checkpoints: sam_vit_b_01ec64.pth (MedSAM shares this layout), sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
    # the embedded demo model: SAM's classes at CPU widths (about 1 M parameters)
    "demo": SamConfig(96, 4, 3, (1, 3), image_size=128, patch_size=8, window_size=8, out_chans=64, decoder_depth=2,
                      decoder_mlp_dim=256, decoder_heads=4, iou_head_depth=2, iou_head_hidden_dim=64, mask_in_chans=8),
    # LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch): TinyViT distilled from MedSAM, 256 px, MedSAM's preprocessing
    "lite_medsam": SamConfig(image_size=256, patch_size=4, encoder=TinyViTConfig(), intensity="minmax", resize="longest_side"),
    # MobileSAM (ChaoningZhang/MobileSAM, mobile_sam.pt): the same TinyViT at 1024 px, distilled from SAM ViT-H
    "vit_t": SamConfig(patch_size=16, encoder=TinyViTConfig(patch_embed="strided", head_classes=1000), resize="longest_side"),
    # for tests
    "tiny_lite": SamConfig(
        image_size=64, patch_size=4, out_chans=32, decoder_depth=1, decoder_mlp_dim=64, decoder_heads=2, iou_head_depth=2,
        iou_head_hidden_dim=32, mask_in_chans=4, intensity="minmax", resize="longest_side",
        encoder=TinyViTConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), window_sizes=(4, 4, 8, 4), out_chans=32),
    ),
    "tiny": SamConfig(32, 2, 2, (1,), image_size=64, window_size=2, out_chans=32, decoder_depth=1, decoder_mlp_dim=64,
                      decoder_heads=2, iou_head_depth=2, iou_head_hidden_dim=32, mask_in_chans=4),
}


def variant_config(variant: str) -> SamConfig:
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; known variants: {sorted(SAM_VARIANTS)}")
    return SAM_VARIANTS[variant]


def _build(cfg: SamConfig, image_size: int) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if cfg.encoder is not None:
        encoder = TinyViT(cfg.encoder, image_size)
        grid = encoder.embedding_size
    else:
        grid = image_size // cfg.patch_size
        encoder = ImageEncoderViT(
            depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=cfg.num_heads, patch_size=cfg.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=cfg.global_attn_indexes,
            window_size=cfg.window_size, out_chans=cfg.out_chans,
        )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.out_chans, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.out_chans, mlp_dim=cfg.decoder_mlp_dim,
                                          num_heads=cfg.decoder_heads),
            transformer_dim=cfg.out_chans, iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def read_sam_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A SAM state_dict from ``.pth`` / ``.pt`` (raw, or nested under "model" / "state_dict"), ``.safetensors``
    or a checkpoint name (``"lite_medsam"``, see ``named_checkpoints``)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"SAM checkpoint {path} could not be read as a PyTorch or safetensors file: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state_dict of tensors")
    if not any(k.startswith("image_encoder.") for k in state):
        raise ValueError(f"{path} is not a SAM state_dict: no 'image_encoder.*' keys (found e.g. {list(state)[:3]})")
    return state


def _tiny_vit_signature(state: dict[str, torch.Tensor]) -> tuple | None:
    """(first width, patch-embedding kernel, blocks per stage) of a TinyViT state_dict, else None."""
    embed = state.get("image_encoder.patch_embed.seq.2.c.weight")
    if embed is None:
        return None
    blocks: dict[int, set[int]] = {}
    for k in state:
        if m := re.match(r"image_encoder\.layers\.(\d+)\.blocks\.(\d+)\.", k):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return embed.shape[0], embed.shape[-1], tuple(len(blocks[i]) for i in sorted(blocks)), "image_encoder.head.weight" in state


def detect_variant(state: dict[str, torch.Tensor]) -> str | None:
    """The variant whose encoder (ViT width and depth, or TinyViT widths, patch embedding and depths) matches a state_dict."""
    if (tiny := _tiny_vit_signature(state)) is not None:
        for name, cfg in SAM_VARIANTS.items():
            enc = cfg.encoder
            if enc is not None and tiny == (enc.embed_dims[0], 3 if enc.patch_embed == "strided" else 1, enc.depths, enc.head_classes > 0):
                return name
        return None
    width = state["image_encoder.patch_embed.proj.weight"].shape[0] if "image_encoder.patch_embed.proj.weight" in state else None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    for name, cfg in SAM_VARIANTS.items():
        if cfg.encoder is None and (cfg.embed_dim, cfg.depth) == (width, depth):
            return name
    return None


def resize_position_tables(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Interpolate ``pos_embed`` and relative-position tables of ``state`` to ``model``'s shapes."""
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 4:  # [1, H, W, C]
            size = target[key].shape[1:3]
            out[key] = F.interpolate(value.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).to(value.dtype)
        elif re.search(r"rel_pos_[hw]$", key) and value.ndim == 2:  # [2 * grid - 1, head_dim]
            length = target[key].shape[0]
            out[key] = F.interpolate(value.t()[None].float(), size=length, mode="linear", align_corners=False)[0].t().to(value.dtype)
    return out


def build_sam(variant: str | None = None, checkpoint: str | Path | None = None, image_size: int | None = None) -> nn.Module:
    """A ``segment_anything.modeling.Sam`` of ``variant`` at ``image_size`` (default: the variant's own), with weights
    from ``checkpoint`` (random without one). ``variant=None`` reads the variant off the checkpoint's weights;
    the model's ``variant`` attribute names the one built."""
    state = read_sam_state_dict(checkpoint) if checkpoint is not None else None
    found = detect_variant(state) if state is not None else None
    if variant is None:
        if state is None:
            raise ValueError("a SAM needs a sam_variant or a sam_checkpoint to read it from")
        if found is None:
            raise ValueError(f"SAM checkpoint {checkpoint} matches no known variant ({sorted(SAM_VARIANTS)}); pass sam_variant")
        variant = found
    cfg = variant_config(variant)
    size = cfg.image_size if image_size is None else int(image_size)
    if size <= 0 or size % cfg.patch_size:
        raise ValueError(f"image_size must be a positive multiple of the patch size {cfg.patch_size}, got {image_size!r}")
    model = _build(cfg, size)
    model.variant = variant
    if state is None:
        return model
    if found != variant:
        what = f"a {found} SAM" if found else "a SAM of no known variant"
        raise ValueError(f"SAM checkpoint {checkpoint} is {what}, but sam_variant={variant!r} was asked for")
    result = model.load_state_dict(resize_position_tables(state, model), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"SAM checkpoint {checkpoint} does not fit the {variant} model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def resize_mask_outputs(decoder: nn.Module, n: int) -> None:
    """Give SAM's ``MaskDecoder`` exactly ``n`` multimask outputs, one per class, in place.

    SAM has three multimask tokens (for the ambiguity of a click); a prompt-free semantic segmenter
    with ``n`` classes needs ``n``, as SAMed does. The new tokens, their hypernetwork MLPs and the IoU
    head's rows are copies of the pre-trained multimask ones taken in turn, so every class starts from
    a trained mask token rather than from noise; tuning then pulls them apart.
    """
    import copy

    if n < 1:
        raise ValueError(f"a mask decoder needs at least one output, got {n}")
    old = decoder.num_multimask_outputs
    if n == old:
        return
    source = [0] + [1 + (i % old) for i in range(n)]  # token 0 stays the single-mask token
    tokens = nn.Embedding(n + 1, decoder.mask_tokens.embedding_dim)
    iou_last = decoder.iou_prediction_head.layers[-1]
    iou_new = nn.Linear(iou_last.in_features, n + 1)
    with torch.no_grad():
        tokens.weight.copy_(decoder.mask_tokens.weight[source])
        iou_new.weight.copy_(iou_last.weight[source])
        iou_new.bias.copy_(iou_last.bias[source])
    decoder.mask_tokens = tokens.to(decoder.mask_tokens.weight.device)
    decoder.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(decoder.output_hypernetworks_mlps[i]) for i in source)
    decoder.iou_prediction_head.layers[-1] = iou_new.to(iou_last.weight.device)
    decoder.num_multimask_outputs = n
    decoder.num_mask_tokens = n + 1
