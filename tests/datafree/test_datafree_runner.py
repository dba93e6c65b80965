"""Task kind ``datafree``: the evaluation table end to end with tiny settings, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metadyn.errors import InputError
from metadyn.runner import run_task

TASK = Path(__file__).resolve().parents[2] / "tasks" / "datafree_digits.yaml"
TINY = ["repeats=2", "teacher.widths=[8, 16]", "teacher.train.epochs=3", "exits.at=[stages.0]",
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
    assert json.loads((out / "metrics.json").read_text())["extra"]["seeds"] == [0, 1]
    e = m["extra"]
    assert e["condition_names"] == ["real", "impressions", "impressions_bn", "noise", "untrained"]
    assert [x["exit"] for x in m["exits"]] == [0, 1]
    assert m["exits"][0]["mflops"] < m["exits"][1]["mflops"]
    for name, agg in e["conditions"].items():
        assert len(agg["exits"]) == 2 and agg["curve"] and len(agg["budgets"]) == 3, name
        assert all(x["accuracy_std"] is not None for x in agg["exits"])
    for s in e["per_seed"]:
        finals = {name: r["test"][-1] for name, r in s["conditions"].items()}
        assert len(set(finals.values())) == 1  # the final exit is the frozen teacher in every condition
        assert set(s["impressions"]) == {"impressions", "impressions_bn"}
    report = (out / "report.md").read_text()
    assert "uniform noise (control)" in report and "median KL" in report and "What the numbers show" in report


def test_rerun_resumes_from_checkpoints_with_the_same_result(tiny_run):
    out, m = tiny_run
    again = run_task(TASK, TINY, quick=True, out=out, progress=False)[1]
    assert again["extra"]["conditions"] == m["extra"]["conditions"]


@pytest.mark.parametrize("bad", ["conditions=[real, magic]", "exits.at=[nowhere]", "impressions.synth.tau=0",
                                 "exits.tau=-1", "teacher.train.optimizer=lbfgs", "repeats=0",
                                 "impressions.synth.bounds=[1, 0]", "impressions.sync.tau=2"])
def test_bad_input_is_refused_before_the_folder_is_made(tmp_path, bad):
    out = tmp_path / "run"
    with pytest.raises(InputError):
        run_task(TASK, [*TINY, bad], quick=True, out=out, progress=False)
    assert not out.exists()


def test_student_condition_distils_a_smaller_multi_exit_network(tmp_path):
    over = [*TINY, "repeats=1", "conditions=[noise]", "student.backbone=conv4", "student.options={width: 8}"]
    out, m = run_task(TASK, over, quick=True, out=tmp_path / "run", progress=False)
    e = m["extra"]
    assert e["condition_names"] == ["noise", "student"]
    student = e["conditions"]["student"]["exits"]
    assert len(student) == 4  # conv4: its own four exits, none of them the teacher
    assert student[-1]["mflops"] < e["conditions"]["noise"]["exits"][-1]["mflops"]
    assert "Student (its own exits and MFLOPs)" in (out / "report.md").read_text()
    assert (out / "checkpoints" / "seed0_impressions_data.pt").is_file()  # the student's transfer set
