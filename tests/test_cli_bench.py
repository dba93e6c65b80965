"""``metadyn list`` and ``metadyn bench``: the benchmarks are a registry inside the package, the task files
are package data, and neither is looked up next to the checkout."""

import inspect
import json
import subprocess
import sys

import pytest

from metadyn.cli import main, summary_lines
from metadyn.config import task_names
from metadyn.registry import ALL, BENCHMARKS

OPTIONAL = ("learn2learn", "higher", "matplotlib", "torchvision")


def _listed(out: str) -> dict[str, list[str]]:
    lines = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in out.splitlines())
    return {title: [n for n in names.split(", ") if n] for title, names in lines.items()}


def test_list_names_every_registry_entry_and_shipped_task(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is looked up in the working directory
    assert main(["list"]) == 0
    listed = _listed(capsys.readouterr().out)
    for title, reg in ALL.items():
        assert listed[title] == reg.names(), title
    assert {"inference", "skipping", "maml", "impressions"} <= set(listed["benchmarks"])
    assert listed["tasks"] == task_names() and "digits_anytime" in listed["tasks"]
    assert list(listed) == [*ALL, "tasks"]


def test_every_benchmark_is_a_module_of_metadyn_bench_with_a_quick_flag():
    for name, run in BENCHMARKS.items():
        assert run.__module__ == f"metadyn.bench.{name}"
        params = inspect.signature(run).parameters
        assert "quick" in params and params["quick"].default is False


def test_benchmark_modules_import_no_optional_package():
    code = (
        "import json, sys\n"
        "from metadyn.registry import BENCHMARKS\n"
        "names = BENCHMARKS.names()\n"
        "mods = sorted(m for m in sys.modules if m.startswith('metadyn.bench.'))\n"
        f"bad = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(json.dumps([names, mods, bad]))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, mods, bad = json.loads(r.stdout)
    assert set(names) >= {"inference", "skipping", "maml", "impressions"}
    assert {f"metadyn.bench.{n}" for n in names} <= set(mods)
    assert bad == []


def test_unknown_benchmark_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "metadyn.cli", "bench", "nosuch"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("metadyn: error: unknown benchmark 'nosuch'") and r.stderr.count("\n") == 1
    assert "inference" in r.stderr  # the choices are named


def test_unknown_benchmark_option_exits_2_with_one_line(capsys):
    assert main(["bench", "inference", "--set", "batchsize=16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metadyn: error: benchmark 'inference' has no option 'batchsize'") and err.count("\n") == 1
    assert main(["bench", "maml", "--model", "resnet"]) == 2  # maml takes no model
    assert "has no option 'model'" in capsys.readouterr().err


KEYS = {
    "inference": {"benchmark", "model", "batch", "micro_batch", "flop_speedup", "realized_speedup",
                  "simulated_speedup", "ratio", "mismatches", "exit_mismatches", "plain_ratio", "exit_fractions",
                  "median_ms", "device", "threads", "torch"},
    "impressions": {"model", "batch", "steps_per_impression", "step_s", "fwd_bwd_s", "step_over_fwd_bwd",
                    "step_over_fwd_bwd_bn_prior", "impressions_per_s", "device"},
    "skipping": {"benchmark", "model", "batch", "micro_batch", "flop_speedup", "realized_speedup", "masked_speedup",
                 "ratio", "mismatches", "blocks_used", "distinct_policies", "gate_mflops", "dense_mflops",
                 "median_ms", "device", "threads", "torch"},
}
TINY = {
    "inference": ["--set", "batch=16", "--set", "repeats=1"],
    "impressions": ["--set", "batch=16", "--set", "repeats=1"],
    "skipping": ["--set", "batch=16", "--set", "repeats=1", "--set", "depth=8"],
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_benchmark_writes_its_json(name, tmp_path, capsys):
    out = tmp_path / "sub" / "b.json"
    assert main(["bench", name, "--quick", *TINY[name], "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert set(result) == KEYS[name] | {"reuse_freed_memory", "environment", "under_load", "threads"}
    assert result["batch"] == 16
    assert result["under_load"] == {"processes": 0}  # no --under-load: no competing process


def test_tiny_maml_benchmark(tmp_path):
    pytest.importorskip("learn2learn")
    pytest.importorskip("higher")
    out = tmp_path / "maml.json"
    opts = ["--set", "meta_batch=1", "--set", "width=4", "--set", "repeats=1"]
    assert main(["bench", "maml", "--quick", *opts, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    peers = {"metadyn", "learn2learn", "higher", "learn2learn_channels_last"}
    try:
        import torchopt  # noqa: F401
    except ImportError:  # not installed: not measured, and the JSON says so
        assert result["torchopt"] is None and result["speedup_vs_torchopt"] is None
    else:
        peers.add("torchopt")
        assert result["torchopt"]["version"] == "0.7.3" and isinstance(result["torchopt"]["cxx_ops"], bool)
    assert set(result["tasks_per_s"]) == peers
    assert max(result["max_rel_diff"].values()) < 1e-3


def test_run_summary_is_one_labeled_line_per_group():
    rows = [{"group": "ce", "exit": 1, "accuracy": 0.9861, "mflops": 1.789},
            {"group": "ce", "exit": 0, "accuracy": 0.975, "mflops": 0.609},
            {"group": "imta", "exit": 0, "accuracy": 0.98, "mflops": 0.609, "accuracy_std": 0.0041, "ece": 0.02},
            {"group": "imta", "exit": 1, "accuracy": 0.99, "mflops": 1.789, "accuracy_std": 0.005}]
    assert summary_lines({"rows": rows}) == [
        "  ce: exit 0 97.50% (0.61 MFLOPs) · exit 1 98.61% (1.79)",
        "  imta: exit 0 98.00±0.41% (0.61 MFLOPs) · exit 1 99.00±0.50% (1.79)",
    ]
    assert summary_lines({"rows": [{"group": "model", "exit": 0, "accuracy": 0.5, "mflops": 0.0123}]}) == [
        "  model: exit 0 50.00% (0.012 MFLOPs)"]
    assert summary_lines({"exits": []}) == []  # no rows: no summary, no error


def test_unknown_task_name_exits_2_naming_the_shipped_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "digits_anytme"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metadyn: error: ") and err.count("\n") == 1
    assert "'digits_anytime'" in err  # did you mean
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra", [["--set", "gate=blockdrop"], ["--set", "gate=blockdrop", "--set", "policies=3"],
                                   ["--set", "gate=rnn", "--set", "threads=0"]])
def test_tiny_skipping_benchmark_gates(extra, tmp_path):
    out = tmp_path / "s.json"
    assert main(["bench", "skipping", "--quick", *TINY["skipping"], *extra, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mismatches"] == 0 and 0 < result["blocks_used"] < 1
    if "policies=3" in extra:
        assert result["distinct_policies"] <= 3 and "3 policies" in result["model"]
    assert result["threads"] >= 1


def test_policies_needs_blockdrop(capsys):
    assert main(["bench", "skipping", "--set", "policies=3"]) == 2
    assert "pass gate=blockdrop" in capsys.readouterr().err
