"""ExitOutput: what every multi-exit network returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metadyn.errors import InputError


def check_labels(logits: Tensor, labels: Tensor, fn: str) -> None:
    """Refuse ``labels`` that cannot be the classes of ``logits`` (``(N, C)``): another number of samples, not
    integers, or a class outside ``0..C-1`` (compared with ``argmax``, such a label would silently count as an
    error)."""
    n, c = (logits.shape[0], logits.shape[-1]) if logits.dim() == 2 else (None, None)
    if n is None:
        raise InputError(f"{fn}: logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.shape != (n,):
        raise InputError(f"{fn}: labels must be ({n},) for {n} samples, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise InputError(f"{fn}: labels must be integer class indices, got {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise InputError(f"{fn}: labels must lie in 0..{c - 1} (the logits' classes), got "
                         f"{int(labels.min())}..{int(labels.max())}")


@dataclass
class ExitOutput:
    """Logits and features of every exit, shallow to deep; the last entry is the final exit.

    Attributes:
        logits: one ``(B, C)`` tensor per exit.
        features: the ``(B, D)`` representation each exit's classifier reads.
    """

    logits: list[Tensor]
    features: list[Tensor]

    @property
    def num_exits(self) -> int:
        return len(self.logits)

    def __post_init__(self) -> None:
        if len(self.logits) != len(self.features):
            raise ValueError(f"{len(self.logits)} logits but {len(self.features)} features")
