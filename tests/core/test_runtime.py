"""The CPU allocator setting that metadyn run / bench apply."""

import json
import sys

import pytest

from metadyn.core.runtime import reuse_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reuse_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    assert reuse_freed_memory() is True
    monkeypatch.setenv("METADYN_REUSE_MEMORY", "0")
    assert reuse_freed_memory() is False


def test_bench_json_records_the_setting(tmp_path, monkeypatch):
    from metadyn.cli import main

    monkeypatch.setenv("METADYN_REUSE_MEMORY", "0")
    out = tmp_path / "b.json"
    assert main(["bench", "inference", "--quick", "--set", "batch=16", "--set", "repeats=1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["reuse_freed_memory"] is False
