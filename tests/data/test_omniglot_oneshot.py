"""Omniglot's background sets (zipped or unpacked) with their alphabets, the one-shot runs, and the episodes of
the one-shot protocol, on fake trees in the authors' layouts; the real files are checked when
$METADYN_DATA/omniglot holds them."""

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metadyn.data import MissingDataError
from metadyn.data.fewshot_folders import omniglot_characters, omniglot_runs
from metadyn.errors import InputError
from metadyn.meta.data import AlphabetEpisodes, fewshot_pool, oneshot_samplers

REAL = Path(os.environ.get("METADYN_DATA", "/nonexistent")) / "omniglot"


def _glyph(c: int, drawer: int, size: int = 12) -> np.ndarray:
    """Black ink (0) on white (255): a pattern of character ``c``, shifted by the drawer."""
    img = np.full((size, size), 255, np.uint8)
    rng = np.random.default_rng(c)
    pts = rng.integers(2, size - 3, size=(6, 2))
    for r, col in pts:
        img[r + drawer % 2, col] = 0
    return img


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def fake_background(root: Path, part: str, alphabets: dict, drawers: int = 4, zipped: bool = True, first: int = 0):
    """``alphabets``: name -> number of characters; character ids start at ``first``."""
    files, c = {}, first
    for a, n in alphabets.items():
        for k in range(n):
            for d in range(drawers):
                files[f"{part}/{a}/character{k + 1:02d}/{c:04d}_{d + 1:02d}.png"] = _png(_glyph(c, d))
            c += 1
    _write(root, part, files, zipped)


def fake_runs(root: Path, name: str, runs: int = 2, way: int = 3, zipped: bool = True) -> list[list[int]]:
    """Runs whose test image ``i`` is the class ``answers[r][i]`` (drawn by another drawer). Returns the answers."""
    files, answers = {}, []
    for r in range(1, runs + 1):
        run, perm = f"run{r:02d}", np.random.default_rng(r).permutation(way)
        lines = []
        for k in range(way):
            files[f"{run}/training/class{k + 1:02d}.png"] = _png(_glyph(100 * r + k, 0))
            files[f"{run}/test/item{k + 1:02d}.png"] = _png(_glyph(100 * r + perm[k], 1))
            lines.append(f"{run}/test/item{k + 1:02d}.png {run}/training/class{perm[k] + 1:02d}.png")
        files[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
        answers.append(perm.tolist())
    _write(root, name, files, zipped)
    return answers


def _write(root: Path, name: str, files: dict, zipped: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(root / f"{name}.zip", "w") as zf:
            for member, data in files.items():
                zf.writestr(member, data)
        return
    for member, data in files.items():  # unpacked: the zip's members below root
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(data)


@pytest.mark.parametrize("zipped", [True, False])
def test_background_sets_are_read_zipped_or_unpacked_with_alphabets(tmp_path, zipped):
    fake_background(tmp_path, "images_background_small1", {"Alpha": 3, "Beta": 2}, zipped=zipped)
    fake_background(tmp_path, "images_background_small2", {"Beta": 2, "Gamma": 4}, zipped=zipped)  # Beta: again
    chars = omniglot_characters(str(tmp_path), size=8)
    assert chars.names == ["Alpha/character01", "Alpha/character02", "Alpha/character03", "Beta/character01",
                           "Beta/character02", "Gamma/character01", "Gamma/character02", "Gamma/character03",
                           "Gamma/character04"]  # the shared alphabet once, from the first set
    assert chars.x.shape == (9 * 4, 1, 8, 8) and float(chars.x.min()) >= 0 and float(chars.x.max()) > 0.2
    assert float(chars.x.mean()) < 0.5  # ink is 1 on a 0 background
    pool = chars.pool(["Gamma"], rotations=True)
    assert len(pool.classes) == 16 and pool.classes[:4] == [20, 21, 22, 23]  # character 5, rotated 0..3 times
    one = omniglot_characters(str(tmp_path), sets=["images_background_small2"], size=8)
    assert sorted(set(one.alphabets)) == ["Beta", "Gamma"]


def test_existing_omniglot_pools_read_the_zips_too(tmp_path):
    fake_background(tmp_path, "images_background", {"A": 6}, drawers=2)
    fake_background(tmp_path, "images_evaluation", {"B": 6}, drawers=2, first=6)
    pools = {s: fewshot_pool("omniglot", s, str(tmp_path), size=4) for s in ("train", "val", "test")}
    assert [len(p.classes) for p in pools.values()] == [8, 2, 2]


@pytest.mark.parametrize("zipped", [True, False])
def test_one_shot_runs_answers_follow_class_labels(tmp_path, zipped):
    answers = fake_runs(tmp_path, "one_shot_runs", runs=2, way=3, zipped=zipped)
    runs = omniglot_runs(str(tmp_path), size=6)
    assert [r.name for r in runs] == ["run01", "run02"]
    for run, ans in zip(runs, answers):
        assert run.train_files == sorted(run.train_files) and run.test_files == sorted(run.test_files)
        assert run.test_y.tolist() == ans
        assert run.train_x.shape == (3, 1, 6, 6) and run.test_ink[0].shape == (12, 12)
        assert run.train_ink[0].dtype == bool and 0 < run.train_ink[0].sum() <= 6  # the ink pixels at full size
    assert [r.name for r in omniglot_runs(str(tmp_path), runs=[2])] == ["run02"]
    with pytest.raises(MissingDataError, match="run03"):
        omniglot_runs(str(tmp_path), runs=[3])


def test_run_files_are_checked(tmp_path):
    fake_runs(tmp_path, "runs", runs=1, zipped=False)
    labels = tmp_path / "run01" / "class_labels.txt"
    labels.write_text("run01/test/item01.png\n")
    with pytest.raises(InputError, match="must hold lines"):
        omniglot_runs(str(tmp_path))
    labels.write_text("run01/test/item01.png run01/training/class09.png\n")
    with pytest.raises(InputError, match="class09.png"):
        omniglot_runs(str(tmp_path))
    with pytest.raises(MissingDataError, match="no one-shot runs"):
        omniglot_runs(str(tmp_path / "run01" / "training"))
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        omniglot_runs(str(tmp_path))


def test_missing_root_or_set_is_missing_data(tmp_path, monkeypatch):
    monkeypatch.delenv("METADYN_DATA", raising=False)
    with pytest.raises(MissingDataError, match="METADYN_DATA"):
        omniglot_characters(None)
    with pytest.raises(MissingDataError, match="images_background_small1"):
        omniglot_characters(str(tmp_path))
    fake_background(tmp_path / "omniglot", "images_background_small1", {"A": 2}, drawers=2)
    monkeypatch.setenv("METADYN_DATA", str(tmp_path))
    assert len(omniglot_characters(None, sets=["images_background_small1"], size=4).names) == 2


def test_alphabet_episodes_stay_within_one_alphabet_and_are_deterministic(tmp_path):
    fake_background(tmp_path, "images_background_small1", {"A": 5, "B": 6, "C": 2})
    chars = omniglot_characters(str(tmp_path), sets=["images_background_small1"], size=8)
    pools = {a: chars.pool([a]) for a in ("A", "B", "C")}
    sampler = AlphabetEpisodes(pools, n_way=4, k_shot=1, n_query=2, seed=3)
    assert sampler.names == ["A", "B"]  # C has too few characters for 4-way episodes
    seen = set()
    for i in range(12):
        ep, a = sampler.episode(i), sampler.alphabet(i)
        seen.add(a)
        owners = {tuple(x.flatten().tolist()) for x in pools[a].x}
        assert all(tuple(x.flatten().tolist()) in owners for x in torch.cat([ep.support_x, ep.query_x]))
        assert torch.equal(ep.query_x, sampler.episode(i).query_x)
    assert seen == {"A", "B"}
    sx, sy, qx, qy = sampler.batch(0, 3)
    assert sx.shape == (3, 4, 1, 8, 8) and qy.shape == (3, 8)
    with pytest.raises(InputError, match="no alphabet has n_way=7"):
        AlphabetEpisodes(pools, n_way=7, k_shot=1, n_query=1)


def test_oneshot_samplers_hold_out_alphabets(tmp_path):
    fake_background(tmp_path, "images_background_small1", {"A": 5, "B": 6})
    chars = omniglot_characters(str(tmp_path), sets=["images_background_small1"], size=8)
    s = oneshot_samplers(chars, ["B"], 4, 1, 2, rotations=True, seed=1)
    assert s["train"].names == ["A"] and len(s["train"].samplers[0].pool.classes) == 20  # rotated: 4 x 5
    assert s["val"].names == ["B"] and len(s["val"].samplers[0].pool.classes) == 6  # never rotated
    flat = oneshot_samplers(chars, ["B"], 4, 1, 2, within_alphabet=False)
    assert len(flat["train"].pool.classes) == 5
    with pytest.raises(InputError, match="not in the background sets"):
        oneshot_samplers(chars, ["Z"], 4, 1, 2)
    with pytest.raises(InputError, match="nothing is left"):
        oneshot_samplers(chars, ["A", "B"], 4, 1, 2)


@pytest.mark.skipif(not REAL.is_dir(), reason="Omniglot's files are not in $METADYN_DATA/omniglot")
def test_real_minimal_sets_and_runs():
    chars = omniglot_characters(str(REAL))
    assert len(chars.names) == 242 and len(set(chars.alphabets)) == 8  # Greek and Latin are in both sets
    runs = omniglot_runs(str(REAL), runs=[1])
    assert runs[0].test_files[0] == "run01/test/item01.png" and runs[0].test_y[0] == 7  # its answer: class08
    assert runs[0].train_ink[0].shape == (105, 105)


def test_a_run_file_pairing_images_of_another_run_or_a_training_image_is_refused(tmp_path):
    """A class_labels.txt line whose answer is another run's training image (or whose test item is a training
    image) gave a "20-way" run with one class swapped for another run's."""
    fake_runs(tmp_path, "runs", runs=2, zipped=False)
    labels = tmp_path / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0].split()[0] + " run02/training/class01.png", *lines[1:]]) + "\n")
    with pytest.raises(InputError, match="must pair a run01/test/ image with a run01/training/ image"):
        omniglot_runs(str(tmp_path), runs=[1])


def test_zip_and_folder_give_the_same_class_order_with_names_that_sort_below_a_slash(tmp_path):
    """Characters were sorted as "alphabet/character" strings in a zip but by path parts in a folder, so alphabets
    named `A` and `A-b` gave other labels (and other train/val/test boundaries) depending on the form on disk."""
    from metadyn.data.fewshot_folders import _omniglot_part

    fake_background(tmp_path / "z", "images_background", {"A": 2, "A-b": 2, "A b": 2})
    fake_background(tmp_path / "f", "images_background", {"A": 2, "A-b": 2, "A b": 2}, zipped=False)
    zipped = [c for c, _ in _omniglot_part("omniglot", tmp_path / "z", "images_background")]
    folder = [c for c, _ in _omniglot_part("omniglot", tmp_path / "f", "images_background")]
    assert zipped == folder and zipped[0].startswith("A/")
