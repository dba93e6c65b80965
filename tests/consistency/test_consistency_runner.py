import json
from pathlib import Path

import torch

from metadyn.cli import main
from metadyn.data import keep_labels

TASK = Path(__file__).resolve().parents[2] / "tasks" / "labelscarce_digits.yaml"
TINY = ["--no-progress", "--set", "train.epochs=1", "--set", "model.options={depth: 8, exits: [1, 2, 3], width: 4}"]


def test_keep_labels_keeps_k_per_class():
    y = torch.arange(10).repeat(7)
    kept = keep_labels(y, 3, seed=1)
    assert torch.equal(torch.bincount(kept[kept >= 0], minlength=10), torch.full((10,), 3))
    assert torch.equal(kept[kept >= 0], y[kept >= 0])
    assert torch.equal(kept, keep_labels(y, 3, seed=1)) and not torch.equal(kept, keep_labels(y, 3, seed=2))


def test_labelscarce_quick_run(tmp_path):
    out = tmp_path / "ls"
    assert main(["run", str(TASK), "--quick", "--out", str(out), *TINY]) == 0
    m = json.loads((out / "metrics.json").read_text())
    methods = {r["method"] for r in m["rows"]}
    assert {"CE only", "self-distillation", "BYOL-style", "SimSiam-style", "two views without consistency",
            "feature L2"} == methods
    assert all(r["n"] == 1 and r["labels_per_class"] == 5 for r in m["rows"]) and len(m["rows"]) == 6 * 3
    assert {c["against"] for c in m["comparisons"]} == {"CE only, 5 labels"}
    assert all(c["verdict"] == "one unit: no test" for c in m["comparisons"])  # one seed
    assert "## 5 labels per class\n" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_labels.png").exists()


def test_simsiam_without_augmentation_is_refused(tmp_path, capsys):
    code = main(["run", str(TASK), "--quick", "--out", str(tmp_path / "x"), *TINY, "--set", "train.augment=none"])
    assert code == 2 and "simsiam" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_diverged_training_is_reported_not_fatal(tmp_path):
    out = tmp_path / "nan"
    code = main(["run", str(TASK), "--quick", "--out", str(out), *TINY, "--set", "train.lr=1e30",
                 "--set", "methods={CE: {method: ce}}", "--set", "labels_per_class=[1000]"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    # the only training diverged: it counts with what its network scores as it stands, and every row says so
    assert [r["exit"] for r in m["rows"]] == [0, 1, 2]
    for row in m["rows"]:
        assert (row["n"], row["diverged"], row["diverged_in_mean"]) == (0, 1, 1)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["accuracy_std"] == 0.0
    text = (out / "report.md").read_text()
    assert "diverged: 1 of 1" in text
    assert "## 1000 labels per class (all: the train split has " in text  # no class has 1000 samples
