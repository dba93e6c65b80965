"""Process-level settings for fast CPU work.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large block (above a threshold
that starts at 128 KB) with a fresh ``mmap`` and unmaps it on free, and it returns the free top of its
heap to the system beyond a trim threshold. A training step or an inference batch allocates the same
multi-megabyte activations again and again, so every call touches fresh pages: the kernel zero-fills
each 4 KB page on first touch, which FLOP counts never see. In a profile of a MAML meta-step, the
``fill_`` that zeroes one 7.5 MB max-pool gradient took 8 ms (about 1 GB/s), a tenth of the step.

:func:`reuse_freed_memory` raises both thresholds so freed blocks stay in the heap and are reused. It is
glibc's own form of the usual advice to run PyTorch on the CPU with jemalloc or tcmalloc. The price is
that the process's resident memory stays at its peak instead of shrinking after it. ``metadyn run`` and
``metadyn bench`` call it (``METADYN_REUSE_MEMORY=0`` turns it off). A benchmark times metadyn and its
alternative in the same process, so both run under the same setting.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3


def reuse_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Keep freed memory for reuse: glibc serves blocks below ``mmap_threshold`` bytes (32 MB, its
    maximum) from its heap and keeps up to ``trim_threshold`` bytes of free heap (1 GB).

    Returns:
        True when both settings were applied. False off Linux, with a C library that has no ``mallopt``
        (musl), or when the environment sets ``METADYN_REUSE_MEMORY=0``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("METADYN_REUSE_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1


def _cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` clock ticks of all CPUs since boot, from ``/proc/stat`` (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def idle_cores(interval: float = 0.25) -> int:
    """How many of this process's CPUs other processes leave idle, measured over ``interval`` seconds (at least 1).

    A parallel operation forks into torch's intra-op threads and joins them: when another process holds one of
    the cores, the thread placed there runs in time slices and every operation waits for it. A network of
    many small operations (early exits, skipped blocks) loses far more than a few large ones, so on a busy
    machine fewer threads than cores are faster. Off Linux it returns the number of CPUs.
    """
    import time

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    first = _cpu_times()
    if first is None:
        return cpus
    time.sleep(interval)
    second = _cpu_times()
    busy, total = second[0] - first[0], second[1] - first[1]
    machine = os.cpu_count() or cpus
    busy_cores = machine * busy / total if total > 0 else 0.0  # this process sleeps meanwhile: all of it is others'
    return max(1, min(cpus, round(machine - busy_cores)))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: ``None`` leaves torch's default, ``0`` takes one per idle core
    (:func:`idle_cores`), ``n`` takes ``n``. Returns the number in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(idle_cores() if threads == 0 else int(threads))
    return torch.get_num_threads()
