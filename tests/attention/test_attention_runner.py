import json
from pathlib import Path

import pytest

from metadyn.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--no-progress", "--set", "train.epochs=1", "--set", "model.options={depth: 8, exits: [1, 2, 3], width: 4}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "attention"
    assert main(["run", str(ROOT / "tasks" / "attention_digits.yaml"), "--quick", "--out", str(out), *TINY]) == 0
    return out


def test_attention_run_reports_every_variant(run):
    m = json.loads((run / "metrics.json").read_text())
    v = m["extra"]["variants"]
    assert list(v) == ["none", "own", "later", "detachable", "detachable_no_at"]
    assert all(len(r["runs"]) == 1 and len(r["accuracy_mean"]) == 3 for r in v.values())
    assert [r["deployable"] for r in v.values()] == [True, True, False, True, True]
    static = m["extra"]["reference_full_mflops"]
    assert v["later"]["mflops"][0] > static  # the later-layer masks need the final stage
    assert v["detachable"]["mflops"] == v["own"]["mflops"]  # pruned: the same deployed modules as own
    assert v["detachable"]["params"] == v["own"]["params"] < v["own"]["params"] + v["later"]["params"]
    assert v["detachable"]["accuracy_mean"][-1] == v["later"]["accuracy_mean"][-1]  # final exit frozen in stage 2
    assert all(c["mismatches"] == 0 for c in m["curve"]) and {c["variant"] for c in m["curve"]} <= set(v) - {"later"}
    d = m["extra"]["transfer_distance"]
    assert set(d) == {"init", "detachable", "detachable_no_at"} and all(0 <= x <= 2 for x in d["init"]["mean"])
    report = (run / "report.md").read_text()
    for heading in ("Test accuracy % per exit", "Attention-transfer distance", "Early exit at", "Paired differences"):
        assert heading in report
    assert (run / "accuracy_vs_mflops.png").stat().st_size > 0
    assert (run / "checkpoints" / "seed0" / "detachable.pt").exists()


def test_rerun_resumes_from_the_checkpoints(run, capsys):
    before = json.loads((run / "metrics.json").read_text())
    assert main(["run", str(ROOT / "tasks" / "attention_digits.yaml"), "--quick", "--out", str(run), *TINY]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["extra"]["variants"]["detachable"]["accuracy_mean"] == \
        before["extra"]["variants"]["detachable"]["accuracy_mean"]


@pytest.mark.parametrize("override, word", [("attention.source=previous", "source"),
                                             ("attention.beta=-1", "beta"), ("seeds=[]", "seeds"),
                                             ("model={backbone: mlp}", "feature map")])
def test_bad_task_input_exits_2_and_leaves_no_folder(tmp_path, capsys, override, word):
    out = tmp_path / "x"
    code = main(["run", str(ROOT / "tasks" / "attention_digits.yaml"), "--quick", "--out", str(out), *TINY[:3],
                 "--set", override])
    assert code == 2 and word in capsys.readouterr().err
    assert not out.exists()
