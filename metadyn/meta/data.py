"""Few-shot class pools by name: one :class:`~metadyn.data.ClassPool` per meta-split, classes disjoint.

``glyphs`` (procedural, 400 / 100 / 100 classes), ``digits`` (scikit-learn's, classes 0-3 / 4-6 /
7-9: at most 3-way episodes outside training) and the local folders of
:mod:`metadyn.data.fewshot_folders` (``omniglot``, ``miniimagenet``, ``cifar_fs``).
"""

from __future__ import annotations

from metadyn.config import checked_call
from metadyn.data import fewshot_folders
from metadyn.data.episodes import ClassPool
from metadyn.errors import InputError

DIGIT_SPLITS = {"train": range(0, 4), "val": range(4, 7), "test": range(7, 10)}


def _glyphs(split: str, samples_per_class: int = 20, size: int = 28, glyph_seed: int = 0) -> ClassPool:
    return ClassPool.from_glyphs(split, samples_per_class=samples_per_class, seed=glyph_seed, size=size)


def _digits(split: str) -> ClassPool:
    import torch

    from metadyn.data.digits import _raw_digits

    if split not in DIGIT_SPLITS:
        raise InputError(f"unknown split {split!r} of 'digits'; choose from: train, val, test")
    x, y = _raw_digits()
    x, y = torch.from_numpy(x).reshape(-1, 1, 8, 8) / 16.0, torch.from_numpy(y)
    keep = (y >= DIGIT_SPLITS[split].start) & (y < DIGIT_SPLITS[split].stop)
    return ClassPool(x[keep], y[keep])


FEWSHOT_SETS = {"glyphs": _glyphs, "digits": _digits, "omniglot": fewshot_folders.omniglot,
                "miniimagenet": fewshot_folders.miniimagenet, "cifar_fs": fewshot_folders.cifar_fs}
_NEEDS_ROOT = ("omniglot", "miniimagenet", "cifar_fs")


def fewshot_pool(name: str, split: str, root: str | None = None, **options) -> ClassPool:
    """The pool of meta-split ``split`` (train / val / test) of few-shot set ``name``.

    Example::

        pool = fewshot_pool("glyphs", "test", samples_per_class=20)
        pool = fewshot_pool("omniglot", "train", root="~/data/omniglot", size=28)
    """
    if name not in FEWSHOT_SETS:
        raise InputError(f"unknown few-shot dataset {name!r}; choose from: {', '.join(FEWSHOT_SETS)}")
    if name in _NEEDS_ROOT:
        return checked_call(FEWSHOT_SETS[name], options, "data.options", root=root, split=split)
    if root is not None:
        raise InputError(f"few-shot dataset {name!r} takes no root (got root={root!r})")
    return checked_call(FEWSHOT_SETS[name], options, "data.options", split=split)
