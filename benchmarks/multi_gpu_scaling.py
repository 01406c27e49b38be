"""Multi-GPU scaling of a polyp training step: step time per GPU and images/s with N GPUs over images/s with 1.

    python benchmarks/multi_gpu_scaling.py --gpus 1,2,4 --variant vit_b --image-size 1024 --batch-size 2 --method fps --steps 20
    python benchmarks/multi_gpu_scaling.py --method fps,gps,lora,full            # every method, GPUs 1, 2, 4, ... up to all
    OMP_NUM_THREADS=1 python benchmarks/multi_gpu_scaling.py --device cpu --gpus 1,2 --variant tiny --image-size 64 \\
        --batch-size 2 --steps 3 --warmup 1                                      # CPU smoke test (gloo), no GPU needed

What is measured: **weak scaling**. Every GPU keeps the same batch (``--batch-size`` per GPU), so N
GPUs train on a global batch N times as large; ideal scaling is images/s growing N-fold with the step
time unchanged. (Strong scaling, a fixed global batch split over the GPUs, is not measured.)

The script is its own launcher. For each N in ``--gpus`` (1 is always added as the baseline; an N above
``torch.cuda.device_count()`` is skipped with a note) it starts
``python -m torch.distributed.run --standalone --nproc_per_node=N`` of itself in ``--worker`` mode, one
fresh process group per N and method. Each worker process (one rank per GPU, ``cuda:LOCAL_RANK``):

1. joins the process group as the ``multi_gpu.json`` bundle layer does (``workflows.init_distributed``:
   NCCL on GPUs, gloo with ``--device cpu``);
2. builds the polyp network, a prompt-free ``SamSegmenter`` of ``--variant`` at ``--image-size``
   (random init, the same seed on every rank: the cost does not depend on the weights);
3. selects with ``--method`` on ``--select-batches`` synthetic batches of its own (random RGB images
   0-255, random binary masks; FPS K / GPS K with the training loss / LoRA rank / SPT budget / partial
   "attn" / full, as the bundle layers under ``bundles/methods`` set them). The selection statistics are
   summed over ranks inside ``select`` and every rank checks that it chose the same entries;
4. wraps the network in ``DistributedDataParallel(device_ids=[device], find_unused_parameters=True)``
   (the ``multi_gpu.json`` settings), AdamW over ``medseg_peft.trainable_parameters``, loss
   ``monai.losses.DiceCELoss(sigmoid=True)``, forward and loss under bf16 autocast on CUDA (fp32 on CPU),
   as the polyp bundle's trainer runs them;
5. runs ``--warmup`` untimed steps, then ``--steps`` timed steps (forward, loss, backward with DDP's
   gradient all-reduce, ``step``, ``zero_grad``), each bracketed by ``torch.cuda.synchronize``. The
   training batches are made on the device beforehand, so no data loading or host-to-device copy is
   timed: this is the step the GPUs and the interconnect set, not the input pipeline.

Rank 0 gathers every rank's step times and writes them as JSON to a temporary file the parent reads.
A step's time is the slowest rank's time for it (the ranks wait for each other in the all-reduce); the
reported step time is the median of those over the timed steps, and each rank's own median is listed
too. images/s = global batch / median step time; scaling = images/s with N / images/s with 1 (same
method); efficiency = scaling / N (1.0 is perfect weak scaling). Peak memory per GPU is the maximum
over ranks of ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (stats reset after
the selection, so weights, gradients, optimizer state and activations count; the selection's own peak
does not). Nothing asserts; it is a report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

METHODS = ("fps", "gps", "lora", "full", "spt", "partial")
VARIANTS = ("vit_b", "vit_l", "vit_h", "demo", "tiny")


# ---- worker (one rank under torchrun) -------------------------------------------------------------
def synthetic_batches(n: int, batch_size: int, size: int, device: torch.device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` polyp-like batches on ``device``: RGB images 0-255 (float) and binary masks [B, 1, H, W]."""
    g = torch.Generator().manual_seed(seed)
    return [
        ((torch.rand(batch_size, 3, size, size, generator=g) * 255).to(device),
         (torch.rand(batch_size, 1, size, size, generator=g) > 0.5).float().to(device))
        for _ in range(n)
    ]


def make_selector(args, loss_fn, amp: bool):
    import medseg_peft as mp

    settings = {
        "fps": dict(k=args.k),
        "gps": dict(k=args.k, loss=loss_fn, amp=amp),
        "lora": dict(rank=args.rank),
        "full": {},
        "spt": dict(budget=args.budget, rank=args.rank, loss=loss_fn),
        "partial": dict(strategy="attn", loss=loss_fn),
    }[args.method]
    return mp.selector(args.method, **settings)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args) -> None:
    import monai
    import torch.distributed as dist

    import medseg_peft as mp
    from medseg_peft.distributed import (
        barrier,
        destroy_distributed,
        gather_objects,
        init_distributed,
        is_main_process,
        local_rank,
        rank,
        world_size,
    )
    from medseg_peft.models import sam_segmenter

    device = torch.device(f"cuda:{local_rank()}") if args.device == "cuda" else torch.device("cpu")
    init_distributed(device)
    try:
        amp = device.type == "cuda"
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
        loss_fn = monai.losses.DiceCELoss(sigmoid=True)

        torch.manual_seed(args.seed)  # the same base weights on every rank (the selection checks that they agree)
        model = sam_segmenter(args.variant, None, args.image_size).to(device)
        base_params = sum(p.numel() for p in model.parameters())
        select_batches = synthetic_batches(args.select_batches, args.batch_size, args.image_size, device, seed=args.seed + 1 + 1000 * rank())
        sync(device)
        start = time.perf_counter()
        model = make_selector(args, loss_fn, amp)(model, select_batches)
        sync(device)
        select_s = time.perf_counter() - start
        del select_batches

        params = mp.trainable_parameters(model)
        trainable = sum(p.numel() for p in params)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        train_batches = synthetic_batches(2, args.batch_size, args.image_size, device, seed=args.seed + 2 + 1000 * rank())

        def step(x, y) -> None:
            with autocast():
                loss = loss_fn(ddp(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ddp.train()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.warmup):
            step(*train_batches[i % len(train_batches)])
        sync(device)
        barrier()
        times = []
        for i in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            step(*train_batches[i % len(train_batches)])
            sync(device)
            times.append(time.perf_counter() - t0)
        mine = {
            "rank": rank(), "step_s": times, "select_s": select_s,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU",
        }
        ranks = gather_objects(mine)
        if is_main_process():
            per_step = [max(r["step_s"][i] for r in ranks) for i in range(args.steps)]
            peaks = [r["peak_bytes"] for r in ranks if r["peak_bytes"] is not None]
            result = {
                "gpus": world_size(), "method": args.method, "device": device.type, "backend": dist.get_backend(),
                "device_names": sorted({r["device_name"] for r in ranks}), "variant": args.variant, "image_size": args.image_size,
                "batch_per_gpu": args.batch_size, "global_batch": args.batch_size * world_size(), "amp": "bf16" if amp else "fp32",
                "base_params": base_params, "trainable": trainable, "warmup": args.warmup, "steps": args.steps,
                "step_s_slowest_rank": per_step, "step_s_median": statistics.median(per_step),
                "rank_step_s_median": [statistics.median(r["step_s"]) for r in ranks],
                "rank_step_s": [r["step_s"] for r in ranks],
                "select_s_max": max(r["select_s"] for r in ranks),
                "peak_bytes_max": max(peaks) if peaks else None, "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
                "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if amp else None,
            }
            result["images_per_s"] = result["global_batch"] / result["step_s_median"]
            Path(args.out).write_text(json.dumps(result, indent=2))
        barrier()
    finally:
        destroy_distributed()


# ---- launcher ------------------------------------------------------------------------------------
def launch(args, method: str, n: int, out: Path) -> tuple[dict | None, str]:
    """One ``torchrun`` of this script with ``n`` processes; its rank 0's JSON, or ``None`` and the output tail."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", os.path.abspath(__file__),
        "--worker", "--out", str(out), "--device", args.device, "--method", method, "--variant", args.variant,
        "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--select-batches", str(args.select_batches), "--k", str(args.k),
        "--rank", str(args.rank), "--budget", str(args.budget), "--seed", str(args.seed),
    ]
    # a session of its own, so that a timeout ends torchrun and its worker processes together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, f"timed out after {args.timeout:g} s\n{(output or '')[-3000:]}"
    if proc.returncode != 0 or not out.is_file():
        return None, f"exit {proc.returncode}\n{(output or '')[-3000:]}"
    return json.loads(out.read_text()), ""


def mib(b) -> str:
    return f"{b / 2**20:,.0f}" if b is not None else "-"


def print_report(results: dict[str, list[dict]], failed: list[str], skipped: list[str]) -> None:
    any_row = next((r for rows in results.values() for r in rows), None)
    if any_row is None:
        print("\nno configuration ran; nothing to report")
        return
    r0 = any_row
    print(f"\n== weak scaling: SAM {r0['variant']} at {r0['image_size']} px, batch {r0['batch_per_gpu']} per GPU, "
          f"{r0['amp']}, {r0['device']} ({', '.join(r0['device_names'])}), backend {r0['backend']}")
    print(f"   torch {r0['torch']}{', NCCL ' + r0['nccl'] if r0['nccl'] else ''}; median over {r0['steps']} timed steps "
          f"after {r0['warmup']} warm-up; a step's time is its slowest rank's")
    header = (f"   {'method':<8} {'N':>2} {'per-GPU batch':>13} {'global batch':>12} {'step s (median)':>15} {'images/s':>9} "
              f"{'scaling vs N=1':>14} {'efficiency':>10} {'peak MiB/GPU':>12} {'select s':>8}")
    print(header)
    for method, rows in results.items():
        base = next((r for r in rows if r["gpus"] == 1), None)
        for r in rows:
            scaling = r["images_per_s"] / base["images_per_s"] if base else float("nan")
            print(f"   {method:<8} {r['gpus']:>2} {r['batch_per_gpu']:>13} {r['global_batch']:>12} {r['step_s_median']:>15.4f} "
                  f"{r['images_per_s']:>9.2f} {scaling:>14.3f} {scaling / r['gpus']:>10.3f} {mib(r['peak_bytes_max']):>12} "
                  f"{r['select_s_max']:>8.2f}")
    print("\n== step time per GPU, seconds (each rank's own median)")
    for method, rows in results.items():
        for r in rows:
            per_rank = "  ".join(f"rank {i}: {t:.4f}" for i, t in enumerate(r["rank_step_s_median"]))
            print(f"   {method:<8} N={r['gpus']:<2} trainable {r['trainable']:,} of {r['base_params']:,}   {per_rank}")
    for note in skipped + failed:
        print(f"   note: {note}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda; cpu: a gloo smoke test")
    p.add_argument("--gpus", default=None, help="comma-separated process counts (default: 1, 2, 4, ... and all GPUs; CPU: 1,2)")
    p.add_argument("--method", default="fps", help=f"one or more of {','.join(METHODS)}, comma-separated (default fps)")
    p.add_argument("--variant", choices=VARIANTS, default=None, help="SAM variant, random init (default vit_b; CPU: tiny)")
    p.add_argument("--image-size", type=int, default=None, help="SAM input size (default 1024; CPU: 64)")
    p.add_argument("--batch-size", type=int, default=2, help="images per GPU per step (weak scaling; default 2)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--select-batches", type=int, default=2, help="selection batches per rank (default 2)")
    p.add_argument("--k", type=int, default=4, help="FPS / GPS entries per row (default 4, the polyp bundle's)")
    p.add_argument("--rank", type=int, default=4, help="LoRA / SPT rank (default 4, the polyp bundle's)")
    p.add_argument("--budget", type=int, default=50_000, help="SPT budget (default 50000, the polyp bundle's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=0, help="seconds per torchrun before it is abandoned (default: none)")
    p.add_argument("--json", type=Path, help="also write every raw number here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.variant = args.variant or ("tiny" if cpu else "vit_b")
    args.image_size = args.image_size or (64 if cpu else 1024)
    for key in ("image_size", "batch_size", "steps", "select_batches", "k", "rank", "budget"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (DDP builds its buckets in the first step)")
    methods = [m.strip().lower() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--method: unknown {unknown}; known: {','.join(METHODS)}")
    args.methods = methods
    if args.worker:
        args.method = methods[0]
    return args


def gpu_counts(spec: str | None, available: int, cpu: bool) -> list[int]:
    if spec:
        try:
            counts = sorted({int(s) for s in spec.split(",") if s.strip()})
        except ValueError:
            raise SystemExit(f"--gpus takes comma-separated integers, got {spec!r}")
        if not counts or min(counts) < 1:
            raise SystemExit(f"--gpus takes positive integers, got {spec!r}")
        return sorted({1, *counts})
    if cpu:
        return [1, 2]
    counts, n = [], 1
    while n < available:
        counts.append(n)
        n *= 2
    return sorted({*counts, max(1, available)})


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "none"
    if args.device != "cpu" and not torch.cuda.is_available():
        print("multi_gpu_scaling: this benchmark needs CUDA GPUs (2 or more to measure scaling), and this machine has none.\n"
              "To smoke-test the same code path on the CPU (gloo, one process per 'GPU'):\n"
              "    OMP_NUM_THREADS=1 python benchmarks/multi_gpu_scaling.py --device cpu --gpus 1,2 --variant tiny "
              "--image-size 64 --batch-size 2 --steps 3 --warmup 1")
        return None

    cpu = args.device == "cpu"
    available = (os.cpu_count() or 1) if cpu else torch.cuda.device_count()
    counts = gpu_counts(args.gpus, available, cpu)
    skipped = []
    if not cpu:
        skipped = [f"N={n} skipped: this machine has {available} CUDA device(s)" for n in counts if n > available]
        counts = [n for n in counts if n <= available]
        if available < 2:
            skipped.append(f"only {available} CUDA device here: N=1 runs, scaling needs 2 or more")
    for note in skipped:
        print(f"note: {note}", flush=True)

    results: dict[str, list[dict]] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="multi_gpu_scaling_") as tmp:
        for method in args.methods:
            results[method] = []
            for n in counts:
                print(f"running {method} with N={n} {'process(es) on the CPU' if cpu else 'GPU(s)'} ...", flush=True)
                row, tail = launch(args, method, n, Path(tmp) / f"{method}_{n}.json")
                if row is None:
                    failed.append(f"{method} N={n} failed: {tail.strip().splitlines()[-1] if tail.strip() else 'no output'}")
                    print(f"   failed ({method}, N={n}):\n{tail}", flush=True)
                    continue
                results[method].append(row)

    print_report(results, failed, skipped)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "failed": failed, "skipped": skipped}, indent=2))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
