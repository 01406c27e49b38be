"""What selection-based tuning costs next to the plain network: measured side by side, as ratios.

Every figure is a ratio against what a user would run anyway, measured in one process (memory:
one fresh process per configuration) on the same model, the same batches and the same device, with
the configurations interleaved (the order rotates every repeat) so that clock or thermal drift hits
both sides equally. Each timing is the median of ``--repeats`` after one untimed warm-up. On CUDA
every timed region is bracketed by ``torch.cuda.synchronize``.

1. **FPS selection / plain forward** (target <= 1.15). FPS claims to need nothing but one forward
   pass: ``FPS(k).select(model, batches)`` (hooks keeping a running ``sum |x|`` per layer, scoring
   ``|W| * mean |x|`` and the top-K choice included) against ``model(x)`` over the same batches in
   eval mode under ``torch.no_grad``. The excess is the price of the hooks and the choice.
2. **GPS selection / plain forward + backward** (target <= 1.10). GPS's data work is one backward per
   batch: ``GPS(k, loss="ce").select(model, batches)`` against cross entropy + ``loss.backward()`` in
   train mode with every parameter requiring grad (gradients accumulate over the batches, no
   optimizer step), i.e. what any gradient-based score would cost at least.
3. **Training step time: sparse / full fine-tuning** (target <= 1.0). One AdamW step (forward, cross
   entropy, backward, ``step``, ``zero_grad``) per batch, on three copies of one base model:
   *sparse* = after ``FPS(k)(model, batches)``, optimizer over ``trainable_parameters(model)``;
   *full* = every parameter trainable; *frozen encoder* = plain ``requires_grad`` flags, only biases
   and the head (names containing ``bias`` or ``head``, not ``norm``): the same whole-tensor roles as
   sparse with every selected weight frozen, i.e. the cheapest training the sparse model could be.
   Reported per step (time of a pass over the batches / number of batches).
4. **Training memory: sparse / full and sparse / frozen encoder** (target: sparse <= 1.05 x frozen).
   Each configuration runs in its own fresh process (``--worker CONFIG``): build the model (and for
   sparse run the selection and attach), then record the baseline right before the first training
   step and the peak over ``max(2, batches)`` steps (the second step is the first to hold optimizer
   state and gradients together). Reported is the peak *over the baseline*: gradients, optimizer state,
   saved activations and the transient buffers of training; the weights themselves are in the
   baseline. CUDA: ``memory_allocated`` before, ``reset_peak_memory_stats`` and ``max_memory_allocated``.
   CPU: resident set size, ``VmRSS`` before (after ``gc`` and ``malloc_trim``, so freed selection
   buffers are not counted as baseline) and ``VmHWM`` after resetting the high-water mark through
   ``/proc/self/clear_refs``; where that reset is refused, ``ru_maxrss`` (a peak reached before the
   baseline may then hide the training peak; the report says so).
5. **Delta checkpoint / full checkpoint** (target <= 1/100). ``save_delta`` of the sparse model at K
   against ``safetensors.torch.save_file`` of a plain model's ``state_dict``, file sizes on disk. The
   delta holds the selected entries (values + indices) and the whole-tensor roles (biases, head), so
   the ratio depends on ``--num-classes``; the breakdown is printed.

Nothing here asserts: the targets are printed as PASS / MISS next to the measurement. Run::

    python benchmarks/selection_costs.py                       # auto device; CPU: vit_s, batch 4, 2 batches
    python benchmarks/selection_costs.py --device cuda --amp   # vit_b, batch 64, bf16 autocast
    python benchmarks/selection_costs.py --json costs.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import medseg_peft as mp

MODELS = {  # name: (embed_dim, depth, num_heads), patch 16 at 224 x 224
    "vit_b": (768, 12, 12),
    "vit_s": (384, 12, 6),
    "vit_tiny": (192, 12, 3),
}
CONFIGS = ("sparse", "full", "frozen")
DEFAULTS = {  # per device: model, batch size, batches, repeats
    "cpu": {"model": "vit_s", "batch_size": 4, "batches": 2, "repeats": 5},
    "cuda": {"model": "vit_b", "batch_size": 64, "batches": 4, "repeats": 10},
}
TARGETS = {  # metric: (bound, description); measured <= bound passes
    "fps_select_over_forward": (1.15, "FPS select / forward"),
    "gps_select_over_fwd_bwd": (1.10, "GPS select / fwd+bwd"),
    "sparse_step_over_full_step": (1.00, "train step: sparse / full"),
    "sparse_mem_over_frozen_mem": (1.05, "train memory: sparse / frozen"),
    "delta_ckpt_over_full_ckpt": (0.01, "checkpoint: delta / full"),
}
INFO = {  # ratios printed for context, no target
    "frozen_step_over_full_step": "train step: frozen / full",
    "sparse_step_over_frozen_step": "train step: sparse / frozen",
    "sparse_mem_over_full_mem": "train memory: sparse / full",
    "sparse_peak_over_frozen_peak_total": "total peak: sparse / frozen",
}


# ---- set-up --------------------------------------------------------------------------------------
def build_model(name: str, num_classes: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A timm ViT of the given size, random init (no download)."""
    from timm.models.vision_transformer import VisionTransformer

    embed_dim, depth, heads = MODELS[name]
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, num_classes=num_classes)
    return model.to(device)


def make_batches(n: int, batch_size: int, num_classes: int, device: torch.device, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of random images and labels, already on ``device`` (no copies inside timings)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 3, 224, 224, generator=g).to(device), torch.randint(0, num_classes, (batch_size,), generator=g).to(device))
        for _ in range(n)
    ]


def frozen_encoder_flags(model: nn.Module) -> nn.Module:
    """Only biases and the head train (no norm parameters): sparse's whole-tensor roles, no selected entries."""
    for name, p in model.named_parameters():
        p.requires_grad_(("bias" in name or "head" in name) and "norm" not in name)
    return model


def prepare(config: str, base: nn.Module, batches, k: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and AdamW optimizer of one training configuration (``base`` is used up for ``full``)."""
    if config == "full":
        model = base
    elif config == "sparse":
        model = mp.FPS(k=k)(base, batches)
    elif config == "frozen":
        model = frozen_encoder_flags(base)
    else:
        raise ValueError(f"unknown config {config!r}")
    return model, torch.optim.AdamW(mp.trainable_parameters(model), lr=1e-4)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def train_pass(model: nn.Module, opt: torch.optim.Optimizer, batches, amp: bool) -> None:
    """One optimizer step per batch: forward, cross entropy, backward, step, zero_grad."""
    device = batches[0][0].device
    model.train()
    for x, y in batches:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---- timing --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function: one untimed warm-up each, then ``repeats`` rounds, order rotating."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def time_selection(model: nn.Module, batches, args, device: torch.device) -> dict[str, list[float]]:
    """FPS select vs no_grad forward; GPS select vs forward + backward; on one plain model."""
    amp = args.amp

    def forward():
        model.eval()
        with torch.no_grad(), autocast(device, amp):
            for x, _ in batches:
                model(x)

    def fps():
        with autocast(device, amp):  # FPS has no amp switch of its own: same context as its baseline
            return mp.FPS(k=args.k).select(model, batches)

    def fwd_bwd():
        model.train()
        for x, y in batches:
            with autocast(device, amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        model.zero_grad(set_to_none=True)

    def gps():
        return mp.GPS(k=args.k, loss="ce", amp=amp).select(model, batches)

    for p in model.parameters():
        p.requires_grad_(True)
    return interleaved({"forward": forward, "fps_select": fps, "fwd_bwd": fwd_bwd, "gps_select": gps}, args.repeats, device)


def time_training(models: dict[str, tuple[nn.Module, torch.optim.Optimizer]], batches, args, device) -> dict[str, list[float]]:
    """Seconds per training step of each configuration (a pass over the batches / their number)."""
    fns = {name: (lambda m=m, o=o: train_pass(m, o, batches, args.amp)) for name, (m, o) in models.items()}
    return {n: [t / len(batches) for t in ts] for n, ts in interleaved(fns, args.repeats, device).items()}


# ---- memory (one fresh process per configuration) ------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def measure_memory(config: str, args, device: torch.device) -> dict:
    """Worker body: peak memory of training steps of ``config`` over the memory right before the first step."""
    base = build_model(args.model, args.num_classes, device)
    batches = make_batches(args.batches, args.batch_size, args.num_classes, device)
    model, opt = prepare(config, base, batches, args.k)
    steps = max(2, len(batches))
    plan = [batches[i % len(batches)] for i in range(steps)]
    result = {"config": config, "steps": steps, "trainable": sum(p.numel() for p in mp.trainable_parameters(model))}
    if device.type == "cuda":
        sync(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_pass(model, opt, plan, args.amp)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.update(method="cuda max_memory_allocated", peak_reset=True)
    else:
        _release_free_memory()
        baseline = (_proc_status_kib("VmRSS") or 0) * 1024
        reset = _reset_rss_peak()
        train_pass(model, opt, plan, args.amp)
        hwm = _proc_status_kib("VmHWM") if reset else None
        peak = hwm * 1024 if hwm is not None else _ru_maxrss_bytes()
        result.update(method="VmHWM after clear_refs" if hwm is not None else "ru_maxrss (peak not reset)", peak_reset=hwm is not None)
    result.update(baseline_bytes=baseline, peak_bytes=peak, delta_bytes=peak - baseline)
    return result


def run_memory_workers(args, device: torch.device) -> dict[str, dict]:
    out = {}
    for config in CONFIGS:
        cmd = [
            sys.executable, os.path.abspath(__file__), "--worker", config, "--device", device.type, "--model", args.model,
            "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--k", str(args.k),
            "--num-classes", str(args.num_classes), *(["--amp"] if args.amp else []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {config!r} failed (exit {proc.returncode}):\n{proc.stderr}")
        out[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---- checkpoint sizes ----------------------------------------------------------------------------
def checkpoint_sizes(sparse: nn.Module, plain: nn.Module) -> dict:
    """Bytes on disk: ``save_delta`` of the sparse model vs ``save_file`` of a plain ``state_dict``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        delta_path = mp.save_delta(sparse, Path(tmp) / "delta.safetensors")
        full_path = Path(tmp) / "full.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}, str(full_path))
        parts = {"selected_values": 0, "selected_index": 0, "whole_tensors": 0}
        with safe_open(str(delta_path), "pt") as f:
            layouts = {n: e["layout"] for n, e in json.loads(f.metadata()["medseg_peft"])["entries"].items()}
            for key in f.keys():
                t = f.get_tensor(key)
                name, _, kind = key.rpartition(".")
                part = "whole_tensors" if layouts[name] == "whole" else f"selected_{kind}"
                parts[part] += t.numel() * t.element_size()
        return {"delta_bytes": delta_path.stat().st_size, "full_bytes": full_path.stat().st_size, "delta_tensor_bytes": parts}


# ---- report --------------------------------------------------------------------------------------
def median(ts: list[float]) -> float:
    return statistics.median(ts)


def ratios(sel_t, train_t, mem, ckpt) -> dict[str, float]:
    m = {k: median(v) for k, v in {**sel_t, **train_t}.items()}
    return {
        "fps_select_over_forward": m["fps_select"] / m["forward"],
        "gps_select_over_fwd_bwd": m["gps_select"] / m["fwd_bwd"],
        "sparse_step_over_full_step": m["sparse"] / m["full"],
        "frozen_step_over_full_step": m["frozen"] / m["full"],
        "sparse_step_over_frozen_step": m["sparse"] / m["frozen"],
        "sparse_mem_over_full_mem": mem["sparse"]["delta_bytes"] / mem["full"]["delta_bytes"],
        "sparse_mem_over_frozen_mem": mem["sparse"]["delta_bytes"] / mem["frozen"]["delta_bytes"],
        "sparse_peak_over_frozen_peak_total": mem["sparse"]["peak_bytes"] / mem["frozen"]["peak_bytes"],
        "delta_ckpt_over_full_ckpt": ckpt["delta_bytes"] / ckpt["full_bytes"],
    }


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f} MiB"


def print_report(setup: dict, sel_t, train_t, mem, ckpt, r: dict) -> None:
    print(f"\n== setup: {setup['model']} ({setup['params'] / 1e6:.1f} M params, {setup['num_classes']} classes), "
          f"device {setup['device']}, batch {setup['batch_size']} x {setup['batches']} batches, k={setup['k']}, "
          f"{'bf16 autocast' if setup['amp'] else 'fp32'}, median of {setup['repeats']} repeats after 1 warm-up")
    print(f"   torch {setup['torch']}, timm {setup['timm']}, medseg_peft {setup['medseg_peft']}, threads {setup['threads']}, {setup['platform']}")
    print("\n== timings, seconds (median [min .. max])")
    rows = [("forward (no_grad, eval), whole pass", sel_t["forward"]), ("FPS select, whole pass", sel_t["fps_select"]),
            ("forward+backward (train, all grads), whole pass", sel_t["fwd_bwd"]), ("GPS select (ce), whole pass", sel_t["gps_select"]),
            ("train step: sparse (FPS k)", train_t["sparse"]), ("train step: full fine-tuning", train_t["full"]),
            ("train step: frozen encoder (biases + head)", train_t["frozen"])]
    for label, ts in rows:
        print(f"   {label:<50} {median(ts):8.4f}  [{min(ts):.4f} .. {max(ts):.4f}]")
    print(f"\n== training memory, one fresh process per config ({mem['full']['method']}; {mem['full']['steps']} steps)")
    print(f"   {'config':<8} {'trainable':>12} {'baseline':>13} {'peak':>13} {'peak - baseline':>16}")
    for c in CONFIGS:
        w = mem[c]
        print(f"   {c:<8} {w['trainable']:>12,} {mib(w['baseline_bytes'])} {mib(w['peak_bytes'])} {mib(w['delta_bytes']):>16}")
    if not all(mem[c]["peak_reset"] for c in CONFIGS):
        print("   note: the peak could not be reset before training; a peak reached while building may hide the training peak")
    parts = ckpt["delta_tensor_bytes"]
    print("\n== checkpoints, bytes on disk")
    print(f"   delta (save_delta, k={setup['k']}): {ckpt['delta_bytes']:,}  [tensors: selected values {parts['selected_values']:,}, "
          f"selected indices {parts['selected_index']:,}, whole tensors (biases, head) {parts['whole_tensors']:,}]")
    print(f"   full state_dict (save_file):   {ckpt['full_bytes']:,}")
    print(f"\n== summary ({setup['model']}, {setup['device']}, batch {setup['batch_size']} x {setup['batches']})")
    print(f"   {'metric':<32} {'measured':>9}  {'target':>8}  result")
    for key, (bound, label) in TARGETS.items():
        print(f"   {label:<32} {r[key]:>9.4f}  {f'<= {bound:.2f}':>8}  {'PASS' if r[key] <= bound else 'MISS'}")
    for key, label in INFO.items():
        print(f"   {label:<32} {r[key]:>9.4f}  {'-':>8}  info")


# ---- entry point ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument("--model", choices=sorted(MODELS), help="default: vit_s on CPU, vit_b on CUDA")
    p.add_argument("--batch-size", type=int, help="default: 4 on CPU, 64 on CUDA")
    p.add_argument("--batches", type=int, help="batches per pass (selection and training); default: 2 on CPU, 4 on CUDA")
    p.add_argument("--repeats", type=int, help="timed repeats, median reported; default: 5 on CPU, 10 on CUDA")
    p.add_argument("--k", type=int, default=1, help="entries per output row (default 1)")
    p.add_argument("--num-classes", type=int, default=100, help="classifier head size (default 100); the head is trained whole")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for forwards and training steps (CUDA only)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is available")
    if args.amp and args.device != "cuda":
        p.error("--amp is for CUDA (bf16 autocast on CPU would measure a different kernel path)")
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "batches", "repeats", "k", "num_classes"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.worker:
        print(json.dumps(measure_memory(args.worker, args, device)))
        return None

    import timm

    batches = make_batches(args.batches, args.batch_size, args.num_classes, device)
    base = build_model(args.model, args.num_classes, device)
    setup = {
        "model": args.model, "params": sum(p.numel() for p in base.parameters()), "num_classes": args.num_classes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "batch_size": args.batch_size,
        "batches": args.batches, "k": args.k, "amp": args.amp, "repeats": args.repeats, "torch": torch.__version__,
        "timm": timm.__version__, "medseg_peft": mp.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
    }
    print(f"selection costs: {args.model} on {setup['device']}, batch {args.batch_size} x {args.batches}, k={args.k}", flush=True)

    print("timing selection ...", flush=True)
    sel_t = time_selection(base, batches, args, device)

    print("timing training steps ...", flush=True)
    models = {c: prepare(c, copy.deepcopy(base) if c != "full" else base, batches, args.k) for c in ("sparse", "frozen", "full")}
    models = {c: models[c] for c in CONFIGS}
    train_t = time_training(models, batches, args, device)

    print("checkpoint sizes ...", flush=True)
    ckpt = checkpoint_sizes(models["sparse"][0], models["full"][0])
    del models, base
    _release_free_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    print("training memory (fresh process per config) ...", flush=True)
    mem = run_memory_workers(args, device)

    r = ratios(sel_t, train_t, mem, ckpt)
    print_report(setup, sel_t, train_t, mem, ckpt, r)
    results = {
        "setup": setup, "timings_s": {**sel_t, **{f"train_step_{k}": v for k, v in train_t.items()}}, "memory": mem,
        "checkpoint": ckpt, "ratios": r,
        "targets": {k: {"bound": b, "pass": r[k] <= b} for k, (b, _) in TARGETS.items()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
