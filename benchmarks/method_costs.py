"""Every method side by side: selection time against GPS, training step time against full fine-tuning.

    python benchmarks/method_costs.py                        # CPU: ViT-S/16, batch 4 x 2 batches
    python benchmarks/method_costs.py --device cuda --model vit_b --batch-size 64 --batches 4

Same conventions as ``selection_costs.py`` (one process, same model and batches, interleaved repeats,
median after a warm-up): SPT's selection (squared gradients per batch + the budget search) is timed
against GPS's (one accumulated gradient), and one AdamW step per batch of each tuned model (FPS K=1,
SPT, LoRA r=8 on qkv, partial "attn", full) against the full fine-tuning step. Nothing asserts; it is a report.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from selection_costs import MODELS, build_model, interleaved, make_batches, train_pass

import medseg_peft as mp


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", default=None, choices=sorted(MODELS))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--budget", type=int, default=400_000, help="SPT budget (trainable entries)")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the training steps")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    model_name = args.model or ("vit_b" if cuda else "vit_s")
    bs, nb, reps = args.batch_size or (64 if cuda else 4), args.batches or (4 if cuda else 2), args.repeats or (10 if cuda else 5)
    base = build_model(model_name, args.num_classes, device)
    batches = make_batches(nb, bs, args.num_classes, device)

    sel = interleaved(
        {"GPS select": lambda: mp.GPS(k=1, loss="ce").select(base, batches), "SPT select": lambda: mp.SPT(budget=args.budget).select(base, batches)},
        reps, device,
    )
    methods = {"full": mp.Full(), "fps": mp.FPS(k=1), "spt": mp.SPT(budget=args.budget), "lora": mp.LoRA(rank=8), "partial": mp.Partial(strategy="attn")}
    models = {}
    for name, method in methods.items():
        model = method(copy.deepcopy(base), batches)
        models[name] = (model, torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-4))
    steps = interleaved({name: (lambda m=m, o=o: train_pass(m, o, batches, args.amp)) for name, (m, o) in models.items()}, reps, device)

    med = {k: statistics.median(v) for k, v in {**sel, **steps}.items()}
    print(f"== {model_name}, {device}, batch {bs} x {nb}, median of {reps}; SPT budget {args.budget:,}; amp {args.amp}")
    print(f"   GPS select {med['GPS select']:.3f} s, SPT select {med['SPT select']:.3f} s, ratio SPT / GPS {med['SPT select'] / med['GPS select']:.3f}")
    result = {"spt_select_over_gps_select": med["SPT select"] / med["GPS select"]}
    for name in methods:
        trainable = sum(p.numel() for p in mp.trainable_parameters(models[name][0]))
        ratio = med[name] / med["full"]
        result[f"{name}_step_over_full_step"] = ratio
        print(f"   train step {name:7s} {med[name] / nb:.3f} s/step, trainable {trainable:>12,}, / full {ratio:.3f}")
    return result


if __name__ == "__main__":
    main()
