"""What LiteMedSAM costs at 256 and 128 px: selection, training steps and saved activations per method.

    python benchmarks/lite_medsam_costs.py                                   # lite_medsam@256 and @128, CPU, box prompts
    python benchmarks/lite_medsam_costs.py --device cuda --repeats 10 --json costs.json
    python benchmarks/lite_medsam_costs.py --models tiny_lite@64 --repeats 1  # the tiny test model: a smoke run in seconds

``lite_medsam@N`` is LiteMedSAM (TinyViT image encoder) with its real weights (the named checkpoint
``lite_medsam``; ``--sam_checkpoint`` for another file) built for N px inputs; ``tiny_lite@N`` is the
test-size TinyViT-SAM with random weights. Images are synthetic polyp frames at the model's size
(``benchmarks/memory.py``'s ``batch``), ``--batch-size`` per batch. With ``--prompt box`` (the
default, LiteMedSAM's protocol) each image gets one box per object of its mask, as the polyp bundle's
``prompt: box`` does; ``--prompt none`` runs prompt-free. The loss is the polyp bundle's:
``DiceCELoss(sigmoid=True, squared_pred=<box prompts>)``.

Times (seconds, median of ``--repeats`` after one untimed warm-up; every configuration of every model
runs in one interleaved schedule whose order rotates each repeat, so drift hits all alike; CUDA
regions are bracketed by ``synchronize``):

- **forward**: the plain model in eval mode under ``no_grad`` over the ``--select-batches`` batches;
  **FPS select**: ``FPS(k=1).select`` over the same batches; ratio FPS select / forward.
- **fwd+bwd**: loss + ``backward`` over the same batches, train mode, every parameter requiring grad;
  **GPS select**: ``GPS(k=1, loss=<the loss>).select``; ratio GPS select / fwd+bwd.
- **training step** on one batch (forward, loss, backward, AdamW step, ``zero_grad``) of full
  fine-tuning, FPS k=1, LoRA r=4 (qkv) and the frozen-encoder decoder baseline (``Decoder``), the
  latter without and with ``SamSegmenter.cache_embeddings`` warm (the batch's embeddings cached by the
  warm-up); ratios against the full step.
- With more than one model, each time is also given as a ratio against the first model's.

Memory (bytes, exact and device-independent, counted as ``benchmarks/memory.py`` counts them, by its
``counted_step``): what autograd saves for backward in one forward + loss (parameters excluded; with
activation checkpointing the block inputs it keeps, with ``selective`` the matmul outputs it caches),
per method and ``--checkpointing`` mode; and 12 bytes per trainable scalar for gradient + AdamW state.

The report is a markdown table per model; ``--json PATH`` writes every raw number. Nothing asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

from memory import MIB, batch, build, counted_step  # noqa: E402
from selection_costs import interleaved  # noqa: E402

import medseg_peft as mp  # noqa: E402

VARIANTS = {"lite_medsam": "lite_medsam", "tiny_lite": None}  # variant -> default weights (a named checkpoint, or random)
CKPT = {"no": False, "yes": True, "selective": "selective"}
CKPT_NAME = {v: k for k, v in CKPT.items()}
STEPS = ("full", "fps k=1", "lora r=4", "decoder", "decoder, cache warm")
MEMORY_METHODS = ("full", "fps k=1", "lora r=4", "decoder")


def seg_loss(prompt: str):
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True, squared_pred=prompt == "box")


def mask_boxes(y: torch.Tensor) -> torch.Tensor:
    """``[B, N, 4]`` xyxy boxes, one per connected object of each mask ``[B, 1, H, W]``, rows of -1 as padding."""
    from medseg_peft.data.box_prompts import object_boxes

    per_image = [[b[:4] for b in object_boxes((m[0] > 0).cpu().numpy())] for m in y]
    n = max(1, max(len(b) for b in per_image))
    out = torch.full((len(per_image), n, 4), -1.0)
    for i, boxes in enumerate(per_image):
        if boxes:
            out[i, : len(boxes)] = torch.tensor(boxes, dtype=torch.float32)
    return out.to(y.device)


def make_batches(size: int, n: int, batch_size: int, device, prompt: str, first_seed: int) -> list[tuple]:
    """``(image, mask, model keywords)`` of ``n`` synthetic batches."""
    out = []
    for seed in range(first_seed, first_seed + n):
        x, y = batch(size, batch_size, device, seed)
        out.append((x, y, {"boxes": mask_boxes(y)} if prompt == "box" else {}))
    return out


def selector_batches(batches) -> list:
    """The same batches as selectors read them: dicts carrying the boxes, or ``(image, mask)`` pairs."""
    return [{"image": x, "label": y, "box": kw["boxes"]} if kw else (x, y) for x, y, kw in batches]


def parse_spec(spec: str) -> str:
    variant, _, size = spec.partition("@")
    if variant not in VARIANTS or not size.isdigit():
        raise SystemExit(f"--models: {spec!r} is not one of lite_medsam@<px>, tiny_lite@<px>")
    return variant


def configurations(spec: str, args, device, loss_fn) -> tuple[dict, dict, list[dict]]:
    """The timed functions of one model (name -> callable), its tuned models, and its memory rows."""
    variant = parse_spec(spec)
    weights = args.sam_checkpoint if args.sam_checkpoint and variant == "lite_medsam" else VARIANTS[variant]
    torch.manual_seed(0)
    base, size = build(spec, weights)
    base = base.to(device)
    select = make_batches(size, args.select_batches, args.batch_size, device, args.prompt, 0)
    sel = selector_batches(select)
    x, y, kw = make_batches(size, 1, args.batch_size, device, args.prompt, 100)[0]
    amp = args.amp and device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()

    tuned = {
        "full": mp.Full()(copy.deepcopy(base)),
        "fps k=1": mp.FPS(k=1)(copy.deepcopy(base), sel),
        "lora r=4": mp.LoRA(rank=4)(copy.deepcopy(base)),
        "decoder": mp.Decoder()(copy.deepcopy(base)),
        "decoder, cache warm": mp.Decoder()(copy.deepcopy(base)).cache_embeddings(),
    }

    rows = []
    for name in MEMORY_METHODS:
        model = tuned[name]
        trainable = sum(p.numel() for p in mp.trainable_parameters(model))
        for mode in args.checkpointing:
            mp.activation_checkpointing(model, mode)
            model.train()
            loss, saved = counted_step(model, x, y, loss_fn, **kw)
            del loss
            rows.append({"model": spec, "method": name, "checkpointing": mode, "trainable": trainable, "saved": saved, "grad_adamw": 12 * trainable})
            print(f"  {spec:16s} {name:9s} ckpt={mode!s:9s} saved {saved / MIB:9.2f} MiB", flush=True)
        mp.activation_checkpointing(model, False)

    plain = base
    for p in plain.parameters():
        p.requires_grad_(True)

    def forward():
        plain.eval()
        with torch.no_grad(), autocast():
            for bx, _, bkw in select:
                plain(bx, **bkw)

    def fps_select():
        with autocast():
            return mp.FPS(k=1).select(plain, sel)

    def fwd_bwd():
        plain.train()
        for bx, by, bkw in select:
            with autocast():
                loss = loss_fn(plain(bx, **bkw), by)
            loss.backward()
        plain.zero_grad(set_to_none=True)

    def gps_select():
        return mp.GPS(k=1, loss=loss_fn, amp=amp).select(plain, sel)

    def step(model, opt):
        def run():
            model.train()
            with autocast():
                loss = loss_fn(model(x, **kw), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    fns = {"forward": forward, "FPS select": fps_select, "fwd+bwd": fwd_bwd, "GPS select": gps_select}
    for name in STEPS:
        fns[f"step {name}"] = step(tuned[name], torch.optim.AdamW(mp.trainable_parameters(tuned[name]), lr=1e-5))
    return fns, tuned, rows


def ratios(med: dict[str, float]) -> dict[str, float]:
    out = {"FPS select / forward": med["FPS select"] / med["forward"], "GPS select / fwd+bwd": med["GPS select"] / med["fwd+bwd"]}
    for name in STEPS:
        out[f"step {name} / step full"] = med[f"step {name}"] / med["step full"]
    return out


def report(results: dict, args) -> str:
    specs = list(results)
    first = specs[0]
    lines = []
    for spec in specs:
        r = results[spec]
        med, ratio = r["median_s"], r["ratios"]
        against = {"FPS select": ("forward", "FPS select / forward"), "GPS select": ("fwd+bwd", "GPS select / fwd+bwd")}
        against.update({f"step {n}": ("step full", f"step {n} / step full") for n in STEPS})
        cross = len(specs) > 1
        lines += [f"\n### {spec}: times (median of {args.repeats}, {args.device}, batch {args.batch_size}, "
                  f"{args.select_batches} selection batches, prompt {args.prompt})", "",
                  "| what | median s | ratio | against |" + (f" / {first} |" if cross else ""),
                  "|---|---|---|---|" + ("---|" if cross else "")]
        for name, value in med.items():
            base, key = against.get(name, (None, None))
            line = f"| {name} | {value:.4f} | {ratio[key]:.3f} | {base} |" if key else f"| {name} | {value:.4f} | - | - |"
            if cross:
                line += f" {value / results[first]['median_s'][name]:.3f} |"
            lines.append(line)
        rows = r["memory"]
        by = {(m["method"], m["checkpointing"]): m for m in rows}
        modes = args.checkpointing
        lines += ["", f"### {spec}: saved activations of one step (MiB)", "",
                  "| method | trainable | grad+AdamW MiB | " + " | ".join(f"saved, ckpt {CKPT_NAME[m]}" for m in modes)
                  + " | " + " | ".join(f"/ full, ckpt {CKPT_NAME[m]}" for m in modes) + " |",
                  "|---|---|---|" + "---|" * (2 * len(modes))]
        for method in MEMORY_METHODS:
            cells = [f"{by[(method, m)]['saved'] / MIB:.2f}" for m in modes]
            rel = [f"{by[(method, m)]['saved'] / by[('full', False)]['saved']:.3f}" if ("full", False) in by else "-" for m in modes]
            t = by[(method, modes[0])]
            lines.append(f"| {method} | {t['trainable']:,} | {t['grad_adamw'] / MIB:.2f} | " + " | ".join(cells) + " | " + " | ".join(rel) + " |")
    return "\n".join(lines)



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lite_medsam@256,lite_medsam@128", help="comma-separated lite_medsam@<px>, tiny_lite@<px>")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--select-batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="box", choices=["box", "none"], help="box prompts from the masks (default) or prompt-free")
    ap.add_argument("--checkpointing", default="no,yes", help="memory rows: comma-separated subset of no, yes, selective")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for every timed pass (CUDA only)")
    ap.add_argument("--sam_checkpoint", default=None, help="weights for the lite_medsam models (default: the named checkpoint lite_medsam)")
    ap.add_argument("--json", default=None, help="write every raw number here")
    args = ap.parse_args(argv)
    args.checkpointing = [CKPT[c.strip()] for c in args.checkpointing.split(",")]
    if False not in args.checkpointing:
        args.checkpointing.insert(0, False)
    device = torch.device(args.device)
    loss_fn = seg_loss(args.prompt)
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    for spec in specs:
        parse_spec(spec)
    print(f"== {', '.join(specs)} on {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}", flush=True)

    fns, memory, alive = {}, {}, []
    for spec in specs:
        mine, tuned, rows = configurations(spec, args, device, loss_fn)
        fns.update({(spec, name): fn for name, fn in mine.items()})
        memory[spec] = rows
        alive.append(tuned)  # the tuned models stay referenced through the interleaved timing
    print(f"  timing {len(fns)} configurations, {args.repeats} interleaved repeats ...", flush=True)
    times = interleaved({f"{spec}|{name}": fn for (spec, name), fn in fns.items()}, args.repeats, device)

    results = {}
    for spec in specs:
        raw = {name.split("|", 1)[1]: t for name, t in times.items() if name.startswith(spec + "|")}
        med = {name: statistics.median(t) for name, t in raw.items()}
        results[spec] = {"times_s": raw, "median_s": med, "ratios": ratios(med), "memory": memory[spec]}
    print(report(results, args))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"settings": settings, "torch": torch.__version__, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
