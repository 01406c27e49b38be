"""What a run under ``torchrun`` needs: devices, the process group, and ``torch.distributed``'s collectives
as no-ops in a single process.

Selection is where ranks must agree: every rank scores its own share of the selection batches, the
additive statistics (FPS's sums of ``|x|``, GPS's gradient sums, SPT's squared-gradient sums) are
summed over ranks before anything is chosen, so N ranks choose over N times the data and all of them
choose the same entries; :func:`check_same_on_every_rank` then proves it with a digest. Nothing here
imports MONAI (ignite only when a process group is joined), so the selection layer stays light.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("medseg_peft")


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


# ---- devices and the process group ------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this process's GPU when there is one, else the CPU; ``"cuda"``: this process's GPU; ``"cpu"``
    and ``"cuda:N"`` as given. This process's GPU is ``cuda:LOCAL_RANK`` under torchrun, so the same ``--device``
    means the same thing with one process or many."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank())
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but this machine has no CUDA device; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and keep ranks > 0 quiet below WARNING."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("the multi-GPU layer runs under torchrun: torchrun --nproc_per_node=N -m monai.bundle run "
                           "--config_file \"['bundles/polyp_fps.json','bundles/multi_gpu.json']\"")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    import ignite.distributed as idist

    idist.get_rank()  # ignite's metrics and savers join the group lazily, with collectives: let every rank join now
    if dist.get_rank() > 0:
        for name in ("", "medseg_peft", "ignite", "monai"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log.info("process group: %d processes (%s), this is rank %d on %s",
             dist.get_world_size(), dist.get_backend(), dist.get_rank(), device)


def check_shardable(dataset, what: str) -> None:
    """Every rank needs at least one item of ``dataset`` (a validation set is split without padding)."""
    n, ranks = len(dataset), world_size()
    if n < ranks:
        raise ValueError(f"the {what} set has {n} item(s), fewer than the {ranks} processes that share it: "
                         f"raise val_fraction (or add data), or run with --nproc_per_node {max(n, 1)}")


def destroy_distributed() -> None:
    """The ``finalize`` entry: leave the process group together (a rank that tears down its gloo
    connections while another still writes its last files can abort that one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or the network itself)."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


__all__ = [
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "check_same_on_every_rank",
    "check_shardable",
    "destroy_distributed",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "main_process_first",
    "rank",
    "resolve_device",
    "unwrap",
    "world_size",
]
