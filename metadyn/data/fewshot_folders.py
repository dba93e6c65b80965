"""Few-shot class pools from local folders in the official layouts of Omniglot, miniImageNet and
CIFAR-FS, and from the bundled ``digits`` and procedural ``glyphs``: one :class:`ClassPool` per
meta-split (train / val / test classes, disjoint). Nothing is downloaded.

Layouts (``root`` is the folder holding them):

- Omniglot (Lake et al.): ``images_background/<alphabet>/<character>/*.png`` and
  ``images_evaluation/...``; the 1623 characters, background first, sorted, are split 1100 / 100 /
  423 as in learn2learn's benchmark; ink is made 1 (the files draw black on white); ``rotations: true``
  adds each character's 90/180/270-degree rotations as new classes.
- miniImageNet (Ravi & Larochelle's split): ``images/*.jpg`` with ``train.csv``, ``val.csv``,
  ``test.csv`` (``filename,label``), or ``train|val|test/<wnid>/*.jpg``.
- CIFAR-FS (Bertinetto et al.): ``data/<class>/*.png`` with ``splits/bertinetto/{train,val,test}.txt``,
  or ``train|val|test/<class>/*.png``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from metadyn.data.episodes import ClassPool
from metadyn.data.folders import IMAGE_EXTENSIONS, _class_dirs, _read_image, _require_root
from metadyn.errors import InputError

SPLITS = ("train", "val", "test")
OMNIGLOT_SPLIT = (1100, 100)  # train, val; the rest is test


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} of {name!r}; choose from: {', '.join(SPLITS)}")


def _pool(name: str, classes: list[list[Path]], size: int | None, grayscale: bool, invert: bool = False) -> ClassPool:
    images, labels = [], []
    for label, files in enumerate(classes):
        for f in files:
            images.append(_read_image(name, f, size, grayscale))
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise InputError(f"dataset {name!r}: images differ in shape {sorted(shapes)}; set size")
    x = torch.from_numpy(np.stack(images))  # (N, C, H, W)
    return ClassPool(1.0 - x if invert else x, torch.tensor(labels))


def _split_folders(name: str, root: Path, split: str) -> list[list[Path]] | None:
    """``root/<split>/<class>/<image>`` if that layout is there."""
    if not (root / split).is_dir():
        return None
    return [files for _, files in _class_dirs(name, root / split, 1)]


def omniglot(root: str | None, split: str, size: int | None = 28, rotations: bool = False) -> ClassPool:
    """Omniglot characters of a meta-split (1100 / 100 / 423 classes); 28x28 by default, ink = 1.

    ``rotations``: every character also rotated by 90, 180 and 270 degrees, each a new class
    (:meth:`~metadyn.data.episodes.ClassPool.with_rotations`, as in Vinyals et al. and MAML), in every split.
    """
    if not isinstance(rotations, bool):
        raise InputError(f"dataset 'omniglot': rotations must be true or false, got {rotations!r}")
    _check_split("omniglot", split)
    path = _require_root("omniglot", root)
    parts = [path / p for p in ("images_background", "images_evaluation") if (path / p).is_dir()]
    if not parts:
        raise InputError(f"dataset 'omniglot': no images_background/ or images_evaluation/ under {str(path)!r}")
    classes = [files for part in parts for _, files in _class_dirs("omniglot", part, 2)]
    n_train, n_val = OMNIGLOT_SPLIT
    if len(classes) < n_train + n_val + 1:  # a small tree (tests, subsets): same proportions
        n_train, n_val = max(1, len(classes) * 2 // 3), max(1, len(classes) // 6)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(classes))}
    lo, hi = bounds[split]
    pool = _pool("omniglot", classes[lo:hi], size, grayscale=True, invert=True)
    return pool.with_rotations() if rotations else pool


def miniimagenet(root: str | None, split: str, size: int | None = 84) -> ClassPool:
    """miniImageNet classes of a meta-split (64 / 16 / 20 classes of 600 RGB images)."""
    _check_split("miniimagenet", split)
    path = _require_root("miniimagenet", root)
    classes = _split_folders("miniimagenet", path, split)
    if classes is None:
        table = path / f"{split}.csv"
        if not table.is_file():
            raise InputError(f"dataset 'miniimagenet': neither {split}/ nor {split}.csv under {str(path)!r}")
        by_label: dict[str, list[Path]] = {}
        with table.open(newline="") as f:
            for row in csv.DictReader(f):
                if "filename" not in row or "label" not in row:
                    raise InputError(f"dataset 'miniimagenet': {table} must have columns filename,label")
                by_label.setdefault(row["label"], []).append(path / "images" / row["filename"])
        classes = [sorted(by_label[k]) for k in sorted(by_label)]
    return _pool("miniimagenet", classes, size, grayscale=False)


def cifar_fs(root: str | None, split: str, size: int | None = 32) -> ClassPool:
    """CIFAR-FS classes of a meta-split (64 / 16 / 20 CIFAR-100 classes of 600 images)."""
    _check_split("cifar_fs", split)
    path = _require_root("cifar_fs", root)
    classes = _split_folders("cifar_fs", path, split)
    if classes is None:
        listing = path / "splits" / "bertinetto" / f"{split}.txt"
        if not listing.is_file():
            raise InputError(f"dataset 'cifar_fs': neither {split}/ nor splits/bertinetto/{split}.txt under "
                             f"{str(path)!r}")
        classes = []
        for name in (ln.strip() for ln in listing.read_text().splitlines()):
            if name:
                folder = path / "data" / name
                if not folder.is_dir():
                    raise InputError(f"dataset 'cifar_fs': class folder {str(folder)!r} is missing")
                classes.append(sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS))
    return _pool("cifar_fs", classes, size, grayscale=False)
