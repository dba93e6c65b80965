"""MNIST-family IDX reader: the official split, file checks, where the files are found (fake IDX files; the real
Fashion-MNIST files are checked when Debian's dataset-fashion-mnist is installed)."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from metadyn.data import MissingDataError, load_classification
from metadyn.data.fashion_mnist import FASHION_CLASSES, FASHION_SYSTEM, read_idx
from metadyn.errors import InputError

REAL = Path(FASHION_SYSTEM[0])


def _idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = True) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x800 + array.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _fake(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    parts = {"train": n_train, "t10k": n_test}
    out = {}
    for part, n in parts.items():
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        _idx(root / f"{part}-images-idx3-ubyte", x, gz=gz)
        _idx(root / f"{part}-labels-idx1-ubyte", y, gz=gz)
        out[part] = (x, y)
    return out


def test_official_test_file_is_the_test_split_and_val_calib_come_from_train(tmp_path):
    raw = _fake(tmp_path)
    data = load_classification("fashion_mnist", root=str(tmp_path), seed=0)
    assert (len(data.train), len(data.val), len(data.calib), len(data.test)) == (48, 6, 6, 20)
    x_te, y_te = raw["t10k"]
    assert torch.equal(data.test.y, torch.from_numpy(y_te.astype(np.int64)))
    assert torch.allclose(data.test.x[:, 0], torch.from_numpy(x_te.astype(np.float32) / 255))
    assert data.in_shape == (1, 28, 28) and data.num_classes == 10 and data.class_names == FASHION_CLASSES
    # val and calib are stratified (6 of 60, one per class and 10 classes: 6 distinct labels) and disjoint from train
    train_rows = {r.numpy().tobytes() for r in data.train.x}
    assert not any(r.numpy().tobytes() in train_rows for r in torch.cat([data.val.x, data.calib.x]))
    assert len(set(data.val.y.tolist())) == 6
    again = load_classification("fashion_mnist", root=str(tmp_path), seed=0)
    assert torch.equal(again.val.x, data.val.x)
    other = load_classification("fashion_mnist", root=str(tmp_path), seed=1)
    assert not torch.equal(other.val.x, data.val.x) and torch.equal(other.test.x, data.test.x)


def test_unpacked_files_and_the_mnist_loader_read_the_same_layout(tmp_path):
    raw = _fake(tmp_path, gz=False)
    data = load_classification("mnist", root=str(tmp_path), seed=0)
    assert len(data.test) == 20 and torch.equal(data.test.y, torch.from_numpy(raw["t10k"][1].astype(np.int64)))
    assert data.class_names == [str(d) for d in range(10)]


def test_stratified_subsets_of_the_official_files(tmp_path):
    _fake(tmp_path, n_train=200, n_test=100)
    data = load_classification("fashion_mnist", root=str(tmp_path), seed=0, train_size=100, test_size=50)
    assert len(data.train) + len(data.val) + len(data.calib) == 100 and len(data.test) == 50
    assert torch.bincount(data.test.y).tolist() == [5] * 10
    with pytest.raises(InputError, match="train_size must be a positive integer"):
        load_classification("fashion_mnist", root=str(tmp_path), train_size=0)


@pytest.mark.parametrize("damage, match", [
    ("magic", "not an IDX file"), ("truncate", "its header says"), ("count", "but 59 labels"),
    ("label", "label 10"), ("shape", "not 28x28"), ("gzip", "cannot read"),
])
def test_damaged_files_are_one_line_input_errors(tmp_path, damage, match):
    _fake(tmp_path)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    if damage == "magic":
        _idx(images, np.zeros((60, 28, 28)), magic=0x0801 + 0x100)
    elif damage == "truncate":
        gz = images.with_name(images.name + ".gz")
        gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes())[:-5]))
    elif damage == "count":
        _idx(labels, np.arange(59) % 10)
    elif damage == "label":
        _idx(labels, np.full(60, 10))
    elif damage == "shape":
        _idx(images, np.zeros((60, 27, 28)))
    else:
        images.with_name(images.name + ".gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=match) as err:
        load_classification("fashion_mnist", root=str(tmp_path))
    assert not isinstance(err.value, MissingDataError) and "\n" not in str(err.value)


def test_missing_folder_or_file_is_missing_data(tmp_path, monkeypatch):
    with pytest.raises(MissingDataError, match="does not exist"):
        load_classification("fashion_mnist", root=str(tmp_path / "nowhere"))
    _fake(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingDataError, match="t10k-labels-idx1-ubyte"):
        load_classification("fashion_mnist", root=str(tmp_path))
    monkeypatch.delenv("METADYN_DATA", raising=False)
    with pytest.raises(MissingDataError, match="METADYN_DATA"):
        load_classification("mnist")  # no root, no $METADYN_DATA, no system location


def test_root_defaults_to_metadyn_data(tmp_path, monkeypatch):
    _fake(tmp_path / "fashion-mnist", n_train=30, n_test=10)
    monkeypatch.setenv("METADYN_DATA", str(tmp_path))
    assert len(load_classification("fashion_mnist", seed=0).test) == 10


@pytest.mark.skipif(not REAL.is_dir(), reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_file():
    y = read_idx(REAL / "t10k-labels-idx1-ubyte.gz", 1, "fashion_mnist")
    x = read_idx(REAL / "t10k-images-idx3-ubyte.gz", 3, "fashion_mnist")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    assert y[:3].tolist() == [9, 2, 1]  # ankle boot, pullover, trouser (the data set's first test images)
