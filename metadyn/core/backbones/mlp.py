"""A multi-exit MLP, for tests and tabular inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.heads import ExitHead
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


class MLPExits(MultiExitNet):
    """Fully connected trunk with an exit after every hidden layer.

    Args:
        in_dim: flattened input size (inputs of any shape are flattened).
        num_classes: number of classes.
        hidden: widths of the hidden layers; one exit after each.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: Sequence[int] = (64, 64, 64)):
        super().__init__()
        if isinstance(hidden, str) or not isinstance(hidden, Sequence) or not hidden:
            raise InputError(f"mlp hidden must be a non-empty list of widths, got {str(hidden)[:40]}")
        for name, v in (("in_dim", in_dim), ("num_classes", num_classes), *(("hidden width", h) for h in hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"mlp {name} must be a positive integer, got {str(v)[:40]}")
        if max(hidden) > 1 << 16:
            raise InputError(f"mlp hidden widths must be at most 65536, got {max(hidden)}")
        dims = [in_dim, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dims[i], dims[i + 1]), nn.ReLU()) for i in range(len(hidden))
        )
        self.heads = nn.ModuleList(ExitHead(w, num_classes) for w in hidden)
        self.num_exits = len(hidden)
        self.num_classes = num_classes

    def stem(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def stage(self, i: int, state: Tensor) -> Tensor:
        return self.blocks[i](state)

    def exit(self, i: int, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads[i](state)


@BACKBONES.register("mlp", example={"hidden": [16, 16, 16]})
def mlp_exits(in_shape=(1, 8, 8), num_classes: int = 10, hidden: Sequence[int] = (64, 64, 64)) -> MLPExits:
    """Multi-exit MLP on flattened inputs of shape ``in_shape``."""
    in_dim = 1
    for s in in_shape:
        in_dim *= int(s)
    return MLPExits(in_dim, num_classes, tuple(hidden) if isinstance(hidden, list | tuple) else hidden)


def tiny_mlp_exits(in_shape=(1, 8, 8), num_classes: int = 10) -> MLPExits:
    """A 3-exit MLP of width 16 that runs in microseconds (tests)."""
    return mlp_exits(in_shape, num_classes, hidden=(16, 16, 16))
