"""The ``oneshot`` task kind end to end on a fake Omniglot tree: every method per seed, per-run errors, MHD, the
anytime curve, the report; bad input and missing data."""

import io
import json
import zipfile

import numpy as np
import pytest
import yaml

from metadyn.data import MissingDataError
from metadyn.errors import InputError
from metadyn.runner import run_task


def _png(img):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _glyph(c, drawer, size=12):
    img = np.full((size, size), 255, np.uint8)
    for r, col in np.random.default_rng(c).integers(2, size - 3, size=(6, 2)):
        img[r + drawer % 2, col] = 0
    return img


def fake_omniglot(root, way=4):
    """Two background sets (3 alphabets of 5 characters x 4 drawers) and two runs of ``way`` classes, zipped."""
    c = 0
    for part, alphabets in (("images_background_small1", ("A", "B")), ("images_background_small2", ("C",))):
        with zipfile.ZipFile(root / f"{part}.zip", "w") as zf:
            for a in alphabets:
                for k in range(5):
                    for d in range(4):
                        zf.writestr(f"{part}/{a}/character{k + 1:02d}/{c:04d}_{d + 1:02d}.png", _png(_glyph(c, d)))
                    c += 1
    with zipfile.ZipFile(root / "one_shot_runs.zip", "w") as zf:
        for r in (1, 2):
            perm, lines = np.random.default_rng(r).permutation(way), []
            for k in range(way):
                zf.writestr(f"run{r:02d}/training/class{k + 1:02d}.png", _png(_glyph(100 * r + k, 0)))
                zf.writestr(f"run{r:02d}/test/item{k + 1:02d}.png", _png(_glyph(100 * r + perm[k], 1)))
                lines.append(f"run{r:02d}/test/item{k + 1:02d}.png run{r:02d}/training/class{perm[k] + 1:02d}.png")
            zf.writestr(f"run{r:02d}/class_labels.txt", "\n".join(lines) + "\n")


def _task(tmp_path, **over):
    cfg = {"task": "oneshot_test", "kind": "oneshot", "seeds": [0, 1],
           "data": {"root": str(tmp_path / "omniglot"), "val_alphabets": ["C"], "runs": [1, 2], "size": 12},
           "episodes": {"n_way": 4, "k_shot": 1, "n_query": 2},
           "model": {"backbone": "conv4", "options": {"width": 4, "norm": "batch_episodic"}},
           "meta": {"inner_lr": 0.1, "inner_steps": 1, "eval_inner_steps": 1},
           "train": {"epochs": 1, "iterations": 2, "meta_batch": 2, "head_epochs": 1},
           "eval": {"val_episodes": 2, "methods": ["protonet", "exits", "final_exit"]}}
    for k, v in over.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_oneshot_kind_scores_every_method_per_seed_and_mhd(tmp_path):
    (tmp_path / "omniglot").mkdir()
    fake_omniglot(tmp_path / "omniglot")
    out, m = run_task(_task(tmp_path), out=tmp_path / "run", progress=False)
    groups = {r["group"] for r in m["rows"]}
    assert groups == {"protonet", "exits", "final_exit", "mhd"}
    for r in m["rows"]:
        assert 0 <= r["accuracy"] <= 1 and len(r["run_accuracy"]) == 2 and r["mflops"] > 0
        if r["group"] != "mhd":
            assert r["n"] == 2 and r["accuracy_std"] is not None and r["diverged"] == 0
    mhd = next(r for r in m["rows"] if r["group"] == "mhd")
    assert mhd["accuracy"] == 1.0  # each test image is its training image shifted by a pixel: MHD 0
    assert m["extra"]["mhd"]["error"] == [0.0, 0.0] and m["extra"]["runs"] == ["run01", "run02"]
    per_seed = m["extra"]["per_seed"]["exits"]
    assert set(per_seed) == {"0", "1"} or set(per_seed) == {0, 1}
    assert {c["group"] for c in m["curves"]} == {"protonet", "exits", "final_exit"}
    assert any(c["against"] == "mhd" for c in m["comparisons"])
    report = (out / "report.md").read_text()
    assert "One-shot error %" in report and "run02" in report and "Targets" in report
    assert (out / "error_vs_mflops.png").is_file() and (out / "seed1" / "exits" / "best.pt").is_file()
    assert json.loads((out / "metrics.json").read_text())["kind"] == "oneshot"


def test_oneshot_bad_input_and_missing_data_touch_nothing(tmp_path):
    (tmp_path / "omniglot").mkdir()
    fake_omniglot(tmp_path / "omniglot")
    with pytest.raises(InputError, match="runs are \\[4\\]-way"):
        run_task(_task(tmp_path, **{"episodes.n_way": 3}), out=tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="not in the background sets"):
        run_task(_task(tmp_path, **{"data.val_alphabets": ["Klingon"]}), out=tmp_path / "b", progress=False)
    with pytest.raises(MissingDataError, match="does not exist"):
        run_task(_task(tmp_path, **{"data.root": str(tmp_path / "absent")}), out=tmp_path / "c", progress=False)
    with pytest.raises(MissingDataError, match="run07"):
        run_task(_task(tmp_path, **{"data.runs": [7]}), out=tmp_path / "d", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")
