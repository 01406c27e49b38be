"""What a run under ``torchrun`` needs from ``torch.distributed``, as no-ops in a single process.

Selection is where ranks must agree: every rank scores its own share of the selection batches, the
additive statistics (FPS's sums of ``|x|``, GPS's gradient sums, SPT's squared-gradient sums) are
summed over ranks before anything is chosen, so N ranks choose over N times the data and all of them
choose the same entries; :func:`check_same_on_every_rank` then proves it with a digest. Nothing here
imports MONAI, so the selection layer stays light.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that logs and writes files."""
    return rank() == 0


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor summed over all ranks (same keys and shapes on every rank), on its own device and dtype.

    Keys are reduced in sorted order, so ranks that built their dicts in different orders still pair
    the right tensors.
    """
    out = dict(tensors)
    if not is_distributed():
        return out
    device = _comm_device()
    for key in sorted(out):
        t = out[key]
        buf = t.detach().to(device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out[key] = buf.to(t.device)
    return out


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each ``.grad`` by its mean over ranks (a data-parallel step without DDP); missing grads count as zero."""
    if not is_distributed():
        return
    device, n = _comm_device(), world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buf = p.grad.detach().to(device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        p.grad.copy_(buf.to(p.grad.device) / n)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (pickled; for small objects and decisions)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same_on_every_rank(digest: str, what: str) -> None:
    """Raise on every rank if the ranks' ``digest`` strings differ, naming the ranks that disagree with rank 0."""
    digests = gather_objects(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(
            f"{what} differs across ranks: rank(s) {differ} disagree with rank 0 ({len(digests)} processes). "
            "Every rank must see the same model and settings; check that all ranks load the same checkpoint and config."
        )


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_process_first(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 first, then on the other ranks (e.g. building a cached data set
    once, which the others then find complete)."""
    if not is_main_process():
        barrier()
    try:
        return fn(*args, **kwargs)
    finally:
        if is_main_process():
            barrier()


__all__ = [
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "check_same_on_every_rank",
    "gather_objects",
    "is_distributed",
    "is_main_process",
    "main_process_first",
    "rank",
    "world_size",
]
