"""ExitOutput: what every multi-exit network returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
