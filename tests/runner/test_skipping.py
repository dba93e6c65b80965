import hashlib
import json
from pathlib import Path

import pytest

from metadyn.cli import main
from metadyn.core.train import pick_device
from metadyn.runner.kinds.skipping import select_point

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.depth=8", "--set", "model.width=4", "--set", "pretrain.epochs=1", "--no-progress",
        "--set", "data.name=glyphs", "--set", "data.options={num_classes: 4, samples_per_class: 30, size: 8}"]
SKIPNET = [*TINY, "--set", "supervised.epochs=1", "--set", "hybrid.epochs=1", "--set", "alphas=[0.5, 2.0]"]
BLOCKDROP = [*TINY, "--set", "curriculum.epochs=2", "--set", "finetune.epochs=1", "--set", "gammas=[1.0]",
             "--set", "model.policy_width=4"]


def _snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def skipnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "skipnet"
    assert main(["run", str(ROOT / "tasks" / "skipnet_digits.yaml"), "--quick", "--out", str(out), *SKIPNET]) == 0
    return out


@pytest.fixture(scope="module")
def blockdrop_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "blockdrop"
    assert main(["run", str(ROOT / "tasks" / "blockdrop_digits.yaml"), "--quick", "--out", str(out), *BLOCKDROP]) == 0
    return out


def _check_metrics(folder: Path, kind: str, knob: str, values: list[float]) -> dict:
    names = {p.name for p in folder.iterdir()}
    assert {"metrics.json", "report.md", "config.yaml", "checkpoint.pt", "checkpoint_resnet.pt",
            "accuracy_vs_mflops.png", "block_usage.png"} <= names
    m = json.loads((folder / "metrics.json").read_text())
    assert m["kind"] == kind and m["dataset"] == "glyphs" and m["settings"]["device"] == str(pick_device("auto"))
    e = m["extra"]
    sweep = [r for r in m["rows"] if r["group"].startswith(f"{knob}=") and "curriculum" not in r["group"]]
    assert e["knob"] == knob and [p[knob] for p in sweep] == values
    assert [r["group"] for r in sweep] == [f"{knob}={v:g}" for v in values] and m["rows"][0]["group"] == "always-on"
    assert e["chosen"][knob] in values and e["chosen"]["accuracy"] in [p["accuracy"] for p in sweep]
    k = e["num_blocks"]
    for p in sweep:
        assert 0 <= p["blocks_used"] <= k and len(p["block_usage"]) == k
        assert 1 <= p["distinct_policies"] <= 2**k
        assert abs(sum(t["fraction"] for t in p["top_policies"]) - 1) < 1e-9 or len(p["top_policies"]) == 10
        # MFLOPs follow from the blocks run: fixed cost plus each block's cost times its usage
        expected = e["fixed_mflops"] + sum(u * b for u, b in zip(p["block_usage"], e["block_mflops"]))
        assert abs(p["mflops"] - expected) < 1e-9
    assert e["always_on"]["mflops"] == pytest.approx(e["fixed_mflops"] + sum(e["block_mflops"]), abs=0.2)
    (c,) = m["comparisons"]
    assert (c["group"], c["against"], c["n"]) == ("chosen", "always-on", m["extra"]["always_on"].get("n", c["n"]))
    assert c["difference"] == pytest.approx(e["chosen"]["accuracy"] - e["always_on"]["accuracy"])
    report = (folder / "report.md").read_text()
    assert "## Accuracy vs FLOPs over" in report and "policies" in report and "% of always-on" in report
    return m


def test_skipnet_run_writes_results(skipnet_run):
    m = _check_metrics(skipnet_run, "skipnet", "alpha", [0.5, 2.0])
    assert [r["group"] for r in m["rows"]][-1] == "after supervised pre-training"
    assert (skipnet_run / "checkpoint_alpha_0.5.pt").exists() and (skipnet_run / "checkpoint_supervised.pt").exists()


def test_blockdrop_run_writes_results(blockdrop_run):
    m = _check_metrics(blockdrop_run, "blockdrop", "gamma", [1.0])
    assert [r["group"] for r in m["rows"]][-1] == "gamma=1, curriculum only"
    assert (blockdrop_run / "checkpoint_gamma_1_curriculum.pt").exists()
    assert (blockdrop_run / "checkpoint_gamma_1_finetune.pt").exists()


def test_rerun_resumes_without_retraining(skipnet_run):
    before = _snapshot(skipnet_run)
    assert main(["run", str(ROOT / "tasks" / "skipnet_digits.yaml"), "--quick", "--out", str(skipnet_run),
                 *SKIPNET]) == 0
    after = _snapshot(skipnet_run)
    for name in ("checkpoint_resnet.pt", "checkpoint_supervised.pt", "checkpoint_alpha_0.5.pt", "metrics.json"):
        assert after[name] == before[name]


BAD = [
    ("skipnet_digits", ["--set", "model.gate=lstm"], "unknown model.gate 'lstm'"),
    ("skipnet_digits", ["--set", "alphas=[]"], "'alphas' must not be empty"),
    ("skipnet_digits", ["--set", "alphas=[0.1, -1]"], "'alphas[1]' must be >= 0"),
    ("skipnet_digits", ["--set", "hybrid.optimizer=rmsprop"], "unknown hybrid.optimizer 'rmsprop'"),
    ("skipnet_digits", ["--set", "supervised.epochs=-1"], "'supervised.epochs' must be >= 0"),
    ("skipnet_digits", ["--set", "model.depth=21"], "depth must be 6n+2"),
    ("skipnet_digits", ["--set", "hybrid.epoch=3"], "unknown key 'hybrid.epoch'"),
    ("blockdrop_digits", ["--set", "model.policy_downsample=16"], "policy downsample"),
    ("blockdrop_digits", ["--set", "model.alpha=0.3"], "alpha (probability bound)"),
    ("blockdrop_digits", ["--set", "gammas=[1.0, 1.0]"], "'gammas' has repeated values"),
    ("blockdrop_digits", ["--set", "finetune.epochs=-1"], "'finetune.epochs' must be >= 0"),
]


@pytest.mark.parametrize("task, args, message", BAD)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, task, args, message):
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "tasks" / f"{task}.yaml"), "--quick", "--out", str(out), *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.startswith("metadyn: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_select_point_uses_val_only():
    pts = [{"a": 1, "val_accuracy": 0.98, "val_mflops": 3.0, "accuracy": 0.5},
           {"a": 2, "val_accuracy": 0.975, "val_mflops": 2.0, "accuracy": 0.99},
           {"a": 3, "val_accuracy": 0.90, "val_mflops": 1.0, "accuracy": 1.0}]
    assert select_point(pts, 0.98, 0.01)["a"] == 2  # cheapest within 1 point on val, whatever test says
    assert select_point(pts, 0.98, 0.0)["a"] == 1
    assert select_point(pts, 0.995, 0.0)["a"] == 1  # none within the drop: the most accurate on val
