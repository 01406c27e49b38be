"""Tiny models shared by the tests (a timm ViT and a segment-anything SAM with small widths) and a bundle runner."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn


def train_steps(model, batches, steps: int = 3, lr: float = 5e-2, weight_decay: float = 0.01):
    """A few AdamW passes over ``batches`` on the trainable parameters only; returns the optimizer."""
    import torch.nn.functional as F

    import medseg_peft as mp

    opt = torch.optim.AdamW(mp.trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return opt


BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
ORGAN = ["organ/organ_fps.json", "base.json"]  # a task bundle, then the shared trainer / checkpoint skeleton
CLASSIFY = ["classify/classify.json", "base.json"]


def bundle_files(config_file) -> list[str]:
    """Paths of a bundle and its layers: ``"polyp_fps.json"`` or ``["polyp_fps.json", "methods/gps.json", ...]``."""
    names = [config_file] if isinstance(config_file, str) else list(config_file)
    return [str(BUNDLES / name) for name in names]


def run_workflow(config_file, run_id: str = "run", **overrides):
    """A MONAI bundle config (or a list of layers) run as ``python -m monai.bundle run`` would, with the task's
    metadata and the repo's logging."""
    from monai.bundle import ConfigWorkflow

    files = bundle_files(config_file)
    task = Path(files[0]).parent  # a task's folder holds its metadata and logging, where MONAI looks by default
    wf = ConfigWorkflow(config_file=files, meta_file=str(task / "metadata.json"), logging_file=str(task / "logging.conf"),
                        workflow_type=None, run_id=run_id, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def export_organ_bundle(root: Path, **settings) -> tuple[Path, Path]:
    """The organ bundle trained and exported under ``root`` (``settings``: its keys), with the synthetic set cached in
    ``root/cache``; returns the exported bundle folder and that cache."""
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as patch:  # also for module-scoped fixtures and scripts, which have no monkeypatch
        patch.setenv("MEDSEG_PEFT_CACHE", str(cache))
        run_workflow(ORGAN, output_dir=str(root / "run"), **settings)
        run_workflow(ORGAN, run_id="export", output_dir=str(root / "run"), **settings)
    return root / "run" / "bundle", cache


def error_chain(err: BaseException) -> str:
    """Every message along an exception's causes: bundle errors wrap the one that names the file."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(parts)


def tiny_vit(num_classes: int = 5, seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


class TinySam(nn.Module):
    """A prompt-free SAM of the real classes, small enough for a CPU test."""

    def __init__(self, size: int = 64):
        super().__init__()
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

        self.image_encoder = ImageEncoderViT(
            img_size=size, patch_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, out_chans=32,
            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
        )
        self.prompt_encoder = PromptEncoder(embed_dim=32, image_embedding_size=(size // 16, size // 16), input_image_size=(size, size), mask_in_chans=4)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32, iou_head_depth=2, iou_head_hidden_dim=32,
        )
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.image_encoder(x)
        sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        masks = [
            self.mask_decoder(image_embeddings=e[None], image_pe=self.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                              dense_prompt_embeddings=dense, multimask_output=False)[0]
            for e in emb
        ]
        return nn.functional.interpolate(torch.cat(masks), size=x.shape[-2:], mode="bilinear", align_corners=False)


def tiny_sam(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinySam()


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def vit_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(2)]


@pytest.fixture
def sam():
    return tiny_sam()


@pytest.fixture
def sam_batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(2):
        x = torch.randn(2, 3, 64, 64, generator=g)
        y = (torch.rand(2, 1, 64, 64, generator=g) > 0.7).float()
        out.append({"image": x, "label": y})
    return out
