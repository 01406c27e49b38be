"""A VTAB-1k sized run per method: selection time, one epoch's time and peak memory, against full fine-tuning.

    python benchmarks/vtab_run_costs.py --device cuda                 # ViT-B/16, 1000 random 224 px images,
                                                                     # the CIFAR-100 recipe (batch 32, Adam, AMP)
    python benchmarks/vtab_run_costs.py --device cpu --arch demo --images 64 --image-size 32 --budget 10000   # smoke run

What the classification issue asks for on a GPU: the CIFAR-100 recipe's batch size, K, optimizer and
AMP, random images and labels (the cost does not depend on their content), selection as the runner
does it (GPS: SupCon on two views over one pass of the 1000 images), then one training epoch. Each
method runs in its own process, so every peak memory figure is that method's alone. Nothing asserts;
it prints ratios against full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

METHODS = ("full", "gps", "fps", "spt", "lora", "partial")


def one(args) -> dict:
    import medseg_peft as mp
    from medseg_peft.models.vit import build_vit
    from medseg_peft.recipes import load_recipe

    recipe = load_recipe("cifar100")["gps"]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_vit(args.arch, 100).to(device)
    bs, size = recipe["batch_size"], args.image_size
    n = args.images // bs
    xs = [torch.randn(bs, 3, size, size, device=device) for _ in range(n)]
    ys = [torch.randint(0, 100, (bs,), device=device) for _ in range(n)]
    amp = device.type == "cuda"
    if args.method == "gps":
        batches = [([x, x.flip(-1)], y) for x, y in zip(xs, ys)]  # two views, as the runner's selection loader gives
    else:
        batches = list(zip(xs, ys))
    settings = {"gps": dict(k=recipe["k"], loss="supcon", amp=amp), "fps": dict(k=recipe["k"]), "spt": dict(budget=args.budget),
                "lora": dict(rank=8), "partial": dict(strategy="attn"), "full": {}}[args.method]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = mp.selector(args.method, **settings)(model, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    selection_s = time.perf_counter() - start
    params = mp.trainable_parameters(model)
    opt = torch.optim.Adam(params, lr=recipe["lr"])
    model.train()
    start = time.perf_counter()
    for x, y in zip(xs, ys):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    epoch_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"method": args.method, "selection_s": selection_s, "epoch_s": epoch_s, "peak_mib": peak,
            "trainable": sum(p.numel() for p in params), "device": str(device), "arch": args.arch, "images": n * bs}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="vit_base_patch16_224_in21k")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--budget", type=int, default=400_000, help="SPT budget (the middle of the published 0.2-0.8 M)")
    ap.add_argument("--method", default=None, help="run one method in this process (used internally)")
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(one(args)), flush=True)
        return []
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--device", args.device, "--arch", args.arch, "--images", str(args.images),
               "--image-size", str(args.image_size), "--budget", str(args.budget), "--method", method]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    full = rows[0]
    print(f"== {full['arch']}, {full['device']}, {full['images']} images, CIFAR-100 recipe")
    print("method    trainable      selection s   epoch s   epoch / full   peak MiB   peak / full")
    for r in rows:
        print(f"{r['method']:8s} {r['trainable']:>11,}   {r['selection_s']:10.2f}   {r['epoch_s']:7.2f}   {r['epoch_s'] / full['epoch_s']:12.3f}"
              f"   {r['peak_mib']:8.0f}   {r['peak_mib'] / full['peak_mib']:11.3f}")
    return rows


if __name__ == "__main__":
    main()
