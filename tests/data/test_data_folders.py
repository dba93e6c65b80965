import numpy as np
import pytest
import torch
from PIL import Image

from metadyn.data import load_classification
from metadyn.errors import InputError


def _make_tree(root, classes=("bee", "ant", "cat"), per_class=10, size=12):
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            a = np.full((size, size, 3), 20 * k, dtype=np.uint8)
            a[j % size] = rng.integers(0, 255, (size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{j}.{'png' if j % 2 else 'jpg'}")
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_folder_loads_sorted_classes(tmp_path):
    _make_tree(tmp_path)
    data = load_classification("folder", root=str(tmp_path), size=8, seed=0)
    assert data.num_classes == 3 and data.class_names == ["ant", "bee", "cat"]
    assert data.in_shape == (1, 8, 8)
    assert sum(len(data.split(s)) for s in ("train", "val", "calib", "test")) == 30
    assert (
        data.train.x.dtype == torch.float32
        and 0 <= float(data.train.x.min()) <= float(data.train.x.max()) <= 1
    )
    rgb = load_classification("folder", root=str(tmp_path), size=None, grayscale=False)
    assert rgb.in_shape == (3, 12, 12)


def test_folder_nested_classes_and_invert(tmp_path):
    _make_tree(tmp_path / "latin", classes=("a", "b"), per_class=6)
    _make_tree(tmp_path / "greek", classes=("alpha", "beta"), per_class=6)
    data = load_classification("folder", root=str(tmp_path), depth=2, invert=True, size=12)
    assert data.class_names == ["greek/alpha", "greek/beta", "latin/a", "latin/b"]
    assert float(data.train.x.max()) == 1.0  # the black (0) backgrounds became 1


def test_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match="nowhere"):
        load_classification("folder", root=str(missing))
    with pytest.raises(InputError, match="needs a root"):
        load_classification("folder")
    with pytest.raises(InputError, match="no images"):
        load_classification("folder", root=str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    (tmp_path / "b").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "b" / "y.png")
    with pytest.raises(InputError, match="cannot read image .*x.png"):
        load_classification("folder", root=str(tmp_path))


def _cifar_records(n, label_bytes, n_classes, rng):
    labels = rng.integers(0, n_classes, (n, label_bytes), dtype=np.uint8)
    images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, images], axis=1), labels, images


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-bin"
    base.mkdir()
    for i in range(1, 6):
        rec = _cifar_records(20, 1, 10, rng)[0]
        rec[:, 0] = np.arange(20) % 10  # every class in every batch
        rec.tofile(base / f"data_batch_{i}.bin")
    test, labels, images = _cifar_records(7, 1, 10, rng)
    test.tofile(base / "test_batch.bin")
    data = load_classification("cifar10", root=str(tmp_path), seed=0)
    assert data.num_classes == 10 and data.in_shape == (3, 32, 32)
    assert len(data.train) + len(data.val) + len(data.calib) == 100
    assert len(data.val) == 10 and len(data.calib) == 10  # stratified: one per class
    assert sorted(data.val.y.tolist()) == list(range(10))
    assert torch.equal(data.test.y, torch.from_numpy(labels[:, 0].astype(np.int64)))
    expect = torch.from_numpy(images.reshape(7, 3, 32, 32)).float() / 255  # CHW order
    assert torch.equal(data.test.x, expect)
    assert data.class_names[0] == "airplane"
    # truncated file
    test[:, :].tofile(base / "test_batch.bin")
    with open(base / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(InputError, match="test_batch.bin"):
        load_classification("cifar10", root=str(tmp_path))
    (base / "data_batch_3.bin").unlink()
    with pytest.raises(InputError, match="data_batch_3.bin"):
        load_classification("cifar10", root=str(tmp_path))


def test_cifar100_binary_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "cifar-100-binary"
    base.mkdir()
    train = _cifar_records(400, 2, 20, rng)[0]
    train[:, 1] = np.arange(400) % 100
    train.tofile(base / "train.bin")
    _cifar_records(5, 2, 20, rng)[0].tofile(base / "test.bin")
    fine = load_classification("cifar100", root=str(base), val_fraction=0.25, calib_fraction=0.25)
    assert fine.num_classes == 100 and len(fine.test) == 5
    assert sorted(fine.val.y.tolist()) == list(range(100))
    coarse = load_classification("cifar100", root=str(tmp_path), labels="coarse")
    assert coarse.num_classes == 20 and int(coarse.train.y.max()) < 20
    with pytest.raises(InputError, match="'fine' or 'coarse'"):
        load_classification("cifar100", root=str(tmp_path), labels="medium")


@pytest.mark.parametrize(
    "name, pickled", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_pickled_layout_is_refused_helpfully(tmp_path, name, pickled):
    (tmp_path / pickled).mkdir()
    (tmp_path / pickled / "data_batch_1").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="reads the binary version .* avoid unpickling"):
        load_classification(name, root=str(tmp_path))
    with pytest.raises(InputError, match=str(tmp_path / "missing")):
        load_classification(name, root=str(tmp_path / "missing"))
