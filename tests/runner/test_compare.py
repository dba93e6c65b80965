import json
import statistics
from pathlib import Path

import pytest
import torch

from metadyn.cli import main
from metadyn.core.evaluation import ExitEval, budget_sweep
from metadyn.core.flops import ExitCosts
from metadyn.core.stats import compare, holm, paired
from metadyn.runner.kinds.compare import GASpec, _ga_point

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
    assert list(dict.fromkeys(r["group"] for r in m["rows"])) == names
    assert len([r for r in m["rows"] if r["group"] == "ce"]) == 3
    assert {c["group"] for c in m["curves"]} == set(names) | {f"{n} (GA)" for n in names}
    ref_full = m["extra"]["reference_full_mflops"]
    for name in names:
        assert (run / name / "checkpoint.pt").exists()
        geo = [b for b in m["budgets"] if b["group"] == name]
        assert [b["budget_fraction"] for b in geo] == [0.25, 0.5, 0.75]
        for b in geo:
            assert b["budget_mflops"] == pytest.approx(b["budget_fraction"] * ref_full)
        for b in m["budgets"]:
            if b["group"] == f"{name} (GA)":  # GA thresholds never overspend on val
                assert b["val_mflops"] <= b["budget_fraction"] * ref_full * (1 + 1e-9)
    assert m["extra"]["methods"]["scan"]["params"] > m["extra"]["methods"]["byot"]["params"]  # attention modules
    report = (run / "report.md").read_text()
    for heading in ("Anytime prediction", "Budgeted batch classification", "Calibration", "Against the reference"):
        assert heading in report
    assert "| `scan` |" in report and (run / "accuracy_vs_mflops.png").stat().st_size > 0
    comps = m["comparisons"]
    assert {c["group"] for c in comps} == set(names) - {"ce"} and {c["against"] for c in comps} == {"ce"}
    assert all(c["n"] == m["extra"]["splits"]["test"] and 0 <= c["p"] <= c["p_holm"] <= 1 for c in comps)


def test_rerun_resumes_every_method(run):
    before = {p: p.read_bytes() for p in run.glob("*/checkpoint.pt")}
    assert main(["run", str(TASK), "--quick", "--out", str(run), *TINY]) == 0
    assert {p: p.read_bytes() for p in run.glob("*/checkpoint.pt")} == before


@pytest.mark.parametrize("args, message", [
    (["--set", "methods.ce.method=cee"], "unknown method 'cee'"),
    (["--set", "methods.ce.methd=ce"], "unknown key 'methods.ce.methd'"),
    (["--set", "methods.byot.model.options.backbone=resnett"], "unknown backbone 'resnett'"),
    (["--set", "train.method=imta"], "unknown key 'train.method'"),
    (["--set", "methods={}"], "'methods' must not be empty"),
    (["--set", "ga.population=2"], "'ga.population' must be >= 4"),
    (["--set", "methods={a/b: {method: ce}}"], "folder-safe"),
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
    costs = ExitCosts(stem=0, stages=[100, 100, 100], heads=[10, 10, 10])

    class Split:
        def __init__(self, y):
            self.y = y

    data = type("D", (), {"val": Split(torch.randint(0, c, (60,), generator=g)),
                          "test": Split(torch.randint(0, c, (70,), generator=g))})

    def thresholds(test_logits):
        e = ExitEval(val, None, test_logits, [1.0] * k, costs, [])
        curve, budgets = budget_sweep(e, data.test.y, "confidence", "x", fractions=(0.4, 0.7))
        ga = [_ga_point(e, data, b["budget_mflops"] * 1e6, "confidence", GASpec(generations=5), 0)["thresholds"]
              for b in budgets]
        return [c["thresholds"] for c in curve], [b["thresholds"] for b in budgets], ga

    a = thresholds([torch.randn(70, c, generator=g) for _ in range(k)])
    b = thresholds([torch.randn(70, c, generator=g) * 5 for _ in range(k)])
    assert a == b


def test_identical_paired_differences_get_the_exact_sign_flip_p_not_zero():
    """Every unit the same non-zero difference (no spread): the t statistic is undefined and p was 0, so one
    test image worse on each of 3 seeds was "worse" after Holm. Now the exact sign-flip p, checked by brute force."""
    import itertools

    for n in (2, 3, 6, 10):
        d = [-0.01] * n
        flips = [sum(s * x for s, x in zip(signs, d)) / n for signs in itertools.product((1, -1), repeat=n)]
        brute = sum(abs(f) >= abs(-0.01) - 1e-15 for f in flips) / len(flips)
        assert paired(d)["p"] == pytest.approx(brute) and paired(d)["se"] == 0.0
    assert paired([-0.01] * 3)["p"] == 0.25
    rounded = [0.1 - 0.2, 0.4 - 0.5, 0.7 - 0.8]  # the same difference, unequal in the last bits
    assert 0 < statistics.stdev(rounded) < 1e-15 and paired(rounded)["p"] == 0.25  # the t-test said p ~ 1e-16
    assert holm([compare("feature L2", "ce", "exit 1", [0.7701, 0.7654, 0.7002], [0.7702, 0.7655, 0.7003])
                 ])[0]["verdict"] == "no significant difference"
    assert paired([0.0, 0.0, 0.0])["p"] == 1.0


def test_paired_test_and_holm_by_hand():
    d = [0, -1, 1, 1, 0, 0, 0, 0]  # per-sample differences: one lost, two gained
    r = paired(d)
    mean = 1 / 8
    sd = (sum((x - mean) ** 2 for x in d) / 7) ** 0.5
    assert r["difference"] == pytest.approx(mean) and r["se"] == pytest.approx(sd / 8 ** 0.5) and r["n"] == 8
    from scipy.stats import ttest_1samp

    assert r["p"] == pytest.approx(ttest_1samp(d, 0).pvalue)
    assert paired([0.0, 0.0])["p"] == 1.0 and paired([0.3])["p"] is None
    # Holm: p sorted 0.01 < 0.02 < 0.04 with m = 3 -> 0.03, 0.04, 0.04 (monotone)
    comps = holm([{"difference": x, "p": p} for x, p in ((1, 0.04), (-1, 0.01), (1, 0.02))])
    assert [c["p_holm"] for c in comps] == pytest.approx([0.04, 0.03, 0.04])
    assert [c["verdict"] for c in comps] == ["better", "worse", "better"]
    assert holm([{"difference": 1, "p": 0.03}, {"difference": 1, "p": 0.5}])[0]["verdict"] == \
        "no significant difference"  # 2 x 0.03 > 0.05


def test_report_does_not_claim_a_holm_adjustment_when_no_comparison_could_be_tested():
    """With one unit per group every comparison is "one unit: no test", yet the report said the p-values were
    adjusted together by Holm over them."""
    from metadyn.runner.report import comparison_lines

    comps = holm([compare("a", "b", "exit 0", [0.7], [0.6]), compare("c", "b", "exit 0", [0.5], [0.6])])
    text = comparison_lines(comps, "seeds")
    assert "Holm" not in text and "none is tested" in text and "+10.00 points (n = 1)" in text
    tested = comparison_lines(holm([compare("a", "b", "exit 0", [0.7, 0.8], [0.6, 0.65])]), "seeds")
    assert "Holm" in tested
