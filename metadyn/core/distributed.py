"""Several processes training one model (``torchrun``): process group, ranks, the checkpoint protocol, and
gradients all-reduced in buckets.

The protocol every multi-process run in metadyn follows: every rank builds the same model and reads the same
checkpoint when resuming; rank 0 alone writes checkpoints and results, and every rank waits at a barrier after
a checkpoint is written, so no rank runs ahead of the file it would resume from. Outside an initialised process
group (or with one process) every function here is a no-op and rank 0 is the only rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from metadyn.errors import InputError

BUCKET_BYTES = 25 << 20  # DistributedDataParallel's default bucket size


def active() -> bool:
    """Whether an initialised process group has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes in the environment (NCCL for a CUDA ``device``, gloo for the
    CPU) and return this rank's device: ``cuda:LOCAL_RANK`` (made the current device, so NCCL and every
    ``cuda`` tensor of this process use it) when ``device`` is CUDA, else ``device``. A CUDA device with an index
    is refused: under torchrun each rank takes its own GPU."""
    if device.type == "cuda":
        if device.index is not None and launched():
            raise InputError(f"device {str(device)!r}: under torchrun every rank takes cuda:LOCAL_RANK; "
                             "pass device cuda or auto")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def all_reduce_coalesced(tensors: Sequence[Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum ``tensors`` over the ranks in place, a few buckets at a time (one all-reduce per bucket of at most
    ``bucket_bytes`` of one dtype and device, as DistributedDataParallel does) instead of one per tensor."""
    if not active():
        return
    groups: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for t in ts:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                _reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[Tensor]) -> None:
    if len(bucket) == 1:
        dist.all_reduce(bucket[0])
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_error(message: str | None) -> str | None:
    """Rank 0's ``message`` (an error, or None for success) on every rank: collective, so that the other ranks
    stop with rank 0 instead of waiting for it at the next barrier."""
    if not active():
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a decision all ranks must take alike, such as keeping the best epoch)."""
    if not active():
        return value
    t = torch.tensor([float(value) if is_rank0() else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def mean_over_ranks(t: Tensor) -> Tensor:
    """The mean of ``t`` over the ranks (a new tensor; ``t`` itself when not distributed). No host sync."""
    if not active():
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out / world_size()
