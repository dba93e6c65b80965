"""``metadyn bench NAME --under-load``: a competing CPU-bound process for the duration of a benchmark.

Users run notebooks on busy laptops and shared servers, where another process holds a core. A dynamic
network is made of many small operations, each a fork/join of torch's intra-op threads: when one of those
threads is descheduled by the competing process, every operation waits for it, while a static network's
few large operations lose only their share of the core. :func:`competing_load` reproduces that on purpose:
a child Python process spinning on one core (pinned to the last CPU this process may run on, where the
platform allows), started before the benchmark and stopped after it, also when the benchmark raises or is
interrupted (Ctrl-C). The child also exits by itself within a fraction of a second when its parent is gone
(it polls its parent's process id), so a benchmark killed outright leaves nothing behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# the competing process: busy arithmetic in slices of ~20 ms, then a check that the parent is still there
_SPIN = (
    "import os, sys\n"
    "parent, core = int(sys.argv[1]), sys.argv[2]\n"
    "if core != 'none':\n"
    "    os.sched_setaffinity(0, {int(core)})\n"
    "try:\n"
    "    while os.getppid() == parent:\n"
    "        x = 0\n"
    "        for i in range(200_000):\n"
    "            x += i * i\n"
    "except KeyboardInterrupt:\n"
    "    pass\n"
)


def load_core() -> int | None:
    """The CPU the competing process is pinned to: the last one this process may run on (None where the
    platform has no CPU affinity)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return max(os.sched_getaffinity(0))


@contextmanager
def competing_load(enabled: bool = True) -> Iterator[dict]:
    """Run one CPU-bound process for the duration of the ``with`` block (nothing when not ``enabled``).

    Yields the load setting a benchmark's JSON records: ``{"processes": 1, "core": N, "pid": PID}`` under
    load, ``{"processes": 0}`` without. The process is terminated (then killed, if it lingers) on the way
    out of the block, whatever ends it.
    """
    if not enabled:
        yield {"processes": 0}
        return
    core = load_core()
    proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid()), "none" if core is None else str(core)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield {"processes": 1, "core": core, "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
