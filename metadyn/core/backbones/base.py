"""The MultiExitNet contract: a network that can also be run stage by stage."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_map

from metadyn.core.outputs import ExitOutput

State = Any  # a tensor or a pytree of tensors whose leading dimension is the batch


def index_state(state: State, idx: Tensor) -> State:
    """Keep the samples ``idx`` (a 1-D index tensor) of every tensor in a State pytree."""
    return tree_map(lambda t: t[idx] if isinstance(t, Tensor) else t, state)  # keeps channels-last layout


class MultiExitNet(nn.Module):
    """Base class of every multi-exit network.

    Subclasses set ``num_exits`` and implement :meth:`stage` and :meth:`exit` (and :meth:`stem` when
    the input needs work before the first stage). :meth:`forward` runs every stage and every exit, so
    it is by construction the same computation that dynamic inference performs piece by piece.

    ``stage(i, state)`` computes the trunk from exit ``i - 1`` up to exit ``i``; ``exit(i, state)``
    returns exit ``i``'s ``(logits, features)``. A State is a tensor or a pytree of tensors whose
    leading dimension is the batch (MSDNet: one tensor per scale).
    """

    num_exits: int

    def stem(self, x: Tensor) -> State:
        return x

    def stage(self, i: int, state: State) -> State:
        raise NotImplementedError

    def exit(self, i: int, state: State) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> ExitOutput:
        state = self.stem(x)
        logits, features = [], []
        for i in range(self.num_exits):
            state = self.stage(i, state)
            lg, ft = self.exit(i, state)
            logits.append(lg)
            features.append(ft)
        return ExitOutput(logits, features)

    def forward_final(self, x: Tensor) -> Tensor:
        """The final exit's logits without computing any earlier exit (the static network)."""
        state = self.stem(x)
        for i in range(self.num_exits):
            state = self.stage(i, state)
        return self.exit(self.num_exits - 1, state)[0]
