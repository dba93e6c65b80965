"""`metadyn data prepare`: downloaded files, found anywhere under a folder, checked, copied into place; the
loaders then read them from $METADYN_DATA; bad or missing files are one line, exit 2, nothing half-copied."""

import os

import pytest
from test_fashion_mnist import _fake
from test_omniglot_oneshot import fake_background, fake_runs

from metadyn.cli import main
from metadyn.data import load_classification
from metadyn.data.fewshot_folders import omniglot_characters, omniglot_runs
from metadyn.data.prepare import prepare, status


def test_fashion_mnist_from_a_downloads_folder_to_a_loadable_root(tmp_path, monkeypatch, capsys):
    downloads = tmp_path / "Downloads" / "fashion" / "data"  # nested, as an unpacked repository leaves them
    _fake(downloads)
    (tmp_path / "Downloads" / "notes.txt").write_text("unrelated")
    monkeypatch.setenv("METADYN_DATA", str(tmp_path / "data"))
    assert main(["data", "prepare", "fashion_mnist", "--from", str(tmp_path / "Downloads")]) == 0
    assert "copied" in capsys.readouterr().out
    ready = sorted(os.listdir(tmp_path / "data" / "fashion-mnist"))
    assert ready == sorted(f"{s}.gz" for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    data = load_classification("fashion_mnist", seed=0, root=None)  # found through $METADYN_DATA
    assert len(data.test.y) == 20
    assert main(["data", "prepare", "fashion_mnist", "--from", str(tmp_path / "Downloads")]) == 0  # idempotent
    assert capsys.readouterr().out.count("already there") == 4
    assert dict((n, s) for n, _, s in status())["fashion_mnist"] == "ready"


def test_omniglot_minimal_sets_and_runs(tmp_path, monkeypatch):
    fake_background(tmp_path / "dl", "images_background_small1", {"Latin": 3})
    fake_background(tmp_path / "dl", "images_background_small2", {"Greek": 3}, first=3)
    fake_runs(tmp_path / "dl" / "runs", "one_shot_runs_01-10")
    done = prepare("omniglot", tmp_path / "dl", to=str(tmp_path / "data"))
    assert [p.name for p, _ in done] == ["images_background_small1.zip", "images_background_small2.zip",
                                         "one_shot_runs_01-10.zip"]
    monkeypatch.setenv("METADYN_DATA", str(tmp_path / "data"))
    assert sorted(set(omniglot_characters(None).alphabets)) == ["Greek", "Latin"]
    assert len(omniglot_runs(None)) == 2


def test_missing_damaged_or_conflicting_files_are_one_line_and_copy_nothing(tmp_path, capsys):
    fake_background(tmp_path / "dl", "images_background_small1", {"Latin": 2})
    assert main(["data", "prepare", "omniglot", "--from", str(tmp_path / "dl"), "--to", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images_background_small2.zip" in err and "github.com/brendenlake" in err
    assert not (tmp_path / "d").exists()

    _fake(tmp_path / "fm")
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    assert main(["data", "prepare", "fashion_mnist", "--from", str(tmp_path / "fm"), "--to", str(tmp_path / "d")]) == 2
    assert "t10k-labels-idx1-ubyte.gz" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # every file is checked before any is copied

    _fake(tmp_path / "fm2", seed=1)
    _fake(tmp_path / "fm3", seed=2)
    assert main(["data", "prepare", "fashion_mnist", "--from", str(tmp_path / "fm2"), "--to", str(tmp_path / "d")]) == 0
    before = (tmp_path / "d" / "fashion-mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    assert main(["data", "prepare", "fashion_mnist", "--from", str(tmp_path / "fm3"), "--to", str(tmp_path / "d")]) == 2
    assert "exists with other contents" in capsys.readouterr().err
    assert (tmp_path / "d" / "fashion-mnist" / "train-images-idx3-ubyte.gz").read_bytes() == before


@pytest.mark.parametrize("argv,match", [
    (["data", "prepare", "cifar7", "--from", "."], "unknown data set 'cifar7'"),
    (["data", "prepare", "mnist", "--from", "/no/such/folder", "--to", "/tmp"], "is not a folder"),
])
def test_bad_arguments(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_without_a_destination(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("METADYN_DATA", raising=False)
    _fake(tmp_path)
    assert main(["data", "prepare", "mnist", "--from", str(tmp_path)]) == 2
    assert "give --to ROOT, or set $METADYN_DATA" in capsys.readouterr().err


def test_mnist_family_files_come_from_one_folder_read_as_the_loader_reads_them(tmp_path, capsys):
    """MNIST and Fashion-MNIST share their file names: `prepare` took each file alone from anywhere under --from (a
    Downloads folder with both gave Fashion's files for `mnist`, or images of one and labels of the other), copied
    a set whose label count differs from its image count, and reported "copied" for unpacked files that the loader
    ignored (it reads an older .gz of the same name first)."""
    import shutil

    _fake(tmp_path / "dl" / "fashion", seed=1)
    _fake(tmp_path / "dl" / "mnist", seed=2, gz=False)
    assert main(["data", "prepare", "mnist", "--from", str(tmp_path / "dl"), "--to", str(tmp_path / "d")]) == 2
    assert "several folders" in capsys.readouterr().err and not (tmp_path / "d").exists()

    (tmp_path / "mix" / "a").mkdir(parents=True)  # images in one folder, labels in another: no complete folder
    _fake(tmp_path / "mix" / "b", seed=2)
    for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.move(tmp_path / "mix" / "b" / f, tmp_path / "mix" / "a" / f)
    assert main(["data", "prepare", "mnist", "--from", str(tmp_path / "mix"), "--to", str(tmp_path / "d")]) == 2
    assert "no folder under" in capsys.readouterr().err and not (tmp_path / "d").exists()

    _fake(tmp_path / "bad", seed=3)
    shutil.copy(tmp_path / "bad" / "t10k-labels-idx1-ubyte.gz", tmp_path / "bad" / "train-labels-idx1-ubyte.gz")
    assert main(["data", "prepare", "mnist", "--from", str(tmp_path / "bad"), "--to", str(tmp_path / "d")]) == 2
    assert "60 images" in capsys.readouterr().err and not (tmp_path / "d").exists()

    assert main(["data", "prepare", "mnist", "--from", str(tmp_path / "dl" / "fashion"), "--to", str(tmp_path / "d")]) \
        == 0
    capsys.readouterr()
    assert main(["data", "prepare", "mnist", "--from", str(tmp_path / "dl" / "mnist"), "--to", str(tmp_path / "d")]) \
        == 2  # unpacked files beside the .gz ones the loader would keep reading
    assert "reads the .gz form first" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "d" / "mnist")) == sorted(f"{s}.gz" for s in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def test_omniglot_zips_must_hold_what_their_names_say(tmp_path, capsys):
    """A zip of the right name holding a text file, or small1's zip renamed, was copied with exit 0."""
    import zipfile

    fake_background(tmp_path / "dl", "images_background_small1", {"Latin": 3})
    fake_background(tmp_path / "dl", "images_background_small2", {"Greek": 3}, first=3)
    fake_runs(tmp_path / "dl" / "runs", "one_shot_runs_01-10")
    small2 = tmp_path / "dl" / "images_background_small2.zip"
    small2.unlink()
    with zipfile.ZipFile(small2, "w") as zf:
        zf.writestr("readme.txt", "not images")
    assert main(["data", "prepare", "omniglot", "--from", str(tmp_path / "dl"), "--to", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "images_background_small2/<alphabet>/<character>/*.png" in err
    assert not (tmp_path / "d").exists()
