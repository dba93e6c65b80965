"""Training callbacks: the hooks :func:`metadyn.core.train.fit` calls, and the state they see.

A research method is a loss plus, if it needs one, a :class:`Callback`. Callbacks live here, apart from
the training loop, so that losses and networks that bring a callback (BlockDrop's curriculum, IMTA's
gradient equilibrium) import the hooks, not the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class TrainState:
    """What callbacks see: the model, optimizer, position in training and the per-epoch history."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # the epoch being run (0-based); after training, the number of epochs done
    step: int = 0
    batch: tuple[Tensor, Tensor] | None = None
    loss: Tensor | None = None
    history: list[dict] = field(default_factory=list)


class Callback:
    """Hooks called by :func:`~metadyn.core.train.fit`; override the ones you need. ``on_epoch_end`` may
    add keys to ``state.history[-1]`` (e.g. a validation accuracy).

    A callback that keeps state across epochs (a counter, a best score) returns it from
    :meth:`state_dict` and takes it back in :meth:`load_state_dict`: ``fit`` saves it in every
    checkpoint and restores it, on resume, before ``on_train_start``. The state must be what
    ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, None, and lists, tuples and
    dicts of them.
    """

    def on_train_start(self, state: TrainState) -> None: ...
    def on_epoch_start(self, state: TrainState) -> None: ...
    def on_after_backward(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """What to checkpoint (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (default: nothing to restore)."""
