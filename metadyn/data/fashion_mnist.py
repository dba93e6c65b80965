"""The MNIST family's IDX files (Fashion-MNIST, MNIST) from a local folder, with the official train/test split.

Files (``.gz`` as distributed, or unpacked without the suffix), in ``root``:

- ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``: the 60,000 official training images;
- ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``: the 10,000 official test images.

Where they come from: Fashion-MNIST from its authors' repository (github.com/zalandoresearch/fashion-mnist,
folder ``data/fashion``) or Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``, the default ``root`` when that
folder exists); MNIST from yann.lecun.com/exdb/mnist (or its mirrors). metadyn downloads nothing.

The official test file is the ``test`` split (``test_fraction`` is ignored); ``val`` and ``calib`` are
carved from the official training file by the usual seeded, stratified fractions.

IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <type> <ndim>`` (type 0x08: unsigned bytes),
``ndim`` big-endian int32 sizes, then the data. Every file is checked: magic number, sizes against the file's
length, 28x28 images, as many labels as images, labels below the number of classes.

References:
    Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
    Algorithms", arXiv:1708.07747, 2017; LeCun, Bottou, Bengio & Haffner, Proc. IEEE 1998 (MNIST).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from metadyn.data.base import ClassificationData, split_data, split_indices
from metadyn.data.local import MissingDataError, data_root
from metadyn.errors import InputError
from metadyn.registry import DATASETS

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_SYSTEM = ("/usr/share/datasets/fashion-mnist",)  # Debian's dataset-fashion-mnist
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | Path, ndim: int, name: str = "idx") -> np.ndarray:
    """An IDX file of unsigned bytes (``.gz`` or raw) as a ``uint8`` array of ``ndim`` dimensions.

    Raises :class:`InputError` (one line naming the file) for a wrong magic number, a number of dimensions
    other than ``ndim``, or a length that does not match the header's sizes.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"dataset {name!r}: cannot read {str(path)!r} ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise InputError(f"dataset {name!r}: {str(path)!r} is not an IDX file of unsigned bytes with {ndim} "
                         f"dimension(s) (magic 0x{0x800 + ndim:08x}, found {magic})")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise InputError(f"dataset {name!r}: {str(path)!r} is truncated inside its header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - head != int(np.prod(shape)):
        raise InputError(f"dataset {name!r}: {str(path)!r} holds {len(raw) - head} data bytes, its header says "
                         f"{'x'.join(map(str, shape))} = {int(np.prod(shape))}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _find(name: str, base: Path, stem: str) -> Path:
    for candidate in (base / f"{stem}.gz", base / stem):
        if candidate.is_file():
            return candidate
    raise MissingDataError(f"dataset {name!r}: missing file {str(base / stem)}.gz (or unpacked) in {str(base)!r}")


def read_idx_pair(name: str, base: Path, part: str, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``part`` (train / test) as ``(N, 1, 28, 28)`` float32 in [0, 1] and ``(N,)`` int64 labels."""
    img_stem, lab_stem = FILES[part]
    img_path, lab_path = _find(name, base, img_stem), _find(name, base, lab_stem)
    images, labels = read_idx(img_path, 3, name), read_idx(lab_path, 1, name)
    if images.shape[1:] != (28, 28):
        raise InputError(f"dataset {name!r}: {str(img_path)!r} holds {images.shape[1]}x{images.shape[2]} images, "
                         "not 28x28")
    if len(images) != len(labels):
        raise InputError(f"dataset {name!r}: {len(images)} images in {str(img_path)!r} but {len(labels)} labels in "
                         f"{str(lab_path)!r}")
    if len(labels) == 0:
        raise InputError(f"dataset {name!r}: {str(lab_path)!r} holds no samples")
    if int(labels.max()) >= classes:
        raise InputError(f"dataset {name!r}: label {int(labels.max())} in {str(lab_path)!r} is not below {classes}")
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _subset(name: str, x: torch.Tensor, y: torch.Tensor, size: int | None, seed: int, what: str):
    """A seeded, stratified subset of ``size`` samples (all of them when ``size`` is None or not smaller)."""
    if size is None:
        return x, y
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"dataset {name!r}: {what} must be a positive integer or null, got {size!r}")
    if size >= len(y):
        return x, y
    keep = split_indices(y, {"keep": size / len(y)}, seed)["keep"]
    return x[keep], y[keep]


def idx_dataset(name: str, base: Path, *, seed: int, fractions: dict[str, float], class_names: list[str] | None,
                train_size: int | None, test_size: int | None) -> ClassificationData:
    """An MNIST-family set: official train file -> train / val / calib, official test file -> test."""
    classes = 10
    x, y = read_idx_pair(name, base, "train", classes)
    xt, yt = read_idx_pair(name, base, "test", classes)
    x, y = _subset(name, x, y, train_size, seed, "train_size")
    xt, yt = _subset(name, xt, yt, test_size, seed, "test_size")
    return split_data(name, x, y, seed=seed, fractions=fractions, num_classes=classes, test=(xt, yt),
                      class_names=class_names)


@DATASETS.register("fashion_mnist")
def fashion_mnist(*, root: str | None, seed: int, fractions: dict[str, float], train_size: int | None = None,
                  test_size: int | None = None) -> ClassificationData:
    """Fashion-MNIST (10 classes of 28x28 clothing images; 60,000 train / 10,000 test) from its IDX files.

    Args:
        root: the folder with the four IDX files; default ``$METADYN_DATA/fashion-mnist``, else Debian's
            ``/usr/share/datasets/fashion-mnist``.
        train_size, test_size: a seeded stratified subset of the official training / test file (CPU-sized or CI
            runs); ``None`` keeps all of it.
    """
    base = data_root("fashion_mnist", root, "fashion-mnist", FASHION_SYSTEM)
    return idx_dataset("fashion_mnist", base, seed=seed, fractions=fractions, class_names=list(FASHION_CLASSES),
                       train_size=train_size, test_size=test_size)


@DATASETS.register("mnist")
def mnist(*, root: str | None, seed: int, fractions: dict[str, float], train_size: int | None = None,
          test_size: int | None = None) -> ClassificationData:
    """MNIST (handwritten digits, 60,000 train / 10,000 test) from its IDX files; default root
    ``$METADYN_DATA/mnist``. Options as for ``fashion_mnist``."""
    base = data_root("mnist", root, "mnist")
    return idx_dataset("mnist", base, seed=seed, fractions=fractions, class_names=[str(d) for d in range(10)],
                       train_size=train_size, test_size=test_size)
