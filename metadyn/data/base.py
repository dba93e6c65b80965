"""Classification data containers, stratified splits and the dataset entry point.

Every classification loader returns a :class:`ClassificationData` with four disjoint splits:
``train`` (fit the network), ``val`` (fit early-exit thresholds), ``calib`` (fit temperature scaling)
and ``test`` (final evaluation only).
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from metadyn.errors import InputError
from metadyn.registry import DATASETS

SPLIT_NAMES = ("train", "val", "calib", "test")

# Arguments every loader receives from :func:`load_classification`; anything else is a dataset option.
_COMMON_ARGS = ("root", "seed", "fractions")


@dataclass
class Split:
    """One split of a classification set.

    Attributes:
        x: ``(N, C, H, W)`` float32 images.
        y: ``(N,)`` int64 labels in ``0..num_classes-1``.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise InputError(f"split images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or len(self.y) != len(self.x):
            raise InputError(f"split labels must be ({len(self.x)},), got shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class ClassificationData:
    """A classification set split into disjoint train / val / calib / test parts.

    ``val`` is for fitting early-exit thresholds, ``calib`` for temperature scaling, ``test`` only for
    the final evaluation.
    """

    name: str
    train: Split
    val: Split
    calib: Split
    test: Split
    num_classes: int
    in_shape: tuple[int, int, int]  # (C, H, W)
    class_names: list[str] | None = None  # label -> name, where the dataset knows them

    def split(self, name: str) -> Split:
        """The split called ``name`` (one of train, val, calib, test)."""
        if name not in SPLIT_NAMES:
            raise InputError(
                f"unknown split {name!r} of dataset {self.name!r}; choose from: {', '.join(SPLIT_NAMES)}"
            )
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s))}" for s in SPLIT_NAMES)
        shape = f"num_classes={self.num_classes}, in_shape={self.in_shape}"
        return f"ClassificationData({self.name!r}, {sizes}, {shape})"


def check_finite(x: Tensor | np.ndarray, what: str) -> None:
    """Raise :class:`InputError` if ``x`` holds a NaN or an infinite value; ``what`` names the dataset."""
    bad = ~torch.isfinite(torch.as_tensor(x))
    if bool(bad.any()):
        raise InputError(
            f"dataset {what!r} contains NaN or infinite values ({int(bad.sum())} of {bad.numel()})"
        )


def split_indices(y: Tensor | np.ndarray, fractions: dict[str, float], seed: int = 0) -> dict[str, Tensor]:
    """Stratified, seeded split of sample indices: each class is divided in the given fractions.

    Args:
        y: ``(N,)`` integer labels.
        fractions: split name -> fraction of every class, each in (0, 1), summing to less than 1;
            ``"train"`` takes the rest and must not be given.
        seed: the same ``(y, fractions, seed)`` always gives the same split.

    Returns:
        ``{"train": idx, **{name: idx}}``: sorted int64 index tensors, disjoint, covering ``0..N-1``.
    """
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).long().flatten().cpu()
    if "train" in fractions:
        raise InputError("split fraction 'train' cannot be given: train takes what the other splits leave")
    for name, f in fractions.items():
        if not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
            raise InputError(f"split fraction {name!r} must be in (0, 1), got {f!r}")
    total = float(sum(fractions.values()))
    if total >= 1.0:
        raise InputError(
            f"split fractions {dict(fractions)} sum to {total:g}; they must leave something for train"
        )

    # Every sample gets its quantile q = (rank + 1/2) / n_c within its class under a seeded shuffle;
    # ranking all samples by q (ties between classes broken at random) and cutting
    # the ranking at the cumulative fractions keeps each class in proportion (to within two samples)
    # while every split gets exactly round(fraction * N) samples.
    n = len(y)
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    classes = torch.unique(y)  # sorted, so the generator is consumed in a fixed order
    q = torch.empty(n, dtype=torch.float64)
    for c in classes.tolist():
        idx = torch.nonzero(y == c).flatten()
        q[idx[torch.randperm(len(idx), generator=g)]] = (
            torch.arange(len(idx), dtype=torch.float64) + 0.5
        ) / len(idx)
    tie = torch.rand(n, generator=g, dtype=torch.float64)
    order = torch.from_numpy(np.lexsort((tie.numpy(), q.numpy())))  # by q, ties at random
    cuts = [0, *np.floor(np.cumsum(list(fractions.values())) * n + 0.5).astype(int).tolist()]
    out = {name: order[cuts[k] : cuts[k + 1]] for k, name in enumerate(fractions)}
    out = {"train": order[cuts[-1] :], **out}
    out = {name: torch.sort(idx)[0] for name, idx in out.items()}
    for name, idx in out.items():
        if len(idx) == 0:
            raise InputError(
                f"split {name!r} would be empty: {n} samples are too few for fractions {fractions}"
            )
    return out


def split_data(
    name: str,
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    fractions: dict[str, float],
    num_classes: int | None = None,
    test: tuple[Tensor, Tensor] | None = None,
    class_names: list[str] | None = None,
) -> ClassificationData:
    """Build a :class:`ClassificationData` from one pool of samples, split with :func:`split_indices`.

    Args:
        name: the dataset name (for messages).
        x, y: ``(N, C, H, W)`` images and ``(N,)`` labels.
        seed: the split seed.
        fractions: ``{"val": .., "calib": .., "test": ..}``.
        num_classes: defaults to ``max(y) + 1``.
        test: an official test set ``(x, y)``; then ``fractions["test"]`` is ignored and val and calib
            are carved from ``x, y``.
        class_names: label -> name.
    """
    check_finite(x, name)
    wanted = {k: v for k, v in fractions.items() if not (test is not None and k == "test")}
    idx = split_indices(y, wanted, seed)
    splits = {k: Split(x[i], y[i]) for k, i in idx.items()}
    if test is not None:
        check_finite(test[0], name)
        splits["test"] = Split(*test)
    n_cls = int(num_classes if num_classes is not None else int(y.max()) + 1)
    return ClassificationData(
        name=name, num_classes=n_cls, in_shape=tuple(x.shape[1:]), class_names=class_names, **splits
    )


def load_classification(
    name: str,
    *,
    root: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    calib_fraction: float = 0.1,
    test_fraction: float = 0.2,
    **options,
) -> ClassificationData:
    """Load the registered classification dataset ``name`` with seeded, stratified, disjoint splits.

    Args:
        name: a name in ``DATASETS`` (digits, glyphs, folder, cifar10, cifar100, ...).
        root: the local folder of a dataset read from disk (nothing is ever downloaded).
        seed: the split seed.
        val_fraction, calib_fraction, test_fraction: fractions of every class; train takes the rest.
            Datasets with an official test set (CIFAR) ignore ``test_fraction``.
        **options: dataset options (e.g. ``num_classes`` for glyphs, ``size`` for folder); an unknown
            one is an :class:`InputError`.

    Example::

        data = load_classification("digits", seed=1)
        data.train.x.shape  # (N, 1, 8, 8)
    """
    loader = DATASETS.get(name)
    params = inspect.signature(loader).parameters
    allowed = [p for p in params if p not in _COMMON_ARGS]
    for key in options:
        if key not in allowed or key in _COMMON_ARGS:
            choices = ", ".join(allowed) if allowed else "none"
            raise InputError(f"dataset {name!r} has no option {key!r}; its options: {choices}")
    fractions = {"val": val_fraction, "calib": calib_fraction, "test": test_fraction}
    return loader(root=root, seed=seed, fractions=fractions, **options)


def keep_labels(y: Tensor, per_class: int, seed: int) -> Tensor:
    """A copy of ``y`` where all but ``per_class`` samples of each class (seeded choice) are ``-1``."""
    if isinstance(per_class, bool) or not isinstance(per_class, numbers.Integral) or per_class < 0:
        raise InputError(f"keep_labels: per_class must be an integer of at least 0, got {per_class!r}")
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(y, -1)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        out[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = c
    return out
