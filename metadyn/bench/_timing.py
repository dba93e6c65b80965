"""Shared timing helpers for ``metadyn bench``: interleaved repetitions, medians, device sync; and the
option types the benchmarks declare (``batch: Batch = 256``), checked by ``metadyn bench`` as a task file's
fields are (:func:`metadyn.config.check_options`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Annotated

import torch

from metadyn.config import Check
from metadyn.errors import InputError

Batch = Annotated[int, Check(ge=1, le=65_536)]
Repeats = Annotated[int | None, Check(ge=1, le=10_000)]  # None: the benchmark's default
Seed = Annotated[int, Check(ge=0, le=2**32 - 1)]
Threads = Annotated[int | None, Check(ge=0, le=1024)]  # None: torch's default; 0: one per idle core
MicroBatch = Annotated[int | None, Check(ge=-1)]  # -1: cache-sized slices on the CPU; None: the whole batch
Fraction = Annotated[float, Check(gt=0, le=1)]


def micro_batch_for(micro_batch: int | None, device: torch.device) -> int | None:
    """``-1`` (the default): slices of 64 samples on the CPU (they fit its cache), the whole batch on a GPU."""
    if micro_batch == -1:
        return 64 if device.type == "cpu" else None
    if micro_batch is not None and micro_batch < 1:
        raise InputError(f"micro_batch must be -1 (auto), null (whole batch) or at least 1, got {micro_batch}")
    return micro_batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 7,
                     warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, running them round-robin so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def environment(device: str | torch.device = "auto") -> dict:
    """What a benchmark's timings depend on besides the code, for its JSON: the device it ran on (``"auto"``
    resolved) and its name, torch, CUDA and cuDNN versions, threads, and the kernel switches
    (:func:`metadyn.core.device.environment`)."""
    from metadyn.core.device import environment as env
    from metadyn.core.train import pick_device

    return env(pick_device(device))
