"""ViT classifiers from timm, built offline, with pre-trained weights from the user's file.

GPS uses the AugReg ImageNet-21k ViT-B/16 (``B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz``),
SPT, VPT and NOAH Google's original ``ViT-B_16.npz``; both are JAX ``.npz`` files that timm's own
loader converts. timm ``.pth`` / ``.safetensors`` state_dicts load too. The head is always new
(C classes, timm's truncated-normal init), since the pre-trained one has 21,843 classes; every other
tensor must fit, or the file is refused with the first mismatches named.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DEFAULT_ARCH = "vit_base_patch16_224_in21k"
# the embedded demo ViT: timm's VisionTransformer at CPU widths (32 px, patch 4)
DEMO_ARCH = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 3.0}
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights" / "demo_vit.safetensors"


def _build(arch: str, num_classes: int, drop_path: float) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if arch == "demo":
        return VisionTransformer(num_classes=num_classes, drop_path_rate=drop_path, **DEMO_ARCH)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    except RuntimeError as err:  # timm: "Unknown model"
        raise ValueError(f"unknown ViT architecture {arch!r} ({err}); e.g. {DEFAULT_ARCH!r} or 'demo'") from err


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    return state


def load_vit_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Pre-trained weights into ``model`` (all but the head, which stays as built); refuse a file that does not fit."""
    from timm.models.vision_transformer import _load_weights

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pre-trained ViT file {path} does not exist")
    head = {k: v.detach().clone() for k, v in model.get_classifier().state_dict().items()}
    try:
        if path.suffix == ".npz":
            _load_weights(model, str(path))  # timm's JAX converter; loads the head only if its size matches
        else:
            state = {k: v for k, v in _state_dict(path).items() if not k.startswith("head.")}
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.startswith("head.")]
            if missing or result.unexpected_keys:
                raise ValueError(f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    except Exception as err:  # timm's npz converter and load_state_dict raise KeyError / RuntimeError / ValueError
        detail = " ".join(str(err).split())[:400]
        raise ValueError(f"pre-trained file {path} does not fit a {type(model).__name__} with embed_dim "
                         f"{model.embed_dim} and {len(model.blocks)} blocks: {detail}") from err
    model.get_classifier().load_state_dict(head)  # the new task's head, never the pre-training one
    return model


def build_vit(arch: str = DEFAULT_ARCH, num_classes: int = 100, pretrained: str | Path | None = None, drop_path: float = 0.0) -> nn.Module:
    """A timm ViT with a new ``num_classes`` head; ``pretrained``: a ``.npz`` / ``.pth`` / ``.safetensors`` file, or none."""
    model = _build(arch, int(num_classes), float(drop_path))
    if pretrained is not None:
        load_vit_weights(model, pretrained)
    return model


def demo_vit(num_classes: int, drop_path: float = 0.0) -> nn.Module:
    """The embedded demo ViT, pretrained on a synthetic source task (``scripts/pretrain_demo_vit.py``)."""
    if not DEMO_WEIGHTS.is_file():
        raise FileNotFoundError(f"the demo ViT weights {DEMO_WEIGHTS} are missing; run scripts/pretrain_demo_vit.py")
    return build_vit("demo", num_classes, DEMO_WEIGHTS, drop_path)
