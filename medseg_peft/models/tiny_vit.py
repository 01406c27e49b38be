"""TinyViT as SAM's image encoder: the backbone of MobileSAM and LiteMedSAM.

Written from the TinyViT paper (Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision
Transformers", ECCV 2022) and the SAM configurations published with MobileSAM (Zhang et al., 2023,
ChaoningZhang/MobileSAM) and LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch). Module and parameter
names follow those checkpoints, so their state_dicts load strictly.

The network has four stages. Stage 0 is convolutional (MBConv blocks: 1x1 expand, 3x3 depthwise,
1x1 project, residual); stages 1-3 are transformer blocks with attention inside local windows, a
learned bias per head and relative offset (``attention_biases``) instead of position embeddings, a
3x3 depthwise convolution between attention and MLP, and pre-norm LayerNorms inside the attention
and the MLP. Between stages a convolutional patch merging halves the resolution, except the last
one (stride 1), so the 64 x 64 embedding SAM's decoder expects comes out of a 256 px input (LiteMedSAM,
1x1 stride-1 patch embedding) or a 1024 px one (MobileSAM, two 3x3 stride-2 convolutions).

Every convolution is followed by a BatchNorm whose running statistics come from pre-training. They
stay in eval mode whatever ``train()`` is asked for: fine-tuning on a few dozen images would
otherwise overwrite them with noisy batch statistics, and a merged delta would no longer reproduce
the tuned model. The BatchNorm's affine weight and bias remain ordinary parameters.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


@dataclass(frozen=True)
class TinyViTConfig:
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    patch_embed: str = "pointwise"  # "pointwise": 1x1 stride 1 (LiteMedSAM); "strided": 3x3 stride 2, twice (MobileSAM)
    last_merge_stride: int = 1
    mlp_ratio: float = 4.0
    mbconv_expand: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    head_classes: int = 0  # MobileSAM's checkpoint keeps TinyViT's unused ImageNet head

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell."""
        merges = [2] * (len(self.depths) - 2) + [self.last_merge_stride]
        return (4 if self.patch_embed == "strided" else 1) * math.prod(merges)


class ConvBN(nn.Sequential):
    """A bias-free convolution ``c`` followed by a BatchNorm ``bn``."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: TinyViTConfig, in_chans: int = 3):
        super().__init__()
        dim = cfg.embed_dims[0]
        kernel, stride = (3, 2) if cfg.patch_embed == "strided" else (1, 1)
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2, kernel, stride), nn.GELU(), ConvBN(dim // 2, dim, kernel, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, then the residual add and GELU."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1, self.act1 = ConvBN(dim, hidden), nn.GELU()
        self.conv2, self.act2 = ConvBN(hidden, hidden, 3, groups=hidden), nn.GELU()
        self.conv3, self.act3 = ConvBN(hidden, dim), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 to the next width, 3x3 depthwise with the stage's stride, 1x1; tokens out."""

    def __init__(self, dim: int, out_dim: int, stride: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # tokens [B, H*W, C] from a transformer stage
            h, w = self.resolution
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


def relative_offsets(window: int) -> tuple[int, torch.Tensor]:
    """How many distinct ``(|dy|, |dx|)`` offsets a window has, and each token pair's offset index."""
    points = list(itertools.product(range(window), range(window)))
    ids: dict[tuple[int, int], int] = {}
    pairs = [ids.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(ids)) for a in points for b in points]
    return len(ids), torch.tensor(pairs, dtype=torch.long).view(len(points), len(points))


class Attention(nn.Module):
    """Multi-head attention over one window, with a learned bias per head and relative offset.

    The fused ``qkv`` projection is laid out per head (``[q_h, k_h, v_h]`` for each head in turn), not
    as three blocks, so its rows for "all queries" are interleaved.
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        count, index = relative_offsets(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim).transpose(1, 2).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.key_dim**-0.5 + self.attention_biases[:, self.attention_bias_idxs]
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (residual), a 3x3 depthwise convolution, an MLP (residual).

    A feature map that the window does not divide is padded bottom-right with zero tokens before the
    attention's LayerNorm, as in the pre-trained models, so the padded tokens take part as keys.
    """

    def __init__(self, dim: int, num_heads: int, window: int, resolution: tuple[int, int], cfg: TinyViTConfig):
        super().__init__()
        self.window, self.resolution = window, resolution
        self.attn = Attention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, cfg.local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (h, w), s = self.resolution, self.window
        b, length, c = x.shape
        grid = x.view(b, h, w, c)
        ph, pw = (s - h % s) % s, (s - w % s) % s
        grid = F.pad(grid, (0, 0, 0, pw, 0, ph))
        nh, nw = (h + ph) // s, (w + pw) // s
        windows = grid.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
        attended = self.attn(windows).view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, h + ph, w + pw, c)
        x = x + attended[:, :h, :w].reshape(b, length, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


def _conv_out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # a 3x3 convolution with padding 1 (or 1x1 with none)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: ``[B, 3, S, S]`` -> ``[B, out_chans, S / stride, S / stride]``."""

    def __init__(self, cfg: TinyViTConfig, img_size: int):
        super().__init__()
        self.cfg, self.img_size = cfg, int(img_size)
        self.patch_embed = PatchEmbed(cfg)
        side = self.img_size
        if cfg.patch_embed == "strided":
            side = _conv_out(_conv_out(side, 2), 2)
        dims, last = cfg.embed_dims, len(cfg.depths) - 1
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            res = (side, side)
            if i == 0:
                blocks = [MBConv(dims[0], cfg.mbconv_expand) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dims[i], cfg.num_heads[i], cfg.window_sizes[i], res, cfg) for _ in range(depth)]
            down = None
            if i < last:
                stride = cfg.last_merge_stride if i == last - 1 else 2
                down = PatchMerging(dims[i], dims[i + 1], stride, res)
                side = _conv_out(side, stride)
            self.layers.append(Stage(blocks, down))
        self.embedding_size = side
        if cfg.head_classes:
            self.norm_head = nn.LayerNorm(dims[-1])
            self.head = nn.Linear(dims[-1], cfg.head_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, 1, bias=False), LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False), LayerNorm2d(cfg.out_chans),
        )

    def train(self, mode: bool = True) -> "TinyViT":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # pre-trained statistics stay (module docstring)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        side = self.embedding_size
        return self.neck(x.transpose(1, 2).reshape(x.shape[0], -1, side, side))
