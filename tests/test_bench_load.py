"""``metadyn bench --under-load``: the competing process runs for the duration of the benchmark only, and is
stopped when the benchmark fails, is interrupted, or its process dies."""

import json
import os
import subprocess
import sys
import time

import pytest

from metadyn.bench._load import competing_load
from metadyn.cli import main


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by someone else) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_load_runs_inside_the_block_only_and_spins():
    with competing_load() as load:
        pid = load["pid"]
        assert load["processes"] == 1 and _alive(pid)
        time.sleep(0.5)  # the child pins itself as it starts
        if load["core"] is not None:
            assert os.sched_getaffinity(pid) == {load["core"]}
        with open(f"/proc/{pid}/stat") as f:
            busy = sum(int(v) for v in f.read().split(")")[-1].split()[11:13])  # utime + stime, clock ticks
        assert busy > 0  # it computes, it does not sleep
    assert not _alive(pid)
    with competing_load(False) as load:
        assert load == {"processes": 0}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_load_is_stopped_when_the_benchmark_raises(error):
    with pytest.raises(error), competing_load() as load:
        pid = load["pid"]
        raise error()
    assert not _alive(pid)


def test_load_ends_by_itself_when_its_parent_is_killed():
    code = ("import time\nfrom metadyn.bench._load import competing_load\n"
            "with competing_load() as load:\n    print(load['pid'], flush=True)\n    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert _alive(pid)
    parent.kill()
    parent.wait()
    assert _gone_within(pid, 10)


def test_bench_under_load_records_the_setting(tmp_path, capsys):
    out = tmp_path / "b.json"
    opts = ["--set", "batch=16", "--set", "repeats=1", "--set", "depth=8", "--set", "threads=1"]
    assert main(["bench", "skipping", "--quick", "--under-load", *opts, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["under_load"]["processes"] == 1 and result["threads"] == 1
    assert not _alive(result["under_load"]["pid"])


def test_set_threads_none_keeps_a_number_sets_and_zero_counts_idle_cores():
    import torch

    from metadyn.core.runtime import idle_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(None) == before
        assert set_threads(1) == 1 == torch.get_num_threads()
        cpus = len(os.sched_getaffinity(0))
        assert 1 <= idle_cores(0.05) <= cpus
        assert 1 <= set_threads(0) <= cpus
    finally:
        torch.set_num_threads(before)
