import json
from pathlib import Path

import pytest

from metadyn.cli import main
from metadyn.core.train import pick_device

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--no-progress", "--set", "train.epochs=1", "--set", "model.options={depth: 8, exits: [1, 2, 3], width: 4}"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "attention"
    assert main(["run", str(ROOT / "tasks" / "attention_digits.yaml"), "--quick", "--out", str(out), *TINY]) == 0
    return out


def test_attention_run_reports_every_variant(run):
    m = json.loads((run / "metrics.json").read_text())
    variants = ["none", "own", "later", "detachable", "detachable_no_at"]
    v = {g: [r for r in m["rows"] if r["group"] == g] for g in variants}
    assert list(dict.fromkeys(r["group"] for r in m["rows"])) == variants
    assert all(len(rows) == 3 and rows[0]["n"] == 1 for rows in v.values())
    assert [rows[0]["deployable"] for rows in v.values()] == [True, True, False, True, True]
    static = m["extra"]["reference_full_mflops"]
    mf = {g: [r["mflops"] for r in rows] for g, rows in v.items()}
    assert mf["later"][0] > static  # the later-layer masks need the final stage
    assert mf["detachable"] == mf["own"]  # pruned: the same deployed modules as own
    p = m["extra"]["params"]
    assert p["detachable"] == p["own"] < p["own"] + p["later"]
    assert v["detachable"][-1]["accuracy"] == v["later"][-1]["accuracy"]  # final exit frozen in stage 2
    allowed = 0 if pick_device("auto").type == "cpu" else 3  # TF32 convolutions near a threshold on a GPU
    assert all(b["mismatches"] <= allowed for b in m["budgets"])
    assert {b["group"] for b in m["budgets"]} <= set(v) - {"later"}
    d = m["extra"]["distance"]
    assert set(d) == {"init", "detachable", "detachable_no_at"} and all(0 <= mu <= 2 for mu, _ in d["init"])
    assert len(m["comparisons"]) == 5 * 2  # five pairs x two early exits
    report = (run / "report.md").read_text()
    for heading in ("Test accuracy % per exit", "Attention-transfer distance", "Early exit at", "Paired differences"):
        assert heading in report
    assert "One data split (from `seed: " in report and "not over splits" in report  # the protocol says it
    assert (run / "accuracy_vs_mflops.png").stat().st_size > 0
    assert (run / "checkpoints" / "seed0" / "detachable.pt").exists()


def test_rerun_resumes_from_the_checkpoints(run, capsys):
    before = json.loads((run / "metrics.json").read_text())
    assert main(["run", str(ROOT / "tasks" / "attention_digits.yaml"), "--quick", "--out", str(run), *TINY]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["rows"] == before["rows"]


@pytest.mark.parametrize("override, word", [("attention.source=previous", "source"),
                                             ("attention.beta=-1", "beta"), ("seeds=[]", "seeds"),
                                             ("model={backbone: mlp}", "feature map")])
def test_bad_task_input_exits_2_and_leaves_no_folder(tmp_path, capsys, override, word):
    out = tmp_path / "x"
    code = main(["run", str(ROOT / "tasks" / "attention_digits.yaml"), "--quick", "--out", str(out), *TINY[:3],
                 "--set", override])
    assert code == 2 and word in capsys.readouterr().err
    assert not out.exists()
