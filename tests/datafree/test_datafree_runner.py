"""Task kind ``datafree``: the evaluation table end to end with tiny settings, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metadyn.errors import InputError
from metadyn.runner import run_task

TASK = Path(__file__).resolve().parents[2] / "tasks" / "datafree_digits.yaml"
TINY = ["seeds=[0, 1]", "teacher.widths=[8, 16]", "teacher.train.epochs=3", "exits.at=[stages.0]",
        "exits.train.epochs=1", "impressions.num=40", "impressions.synth.steps=3", "impressions.synth.batch_size=20"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("datafree") / "run"
    return out, run_task(TASK, TINY, quick=True, out=out, progress=False)[1]


def test_run_writes_the_table_for_every_condition_and_seed(tiny_run):
    out, m = tiny_run
    assert m["kind"] == "datafree" and m["dataset"] == "digits"
    for f in ("metrics.json", "report.md", "config.yaml", "accuracy_vs_mflops.png", "impressions.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "metrics.json").read_text())["rows"] == json.loads(json.dumps(m["rows"]))
    conditions = ["real", "impressions", "impressions_bn", "noise", "untrained"]
    assert list(dict.fromkeys(r["group"] for r in m["rows"])) == conditions
    for c in conditions:
        rows = [r for r in m["rows"] if r["group"] == c]
        assert [r["exit"] for r in rows] == [0, 1] and rows[0]["mflops"] < rows[1]["mflops"]
        assert all(r["n"] == 2 and r["accuracy_std"] is not None for r in rows)
        assert len([b for b in m["budgets"] if b["group"] == c]) == 3 and any(x["group"] == c for x in m["curves"])
    finals = {r["accuracy"] for r in m["rows"] if r["exit"] == 1}
    assert len(finals) == 1  # the final exit is the frozen teacher in every condition
    assert set(m["extra"]["impressions"]) == {f"seed{s}_{n}" for s in (0, 1) for n in ("impressions", "impressions_bn")}
    comps = m["comparisons"]
    assert {(c["group"], c["against"]) for c in comps} == {("impressions", "noise"), ("real", "impressions"),
                                                           ("impressions_bn", "noise"), ("real", "impressions_bn")}
    assert all(c["n"] == 2 for c in comps)  # paired by seed
    report = (out / "report.md").read_text()
    assert "uniform noise (control)" in report and "median KL" in report and "What the numbers show" in report
    # the report says, next to the table, what was chosen on real data
    assert "Real data in the choices" in report and "fitted on this task's real `val` split" in report


def test_rerun_resumes_from_checkpoints_with_the_same_result(tiny_run):
    out, m = tiny_run
    again = run_task(TASK, TINY, quick=True, out=out, progress=False)[1]
    assert again["rows"] == m["rows"] and again["budgets"] == m["budgets"]


@pytest.mark.parametrize("bad", ["conditions=[real, magic]", "exits.at=[nowhere]", "impressions.synth.tau=0",
                                 "exits.tau=-1", "teacher.train.optimizer=lbfgs", "seeds=[]",
                                 "impressions.synth.bounds=[1, 0]", "impressions.sync.tau=2",
                                 "impressions.preset=zskd"])
def test_bad_input_is_refused_before_the_folder_is_made(tmp_path, bad):
    out = tmp_path / "run"
    with pytest.raises(InputError):
        run_task(TASK, [*TINY, bad], quick=True, out=out, progress=False)
    assert not out.exists()


def test_student_condition_distils_a_smaller_multi_exit_network(tmp_path):
    over = [*TINY, "seeds=[0]", "conditions=[noise]", "student={backbone: conv4, options: {width: 8}}"]
    out, m = run_task(TASK, over, quick=True, out=tmp_path / "run", progress=False)
    assert list(dict.fromkeys(r["group"] for r in m["rows"])) == ["noise", "student"]
    student = [r for r in m["rows"] if r["group"] == "student"]
    assert len(student) == 4  # conv4: its own four exits, none of them the teacher
    assert student[-1]["mflops"] < [r for r in m["rows"] if r["group"] == "noise"][-1]["mflops"]
    assert "small multi-exit student" in (out / "report.md").read_text()
    assert (out / "checkpoints" / "seed0_impressions_data.pt").is_file()  # the student's transfer set


def test_paper_preset_is_the_released_zskd_recipe():
    from metadyn.datafree import SynthesisSettings
    from metadyn.datafree.impressions import PAPER_PRESET
    from metadyn.runner.kinds.datafree import ImpressionSpec

    assert PAPER_PRESET == {"tau": 20.0, "steps": 1500, "lr": 0.001, "batch_size": 100, "init": "uniform"}
    paper = ImpressionSpec(preset="paper").settings()
    assert paper == SynthesisSettings.paper() == SynthesisSettings(tau=20.0, steps=1500, lr=0.001, batch_size=100,
                                                                   init="uniform")
    assert ImpressionSpec().settings() == SynthesisSettings()  # the tuned defaults: tau 1, 100 steps at lr 0.1
    assert (SynthesisSettings().tau, SynthesisSettings().steps, SynthesisSettings().lr) == (1.0, 100, 0.1)
    kept = ImpressionSpec(preset="paper", synth=SynthesisSettings(bounds=[-1.0, 1.0], jitter=1, steps=30)).settings()
    assert kept.bounds == [-1.0, 1.0] and kept.jitter == 1 and kept.tau == 20.0 and kept.lr == 0.001
    assert kept.steps == 30  # a value set away from the tuned default (e.g. by --quick) is kept
