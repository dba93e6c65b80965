"""scikit-learn's bundled handwritten digits: 1797 real 8x8 images, 10 classes, no download.

References:
    Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI ML Repository, 1998.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from metadyn.data.base import ClassificationData, split_data
from metadyn.errors import InputError
from metadyn.registry import DATASETS


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


@DATASETS.register("digits")
def digits(*, root: str | None, seed: int, fractions: dict[str, float]) -> ClassificationData:
    """The digits set as ``(N, 1, 8, 8)`` float32 in [0, 1] (pixel counts 0..16 divided by 16)."""
    if root is not None:
        raise InputError(f"dataset 'digits' is bundled and takes no root (got root={root!r})")
    data, target = _raw_digits()
    x = torch.from_numpy(data / np.float32(16.0)).reshape(-1, 1, 8, 8)  # (N, 64) -> (N, 1, 8, 8)
    y = torch.from_numpy(target.copy())
    return split_data(
        "digits",
        x,
        y,
        seed=seed,
        fractions=fractions,
        num_classes=10,
        class_names=[str(d) for d in range(10)],
    )
