"""Readers of datasets in a user's local folder: class-per-subfolder image trees and CIFAR binaries.

Nothing is ever downloaded: ``root`` must already hold the files in their official layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from metadyn.data.base import ClassificationData, split_data
from metadyn.errors import InputError
from metadyn.registry import DATASETS

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _require_root(name: str, root: str | None) -> Path:
    if root is None:
        raise InputError(f"dataset {name!r} needs a root folder (root=...); metadyn downloads nothing")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise InputError(f"dataset {name!r}: root folder {str(path)!r} does not exist")
    return path


def _class_dirs(name: str, root: Path, depth: int) -> list[tuple[str, list[Path]]]:
    """``(class name, sorted image files)`` per class folder ``depth`` levels below ``root``, by name."""
    dirs = [root]
    for _ in range(depth):
        dirs = sorted(
            d for parent in dirs for d in parent.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
    classes = []
    for d in dirs:
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            classes.append((d.relative_to(root).as_posix(), files))
    if not classes:
        raise InputError(
            f"dataset {name!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
            f"{depth} level(s) below {str(root)!r} (expected root/<class>/<image>)"
        )
    if len(classes) < 2:
        raise InputError(f"dataset {name!r}: only one class folder ({classes[0][0]!r}) under {str(root)!r}")
    return classes


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG, TIFF): values 0..65535


def _read_image(name: str, path: Path, size: int | None, grayscale: bool) -> np.ndarray:
    """One image as ``(C, H, W)`` float32 in [0, 1]: 8-bit modes divided by 255, 16-bit grayscale by 65535.

    Modes with no fixed range (32-bit integers ``I``, floats ``F``) are refused, as are images whose header
    claims more pixels than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``); any file PIL
    cannot decode is a one-line :class:`InputError` naming it.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode in ("I", "F"):
                    raise InputError(f"dataset {name!r}: image {str(path)!r} has mode {im.mode!r} (32-bit values "
                                     "with no fixed range); save it with 8 or 16 bits per channel")
                scale = 255.0
                if im.mode in SIXTEEN_BIT_MODES:
                    im, scale = im.convert("F"), 65535.0  # exact: float32 holds every 16-bit value
                else:
                    im = im.convert("L" if grayscale else "RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / scale
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"dataset {name!r}: image {str(path)!r} claims more than {Image.MAX_IMAGE_PIXELS} "
                         "pixels (a decompression bomb?); refused") from None
    except Exception as e:  # noqa: BLE001 - any decoder error of an untrusted file
        detail = " ".join(str(e).split())[:100] or type(e).__name__
        raise InputError(f"dataset {name!r}: cannot read image {str(path)!r} ({detail})") from None
    if a.ndim == 3:
        return a.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    return np.repeat(a[None], 1 if grayscale else 3, axis=0)  # (H, W) -> (1 | 3, H, W); 16-bit gray as RGB


@DATASETS.register("folder")
def folder(
    *,
    root: str | None,
    seed: int,
    fractions: dict[str, float],
    size: int | None = 28,
    grayscale: bool = True,
    invert: bool = False,
    depth: int = 1,
) -> ClassificationData:
    """A class-per-subfolder image tree ``root/<class>/<image>.png|jpg|...``, classes sorted by name.

    Args:
        size: resize every image to ``size x size``; ``None`` keeps the files' size (all must agree).
        grayscale: one channel; otherwise RGB.
        invert: ``1 - x``, e.g. for Omniglot's black strokes on white so that ink is 1 as in glyphs.
        depth: how many folder levels name a class: 2 for Omniglot's ``<alphabet>/<character>/``,
            whose class names are then ``"alphabet/character"``.
    """
    path = _require_root("folder", root)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096):
        raise InputError(f"dataset 'folder': size must be an integer in 1..4096 or None, got {str(size)[:40]}")
    if not isinstance(depth, int) or depth < 1:
        raise InputError(f"dataset 'folder': depth must be a positive integer, got {depth!r}")
    classes = _class_dirs("folder", path, depth)
    images, labels = [], []
    for label, (_, files) in enumerate(classes):
        for f in files:
            images.append(_read_image("folder", f, size, grayscale))
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise InputError(
            f"dataset 'folder': images under {str(path)!r} differ in shape {sorted(shapes)}; set size"
        )
    x = torch.from_numpy(np.stack(images))  # (N, C, H, W)
    if invert:
        x = 1.0 - x
    y = torch.tensor(labels, dtype=torch.long)
    names = [c for c, _ in classes]
    return split_data(
        "folder", x, y, seed=seed, fractions=fractions, num_classes=len(classes), class_names=names
    )


def _read_records(name: str, path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR binary records: ``label_bytes`` label bytes then 3072 bytes of a 3x32x32 CHW image."""
    if not path.is_file():
        raise InputError(f"dataset {name!r}: missing file {str(path)!r}")
    rec = label_bytes + 3 * 32 * 32
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % rec:
        raise InputError(
            f"dataset {name!r}: {str(path)!r} has {raw.size} bytes, not a whole number of {rec}-byte records"
        )
    raw = raw.reshape(-1, rec)  # (N, label_bytes + 3072)
    return raw[:, :label_bytes].astype(np.int64), raw[:, label_bytes:].reshape(-1, 3, 32, 32)


def _cifar_root(name: str, root: str | None, folder_name: str, pickled: str) -> Path:
    path = _require_root(name, root)
    if path.name == folder_name:  # the user pointed at the inner folder itself
        path = path.parent
    if not (path / folder_name).is_dir():
        if (path / pickled).is_dir() or path.name == pickled:
            raise InputError(
                f"dataset {name!r}: {str(path)!r} holds the pickled python version ({pickled}); "
                f"metadyn reads the binary version ({folder_name}) to avoid unpickling untrusted files"
            )
        raise InputError(f"dataset {name!r}: no folder {folder_name!r} under {str(path)!r}")
    return path / folder_name


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).float().div_(255.0)  # (N, 3, 32, 32) in [0, 1]


def _check_labels(name: str, y: np.ndarray, n: int, path: Path) -> None:
    if y.size and int(y.max()) >= n:
        raise InputError(f"dataset {name!r}: label {int(y.max())} in {str(path)!r} is not below {n}")


@DATASETS.register("cifar10")
def cifar10(*, root: str | None, seed: int, fractions: dict[str, float]) -> ClassificationData:
    """CIFAR-10 from the binary layout ``root/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin``.

    The official test file is the test split; val and calib are carved from the training files
    (stratified), so ``test_fraction`` is ignored.

    References:
        Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
    """
    base = _cifar_root("cifar10", root, "cifar-10-batches-bin", "cifar-10-batches-py")
    parts = [_read_records("cifar10", base / f"data_batch_{i}.bin", 1) for i in range(1, 6)]
    y_tr = np.concatenate([p[0][:, 0] for p in parts])
    x_tr = np.concatenate([p[1] for p in parts])
    y_te, x_te = _read_records("cifar10", base / "test_batch.bin", 1)
    y_te = y_te[:, 0]
    for y, f in ((y_tr, base / "data_batch_*.bin"), (y_te, base / "test_batch.bin")):
        _check_labels("cifar10", y, 10, f)
    test = (_to_float(x_te), torch.from_numpy(y_te))
    x, y = _to_float(x_tr), torch.from_numpy(y_tr)
    return split_data(
        "cifar10",
        x,
        y,
        seed=seed,
        fractions=fractions,
        num_classes=10,
        test=test,
        class_names=list(CIFAR10_CLASSES),
    )


@DATASETS.register("cifar100")
def cifar100(
    *, root: str | None, seed: int, fractions: dict[str, float], labels: str = "fine"
) -> ClassificationData:
    """CIFAR-100 from the binary layout ``root/cifar-100-binary/{train,test}.bin``.

    Args:
        labels: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    References:
        Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009.
    """
    if labels not in ("fine", "coarse"):
        raise InputError(f"dataset 'cifar100': labels must be 'fine' or 'coarse', got {labels!r}")
    col, n = (1, 100) if labels == "fine" else (0, 20)
    base = _cifar_root("cifar100", root, "cifar-100-binary", "cifar-100-python")
    lab_tr, x_tr = _read_records("cifar100", base / "train.bin", 2)
    lab_te, x_te = _read_records("cifar100", base / "test.bin", 2)
    y_tr, y_te = lab_tr[:, col], lab_te[:, col]
    _check_labels("cifar100", y_tr, n, base / "train.bin")
    _check_labels("cifar100", y_te, n, base / "test.bin")
    test = (_to_float(x_te), torch.from_numpy(y_te))
    return split_data(
        "cifar100",
        _to_float(x_tr),
        torch.from_numpy(y_tr),
        seed=seed,
        fractions=fractions,
        num_classes=n,
        test=test,
    )
