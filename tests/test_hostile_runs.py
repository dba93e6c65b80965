"""Hostile use of ``metadyn run`` / ``metadyn bench`` and their folders (issue 14): each test pins one group of
the hostile-input run and failed on main before its fix. Library-level groups are in test_hostile_inputs.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from metadyn.cli import main
from metadyn.core.train import pick_device
from metadyn.errors import InputError
from metadyn.registry import BENCHMARKS
from metadyn.runner import run_folder

TASK = "digits_anytime"
MLP = ["--quick", "--no-progress", "--set", "train.epochs=1", "--set", "model.backbone=mlp",
       "--set", "model.options={hidden: [8, 8]}"]
RESNET = ["--quick", "--no-progress", "--set", "train.epochs=1",
          "--set", "model.options={depth: 8, exits: [1, 2, 3], width: 4}"]


def _run(capsys, *args):
    code = main(["run", TASK, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> bool:
    return err.startswith("metadyn: error: ") and err.count("\n") == 1 and "Traceback" not in err


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


# --------------------------------------------------------------------------- group 1: one run per folder


def test_a_second_run_into_a_held_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with run_folder(out, {"task": "another", "train": {"lr": 0.1}}):  # a live run holds the new folder
        before = _snapshot(out)
        code, _, err = _run(capsys, *MLP, "--set", "train.lr=0.05", "--out", str(out))
        assert code == 2 and _one_line(err) and "another metadyn run" in err and f"process {os.getpid()}" in err
        assert _snapshot(out) == before  # its config.yaml was not replaced


def test_a_killed_runs_lock_goes_with_it_and_an_empty_run_may_be_retaken(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from metadyn.runner import run_folder\n"
         f"with run_folder(Path({str(out)!r}), {{'task': 'killed'}}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _run(capsys, *MLP, "--out", str(out))[0] == 2  # held
    finally:
        holder.kill()
        holder.wait()
    # killed before its first checkpoint: the folder holds only its config.yaml, so another config may take it
    code, _, err = _run(capsys, *MLP, "--out", str(out))
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["task"] == "digits_anytime"


# --------------------------------------------------------------------------- group 2: divergence is not success


def test_divergence_exits_2_and_keeps_only_a_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "div"
    code, _, err = _run(capsys, *RESNET, "--set", "train.lr=30", "--set", "train.schedule=constant",
                        "--set", "train.epochs=2", "--out", str(out))
    assert code == 2 and _one_line(err) and "NaN or infinite" in err  # exit 0 at 10% accuracy before
    assert not (out / "metrics.json").exists()
    failed = json.loads((out / "failed.json").read_text())
    assert failed["type"] == "NonFiniteLossError" and "config.yaml" in failed["kept"]
    if (out / "checkpoint.pt").exists():
        kept = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())


def test_nan_logits_in_evaluation_exit_2(tmp_path, capsys, monkeypatch):
    import metadyn.core.evaluation as ev

    real = ev.collect_logits

    def nan_logits(model, x, batch_size=256):
        return [torch.full_like(lg, float("nan")) for lg in real(model, x, batch_size)]

    monkeypatch.setattr(ev, "collect_logits", nan_logits)
    out = tmp_path / "nan"
    code, _, err = _run(capsys, *MLP, "--out", str(out))
    assert code == 2 and _one_line(err) and "NaN" in err  # exit 0 with a null ECE before
    assert not (out / "metrics.json").exists() and (out / "checkpoint.pt").exists()


# --------------------------------------------------------------------------- group 6: settings a result depends on


def test_metrics_record_threads_and_determinism_settings(tmp_path, capsys):
    out = tmp_path / "settings"
    assert _run(capsys, *MLP, "--out", str(out))[0] == 0
    s = json.loads((out / "metrics.json").read_text())["settings"]
    assert s["threads"] == torch.get_num_threads() and s["omp_num_threads"] == os.environ.get("OMP_NUM_THREADS")
    assert {"interop_threads", "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark", "dtype",
            "torch", "device"} <= set(s)
    assert f"{s['threads']} CPU thread(s)" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- group 7: valid configs finish


def test_tiny_validation_split_finishes(tmp_path, capsys):
    out = tmp_path / "tinyval"
    code, _, err = _run(capsys, *RESNET, "--set", "data.val_fraction=0.003", "--out", str(out))
    assert code == 0, err  # "budget 48544 is below the cheapest achievable expected cost 52707.2" before
    op = json.loads((out / "metrics.json").read_text())["extra"]["operating_point"]
    assert op["mismatches"] <= (0 if pick_device("auto").type == "cpu" else 3)  # TF32 near a threshold on a GPU


def test_a_late_failure_keeps_the_trained_checkpoint_usable(tmp_path, capsys, monkeypatch):
    import metadyn.core.evaluation as ev
    from metadyn.errors import InputError

    def broken(*a, **k):
        raise InputError("the sweep broke")

    out = tmp_path / "late"
    with monkeypatch.context() as m:
        m.setattr(ev, "budget_sweep", broken)
        code, _, err = _run(capsys, *MLP, "--out", str(out))
    assert code == 2 and _one_line(err) and "the sweep broke" in err and "failed.json" in err
    failed = json.loads((out / "failed.json").read_text())
    assert failed["error"] == "the sweep broke" and "checkpoint.pt" in failed["kept"]
    trained = (out / "checkpoint.pt").read_bytes()
    code, _, err = _run(capsys, *MLP, "--out", str(out))  # the same config: resumes, nothing retrained
    assert code == 0, err
    assert (out / "checkpoint.pt").read_bytes() == trained and not (out / "failed.json").exists()


# --------------------------------------------------------------------------- group 11: unwritable places


def test_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # root ignores chmod; a denied mkdir is what a user meets
    code, _, err = _run(capsys, *MLP, "--out", str(tmp_path / "run"))
    assert code == 2 and _one_line(err) and "cannot create the run folder" in err and "Permission denied" in err


@pytest.fixture
def fake_bench(monkeypatch):
    calls = []

    def run(quick: bool = False, n: int = 1) -> dict:
        calls.append(n)
        return {"benchmark": "fake", "n": n}

    BENCHMARKS.load()
    monkeypatch.setitem(BENCHMARKS._items, "fake", run)
    return calls


def test_json_target_is_checked_before_the_benchmark(tmp_path, capsys, fake_bench):
    assert main(["bench", "fake", "--json", str(tmp_path)]) == 2  # a folder
    assert main(["bench", "fake", "--json", str(tmp_path / "a" / "b" / "x.json")]) == 2  # two levels missing
    err = capsys.readouterr().err
    assert err.count("metadyn: error: ") == 2 and "is a folder" in err and "does not exist" in err
    assert fake_bench == [] and not (tmp_path / "a").exists()  # nothing ran, nothing created at the root


def test_a_late_json_failure_prints_the_result(tmp_path, capsys, fake_bench, monkeypatch):
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert main(["bench", "fake", "--json", str(tmp_path / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 1 and _one_line(err) and "No space left" in err  # the result is not lost
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp file left


# --------------------------------------------------------------------------- group 12: bench options


@pytest.mark.parametrize("option, message", [
    ("foo=1", "has no option 'foo'"),
    ("batch=abc", "'inference.batch' must be an integer"),
    ("batch=0", "'inference.batch' must be >= 1"),
    ("budget=.nan", "must not be NaN"),
    ("micro_batch=0", "micro_batch must be -1"),
])
def test_bench_options_are_validated(capsys, option, message):
    assert main(["bench", "inference", "--quick", "--set", "device=cpu", "--set", option]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and message in err


# --------------------------------------------------------------------------- group 13: devices


@pytest.mark.parametrize("device", ["tpu", "meta", "mps", "cuda:abc", "cuda:99"])
def test_unusable_devices_are_refused_before_the_folder(tmp_path, capsys, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "dev"
    code, _, err = _run(capsys, *MLP, "--set", f"device={device}", "--out", str(out))
    assert code == 2 and _one_line(err) and "device" in err
    assert not out.exists()


# ------------------------------------------------------------- group 14: early checks, retaking a failed run


@pytest.mark.parametrize("setting, message", [
    ("train.momentum=-1", "'train.momentum' must be >= 0"),
    ("eval.batch_size=0", "'eval.batch_size' must be >= 1"),
    ("seed=1180591620717411303424", "'seed' must be <= 4294967295"),
    ("model.options.width=0", "resnet width must be a positive integer"),
    ("eval.ece_bins=0", "'eval.ece_bins' must be >= 1"),
    ("data.val_fraction=0", "'data.val_fraction' must be > 0"),
])
def test_bad_settings_fail_before_the_folder(tmp_path, capsys, setting, message):
    out = tmp_path / "bad"
    code, _, err = _run(capsys, *RESNET, "--set", setting, "--out", str(out))
    assert code == 2 and _one_line(err) and message in err
    assert not out.exists()


def test_a_run_that_failed_before_its_first_checkpoint_may_be_rerun_with_another_config(tmp_path, capsys):
    out = tmp_path / "retry"
    code, _, err = _run(capsys, *MLP, "--set", "train.lr=1e30", "--out", str(out))
    assert code == 2 and "NaN or infinite" in err and not (out / "checkpoint.pt").exists()
    code, _, err = _run(capsys, *MLP, "--out", str(out))  # refused as "a different config" before
    assert code == 0, err
    code, _, err = _run(capsys, *MLP, "--set", "train.lr=0.1", "--out", str(out))  # now it holds a checkpoint
    assert code == 2 and "holds a run with a different config (train.lr: 0.05 -> 0.1)" in err


# --------------------------------------------------------------------------- group 15: files the run writes


def test_out_and_json_create_at_most_their_last_level(tmp_path, capsys, fake_bench):
    code, _, err = _run(capsys, *MLP, "--out", str(tmp_path / "a" / "b" / "run"))
    assert code == 2 and "above --out does not exist" in err and not (tmp_path / "a").exists()
    target = tmp_path / "new" / "r.json"
    assert main(["bench", "fake", "--json", str(target)]) == 0 and json.loads(target.read_text())["n"] == 1
    assert main(["bench", "fake", "--json", str(target), "--set", "n=2"]) == 2  # never silently overwritten
    assert "pass --overwrite" in capsys.readouterr().err and json.loads(target.read_text())["n"] == 1
    assert main(["bench", "fake", "--json", str(target), "--set", "n=2", "--overwrite"]) == 0
    assert json.loads(target.read_text())["n"] == 2


def test_results_get_the_umask_permissions_and_stale_temps_are_cleaned(tmp_path, capsys):
    out = tmp_path / "perm"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")  # a run killed before its first checkpoint ...
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # ... during a write
    (out / ".metrics.json.abc.tmp").write_text("{")
    old = os.umask(0o022)
    try:
        code, _, err = _run(capsys, *MLP, "--out", str(out))
    finally:
        os.umask(old)
    assert code == 0, err
    assert not list(out.glob(".*.tmp"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if not p.name.startswith(".")}
    assert set(modes.values()) == {0o644}, modes  # metrics, report, config and checkpoint were 0600


def test_plots_are_written_atomically(tmp_path):
    from metadyn.core import plots

    path = tmp_path / "plot.png"
    path.write_bytes(b"the finished run's plot")
    plt = plots.pyplot()
    fig, ax = plt.subplots()

    def crash(target, *a, **k):  # killed half-way through writing the PNG
        if isinstance(target, str | Path):
            Path(target).write_bytes(b"half a PNG")
        else:
            target.write(b"half a PNG")
        raise KeyboardInterrupt

    fig.savefig = crash
    with pytest.raises(KeyboardInterrupt):
        plots.save_figure(fig, path)
    assert path.read_bytes() == b"the finished run's plot" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


# --------------------------------------------------------------------------- group 16: messages


def test_a_folder_as_task_file_and_argparse_errors_are_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "is a folder, not a task file" in err
    for argv in (["run"], ["run", TASK, "--bogus"], [], ["bench"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert _one_line(err) and "(see --help)" in err, argv


def test_a_task_name_cannot_send_the_default_folder_elsewhere(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("../escape", "/tmp/escape", ""):
        code, _, err = _run(capsys, *MLP, "--set", f"task={name}")
        assert code == 2 and _one_line(err) and "not a plain name" in err
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- sixth session: the CLI probe's findings


def test_a_compare_method_named_dot_dot_is_refused_before_any_folder_is_touched(capsys, tmp_path):
    """`..` was a "folder-safe" method name: the run resumed from, and overwrote, the checkpoint of the run in the
    folder above its own."""
    out = tmp_path / "victim" / "sub"
    out.parent.mkdir()
    (out.parent / "checkpoint.pt").write_bytes(b"another run's checkpoint")
    code = main(["run", "compare_digits", "--quick", "--no-progress", "--out", str(out),
                 "--set", "methods={..: {method: ce}}"])
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err) and "not only dots" in err
    assert (out.parent / "checkpoint.pt").read_bytes() == b"another run's checkpoint" and not out.exists()


@pytest.mark.parametrize("weights", ["[-1, 1, 1]", "[0, 0, 0]", "[1, .inf, 1]"])
def test_exit_weights_that_train_nothing_or_reward_errors_are_refused(capsys, tmp_path, weights):
    """Negative or all-zero exit weights ran to chance accuracy with exit status 0."""
    code, _, err = _run(capsys, *MLP, "--set", f"train.method_options.weights={weights}", "--out",
                        str(tmp_path / "w"))
    assert code == 2 and _one_line(err) and "exit weights must be finite, non-negative" in err


def test_a_key_given_twice_in_a_task_file_is_refused(capsys, tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` block replaced the first, a method listed twice
    silently changed the reference of every comparison."""
    task = tmp_path / "twice.yaml"
    task.write_text("task: twice\nkind: anytime\ndata: {name: digits}\ntrain: {epochs: 1}\ntrain: {lr: 0.1}\n")
    code = main(["run", str(task), "--quick", "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err) and "key 'train' is given twice" in err and "line 5" in err
    from metadyn.config import safe_load

    assert safe_load("base: &b {a: 1, b: 2}\nderived: {<<: *b, a: 3}")["derived"] == {"a": 3, "b": 2}  # merges kept


def test_a_set_below_a_methods_unset_model_is_refused_not_a_default_resnet():
    """`--set methods.X.model.options.width=4` created `model: {options: {width: 4}}`, which built a default ResNet-56
    (10x the FLOPs of the task's model) for that method only."""
    from metadyn.config import load_task

    with pytest.raises(InputError, match=r"'methods.feature L2.model.backbone' is required"):
        load_task("labelscarce_digits", ["methods.feature L2.model.options.width=4"], quick=True)
    cfg = load_task("compare_digits", [], quick=True)  # methods that name their backbone still load
    assert cfg.methods["msdnet"].model.backbone == "msdnet"


def test_kind_cannot_be_changed_with_set_and_set_reaches_the_quick_section():
    """`--set kind=...` gave an AttributeError traceback (the config class was chosen before the overrides);
    `--set quick.train.epochs=1` was applied after the quick section and silently ignored."""
    from metadyn.config import load_task

    with pytest.raises(InputError, match="a task's kind cannot be changed"):
        load_task(TASK, ["kind=labelscarce"], quick=True)
    assert load_task(TASK, ["kind=anytime"], quick=True).kind == "anytime"
    assert load_task(TASK, ["quick.train.epochs=1"], quick=True).train.epochs == 1
    assert load_task(TASK, ["quick.train.epochs=1", "train.epochs=2"], quick=True).train.epochs == 2  # --set wins


def test_resuming_in_another_precision_is_refused(capsys, tmp_path):
    """The precision was not part of a run's identity: a bf16 run resumed in fp32 mixed both and recorded fp32."""
    out = tmp_path / "p"
    assert _run(capsys, *MLP, "--out", str(out))[0] == 0
    before = _snapshot(out)
    code, _, err = _run(capsys, *MLP, "--out", str(out), "--precision", "bf16")
    assert code == 2 and _one_line(err) and "precision: 'fp32' -> 'bf16'" in err
    assert _snapshot(out) == before
    assert _run(capsys, *MLP, "--out", str(out))[0] == 0  # the same precision still resumes (here: re-evaluates)


def test_datafree_synth_bn_weight_would_give_the_zskd_control_the_prior_too():
    from metadyn.datafree import SynthesisSettings
    from metadyn.runner.kinds.datafree import ImpressionSpec

    with pytest.raises(InputError, match="impressions.bn_weight"):
        ImpressionSpec(synth=SynthesisSettings(bn_weight=0.5)).settings()


@pytest.mark.parametrize("exits", [[], [1, 1, 3], [5, 3, 1]])
def test_resnet_exits_empty_repeated_or_unsorted_are_refused(exits):
    """They were silently replaced by the default exits, deduplicated or sorted (config.yaml kept the given list)."""
    from metadyn.core.backbones.resnet import resnet_exits

    with pytest.raises(InputError, match="increasing, distinct block numbers"):
        resnet_exits(depth=20, exits=exits)


def test_bench_json_with_a_trailing_slash_is_refused(tmp_path):
    from metadyn.cli import JsonTarget

    with pytest.raises(InputError, match="ends with a slash"):
        JsonTarget(str(tmp_path / "new.json") + "/", overwrite=False)
    assert not (tmp_path / "new.json").exists()
