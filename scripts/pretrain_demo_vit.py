"""Pretrain the embedded demo ViT on the synthetic ``shapes`` source task and write it into the package.

    python scripts/pretrain_demo_vit.py        # a few minutes on 2 CPU cores; rewrites
                                               # medseg_peft/models/weights/demo_vit.safetensors

The demo ViT stands in for an ImageNet-21k ViT-B/16 when the classification bundle runs with no task
and no weights: timm's VisionTransformer at small widths, pretrained here on which-shape-is-drawn,
never on the counting target task. The log (loss, held-out shapes accuracy) goes to demo_vit_log.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg_peft.data.synthetic_classes import SHAPES, synthetic_image
from medseg_peft.io import atomic_save_safetensors
from medseg_peft.models.vit import build_vit
from medseg_peft.workflows.schedule import warmup_cosine

WEIGHTS = Path(__file__).resolve().parents[1] / "medseg_peft" / "models" / "weights"


def batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [synthetic_image(rng, "shapes") for _ in range(n)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255
    return (x - 0.5) / 0.5, torch.tensor([p[1] for p in pairs])  # the inception normalisation the recipes use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS / "demo_vit.safetensors")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = build_vit("demo", len(SHAPES))
    rng = np.random.default_rng(args.seed)
    val_x, val_y = batch(np.random.default_rng(10_000 + args.seed), 512)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = warmup_cosine(opt, args.steps // 20, args.steps)
    log = {"settings": vars(args) | {"out": str(args.out), "params": sum(p.numel() for p in model.parameters())}, "history": []}
    start, running = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        model.train()
        x, y = batch(rng, args.batch_size)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % 250 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                acc = float((model(val_x).argmax(1) == val_y).float().mean() * 100)
            entry = {"step": step, "loss": float(np.mean(running)), "shapes_val_top1": acc, "seconds": round(time.perf_counter() - start, 1)}
            running = []
            log["history"].append(entry)
            print(json.dumps(entry), flush=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, args.out, {"medseg_peft": json.dumps({"format": "demo_vit", "source_task": "shapes"})})
    args.out.with_name("demo_vit_log.json").write_text(json.dumps(log, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
