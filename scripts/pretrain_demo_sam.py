"""Pretrain the embedded demo SAM on the synthetic shapes source task and write it into the package.

    python scripts/pretrain_demo_sam.py            # ~10 min on 2 CPU cores; rewrites
                                                  # medseg_peft/models/weights/demo_sam.safetensors

The demo model stands in for Meta's SAM when a bundle runs with no checkpoint: same classes, small
widths, pretrained by this script on generic shapes on textures (``medseg_peft.data.synthetic_shapes``),
never on polyps. The training log (loss, held-out shapes Dice, zero-shot Dice on synthetic polyps)
goes to ``demo_sam_log.json`` beside the weights; README quotes it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from medseg_peft.data.synthetic_shapes import shapes_image_pair
from medseg_peft.io import atomic_save_safetensors
from medseg_peft.models import SamSegmenter, build_sam
from medseg_peft.workflows.metrics import binarize, per_image_scores
from medseg_peft.workflows.schedule import warmup_cosine

WEIGHTS = Path(__file__).resolve().parents[1] / "medseg_peft" / "models" / "weights"


def shapes_batch(rng: np.random.Generator, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [shapes_image_pair(rng, size) for _ in range(n)]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float()
    y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].float()
    return x, y


def mean_dice(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([binarize(model(x[i : i + batch])) for i in range(0, len(x), batch)])
    model.train()
    return float(per_image_scores(preds, y)["dice"].mean())


def polyp_check_set(size: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic polyps (the target task) loaded through the real loader, for the zero-shot figure."""
    from medseg_peft.data import make_synthetic_polyps, polyp_datalists, polyp_transforms

    root = make_synthetic_polyps(n_images=n, size=160, seed=123)
    items = [*polyp_datalists(root, val_fraction=0.2, seed=0)[0], *polyp_datalists(root, val_fraction=0.2, seed=0)[1]]
    tf = polyp_transforms(size, train=False)
    data = [tf(item) for item in items]
    return torch.stack([d["image"] for d in data]).float(), torch.stack([d["label"] for d in data]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS / "demo_sam.safetensors")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = SamSegmenter(build_sam("demo"))
    size = model.image_size
    rng = np.random.default_rng(args.seed)
    val_x, val_y = shapes_batch(np.random.default_rng(10_000 + args.seed), 128, size)
    polyp_x, polyp_y = polyp_check_set(size)
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, args.steps // 20, args.steps)
    log = {"settings": vars(args) | {"out": str(args.out), "image_size": size, "params": sum(p.numel() for p in model.parameters())}, "history": []}
    start, running = time.perf_counter(), []
    model.train()
    for step in range(1, args.steps + 1):
        x, y = shapes_batch(rng, args.batch_size, size)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % 100 == 0 or step == args.steps:
            entry = {"step": step, "loss": float(np.mean(running)), "seconds": round(time.perf_counter() - start, 1)}
            running = []
            if step % 500 == 0 or step == args.steps:
                entry["shapes_val_dice"] = mean_dice(model, val_x, val_y)
                entry["polyp_zero_shot_dice"] = mean_dice(model, polyp_x, polyp_y)
            log["history"].append(entry)
            print(json.dumps(entry), flush=True)
    state = {k: v.detach().contiguous() for k, v in model.sam.state_dict().items()}
    atomic_save_safetensors(state, args.out, {"medseg_peft": json.dumps({"format": "demo_sam", "variant": "demo", "image_size": size})})
    args.out.with_name("demo_sam_log.json").write_text(json.dumps(log, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
