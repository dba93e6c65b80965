import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metadyn.cli import main
from metadyn.core.train import pick_device

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "tasks" / "digits_anytime.yaml"
FAST = ["--set", "train.epochs=1", "--set", "model.options={depth: 8, exits: [1, 2, 3], width: 4}", "--no-progress"]


def _snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["run", str(TASK), "--quick", "--out", str(out), *FAST]) == 0
    return out


def test_run_writes_results_folder(quick_run):
    names = {p.name for p in quick_run.iterdir()}
    assert {"metrics.json", "report.md", "config.yaml", "checkpoint.pt", "accuracy_vs_mflops.png",
            "exit_histogram.png", "reliability.png"} <= names
    m = json.loads((quick_run / "metrics.json").read_text())
    assert m["task"] == "digits_anytime" and m["kind"] == "anytime" and m["dataset"] == "digits"
    device = pick_device("auto")  # the task says auto: a GPU where there is one
    assert m["seed"] == 0 and m["settings"]["device"] == str(device) and m["settings"]["threads"] >= 1
    rows = m["rows"]
    assert [r["exit"] for r in rows] == [0, 1, 2] and {r["group"] for r in rows} == {"model"}
    assert {"accuracy", "mflops", "ece", "ece_calibrated", "temperature"} <= set(rows[0])
    assert [r["mflops"] for r in rows] == sorted(r["mflops"] for r in rows)
    assert m["curves"] and {"group", "mflops", "accuracy"} <= set(m["curves"][0])
    assert [b["budget_fraction"] for b in m["budgets"]] == [0.25, 0.5, 0.75]
    assert m["extra"]["operating_point"]["mismatches"] <= (0 if device.type == "cpu" else 3)  # TF32 near a threshold
    report = (quick_run / "report.md").read_text()
    assert "| `model` |" in report and "Budgeted batch classification" in report


def test_run_by_shipped_name_equals_run_by_path(quick_run, tmp_path, capsys):
    out = tmp_path / "by_name"
    assert main(["run", "digits_anytime", "--quick", "--out", str(out), *FAST]) == 0
    summary = capsys.readouterr().out
    assert "model: exit 0" in summary and "exit 2" in summary  # the labeled closing summary
    same = ("rows", "budgets", "curves")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (quick_run, out))
    assert {k: a[k] for k in same} == {k: b[k] for k in same}


def test_rerun_same_config_resumes_without_retraining(quick_run, capsys):
    before = (quick_run / "checkpoint.pt").read_bytes()
    assert main(["run", str(TASK), "--quick", "--out", str(quick_run), *FAST]) == 0
    assert (quick_run / "checkpoint.pt").read_bytes() == before  # training was already complete


BAD = [
    (["--set", "train.epoch=3"], "unknown key 'train.epoch'"),
    (["--set", "train.epochs=abc"], "'train.epochs' must be an integer"),
    (["--set", "model.backbone=resnett"], "unknown backbone 'resnett' (did you mean 'resnet'?)"),
    (["--set", "model.options.depth=21"], "depth must be 6n+2"),
    (["--set", "model.options.dept=20"], "model.options"),
    (["--set", "data.name=folder", "--set", "data.root=/nonexistent/omniglot"], "/nonexistent/omniglot"),
    (["--set", "data.name=cifar10"], "root"),
    (["--set", "train.epochs=5"], "holds a run with a different config (train.epochs: 1 -> 5)"),
    (["--set", "train.lr=-0.1"], "'train.lr' must be > 0, got -0.1"),
    (["--set", "train.optimizer=lbfgs"], "unknown train.optimizer 'lbfgs'"),
    (["--set", "eval.ece_bins=0"], "'eval.ece_bins' must be >= 1"),
    (["--set", "data.test_fraction=1.5"], "'data.test_fraction' must be < 1"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_exits_2_with_one_line_and_keeps_the_run(quick_run, capsys, args, message):
    before = _snapshot(quick_run)
    code = main(["run", str(TASK), "--quick", "--out", str(quick_run), *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.startswith("metadyn: error: ") and err.count("\n") == 1
    assert _snapshot(quick_run) == before  # nothing in the existing run folder changed


def test_nan_loss_exits_2_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["run", str(TASK), "--quick", "--out", str(out), *FAST, "--set", "train.lr=1e30",
                 "--set", "train.epochs=2"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or infinite" in err and err.count("\n") == 1
    assert (out / "config.yaml").exists() and not (out / "metrics.json").exists()


def test_not_a_run_folder_is_left_alone(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["run", str(TASK), "--quick", "--out", str(tmp_path), *FAST]) == 2
    assert "not a metadyn run folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_list_and_unknown_benchmark(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    backbones = next(line for line in out.splitlines() if line.startswith("backbones:"))
    assert {"conv4", "mlp", "resnet"} <= set(backbones.split(": ")[1].split(", "))
    assert "anytime" in out and "inference" in out
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_console_script_gives_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [}\n")
    r = subprocess.run([sys.executable, "-m", "metadyn.cli", "run", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("metadyn: error:") and "not valid YAML" in r.stderr


def test_a_closed_pipe_stops_the_cli_quietly():
    """`metadyn list | head -1`: the reader leaves before metadyn writes; no traceback, no error line."""
    proc = subprocess.Popen([sys.executable, "-m", "metadyn.cli", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has imported anything, so its first write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
