import json
from pathlib import Path

import pytest
import torch

from metadyn.cli import main
from metadyn.core.flops import ExitCosts
from metadyn.runner.anytime import Evaluation
from metadyn.runner.compare import CompareConfig, compare_method

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "tasks" / "compare_digits.yaml"
# even smaller than --quick: one epoch of ResNet-8 (the scan entries share the trunk's options) and a tiny MSDNet
TINY = ["--no-progress", "--set", "train.epochs=1", "--set", "model.options.depth=8", "--set",
        "model.options.exits=[1, 2, 3]", "--set", "model.options.width=4", "--set",
        "methods.msdnet.model.options={blocks: 3, step: 1, base: 1, channels: 4, growth: 2, head_channels: 8}",
        "--set", "ga.population=8", "--set", "ga.generations=3", "--set", "ga.curve_points=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "compare"
    assert main(["run", str(TASK), "--quick", "--out", str(out), *TINY]) == 0
    return out


def test_compare_writes_one_side_by_side_report(run):
    m = json.loads((run / "metrics.json").read_text())
    names = ["ce", "imta", "byot", "scan", "msdnet"]
    assert m["kind"] == "compare" and list(m["extra"]["methods"]) == names
    assert {x["method"] for x in m["exits"]} == set(names) and len([x for x in m["exits"] if x["method"] == "ce"]) == 3
    assert {"geometric", "ga"} == {c["thresholds"] for c in m["curve"]}
    ref_full = m["extra"]["reference_full_mflops"]
    for name, r in m["extra"]["methods"].items():
        assert (run / name / "checkpoint.pt").exists()
        assert [b["budget_fraction"] for b in r["budgets"]] == [0.25, 0.5, 0.75]
        for b in r["budgets"]:
            assert b["budget_mflops"] == pytest.approx(b["budget_fraction"] * ref_full)
            for kind in ("geometric", "ga"):
                p = b[kind]
                if p is not None and p["accuracy"] is not None:  # thresholds never overspend on val
                    assert p["val_mflops"] <= b["budget_mflops"] * (1 + 1e-9)
    assert m["extra"]["methods"]["scan"]["params"] > m["extra"]["methods"]["byot"]["params"]  # attention modules
    report = (run / "report.md").read_text()
    for heading in ("Anytime prediction", "Budgeted batch classification", "Calibration", "Against the reference"):
        assert heading in report
    assert "| scan |" in report and (run / "accuracy_vs_mflops.png").stat().st_size > 0
    vs = m["extra"]["methods"]["imta"]["vs_reference"]["final exit"]
    assert vs["se"] >= 0 and "ce" not in m["extra"]["methods"]["ce"].get("vs_reference", {})


def test_rerun_resumes_every_method(run):
    before = {p: p.read_bytes() for p in run.glob("*/checkpoint.pt")}
    assert main(["run", str(TASK), "--quick", "--out", str(run), *TINY]) == 0
    assert {p: p.read_bytes() for p in run.glob("*/checkpoint.pt")} == before


@pytest.mark.parametrize("args, message", [
    (["--set", "methods.ce.method=cee"], "unknown method 'cee'"),
    (["--set", "methods.ce.methd=ce"], "unknown key 'methods.ce.methd'"),
    (["--set", "methods.byot.model.options.backbone=resnett"], "unknown backbone 'resnett'"),
    (["--set", "train.method=imta"], "set each entry's method in 'methods'"),
    (["--set", "methods={}"], "at least one method"),
    (["--set", "ga.population=2"], "population >= 4"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["run", str(TASK), "--quick", "--out", str(out), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_thresholds_never_see_the_test_split():
    g = torch.Generator().manual_seed(0)
    k, c = 3, 4
    val = [torch.randn(60, c, generator=g) * (i + 1) for i in range(k)]
    calib = [torch.randn(50, c, generator=g) for _ in range(k)]
    costs = ExitCosts(stem=0, stages=[100, 100, 100], heads=[10, 10, 10])

    class Split:
        def __init__(self, y):
            self.y = y

    data = type("D", (), {"val": Split(torch.randint(0, c, (60,), generator=g)),
                          "test": Split(torch.randint(0, c, (70,), generator=g))})
    cfg = CompareConfig()
    cfg.ga.generations, cfg.ga.curve_points = 5, 2
    budgets = [0.4 * costs.full, 0.7 * costs.full]

    def thresholds(test_logits):
        ev = Evaluation(val, calib, test_logits, [1.0] * k, costs, [])
        res = compare_method("x", ev, data, budgets, cfg)
        return [(b["geometric"]["thresholds"], b["ga"]["thresholds"]) for b in res["budgets"]]

    a = thresholds([torch.randn(70, c, generator=g) for _ in range(k)])
    b = thresholds([torch.randn(70, c, generator=g) * 5 for _ in range(k)])
    assert a == b


def test_paired_difference_by_hand():
    from metadyn.runner.compare import paired_difference

    ref = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    new = torch.tensor([1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)  # one lost, two gained
    r = paired_difference(ref, new)
    d = (2 - 1) / 8  # per-sample differences: 0, -1, +1, +1, 0, 0, 0, 0
    var = (3 / 8) - d * d
    assert r["difference"] == pytest.approx(d) and r["se"] == pytest.approx((var / 8) ** 0.5)
    assert (r["gained"], r["lost"]) == (2, 1)
    assert paired_difference(ref, ref)["se"] == 0.0
