"""Conv-4, the few-shot standard backbone, with an exit after each block."""

from __future__ import annotations

from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.heads import ExitHead
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``batch`` (running stats), ``batch_episodic`` (batch stats only, as in MAML), ``group`` or ``none``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "batch_episodic":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise InputError(f"unknown norm {kind!r}; choose from: batch, batch_episodic, group, none")


class Conv4Exits(MultiExitNet):
    """Four blocks of conv3x3 -> norm -> ReLU -> maxpool2, an exit after each.

    The backbone of MAML and Prototypical Networks; each exit average-pools its block's feature map
    and applies a linear classifier.

    References:
        Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016 (the 4-block ConvNet);
        Finn et al., "Model-Agnostic Meta-Learning", ICML 2017.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5, width: int = 64, norm: str = "batch",
                 pool_last: bool = True, blocks: int = 4):
        super().__init__()
        for name, v in (("width", width), ("blocks", blocks), ("in_channels", in_channels),
                        ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"conv4 {name} must be a positive integer, got {str(v)[:40]}")
        if width > 4096:
            raise InputError(f"conv4 width must be at most 4096, got {width}")
        chans = [in_channels] + [width] * blocks
        layers = []
        for i in range(blocks):
            layer = [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), norm_layer(norm, chans[i + 1]), nn.ReLU()]
            if i < blocks - 1 or pool_last:
                layer.append(nn.MaxPool2d(2, ceil_mode=True))
            layers.append(nn.Sequential(*layer))
        self.blocks = nn.ModuleList(layers)
        self.heads = nn.ModuleList(ExitHead(width, num_classes) for _ in range(blocks))
        self.num_exits = blocks
        self.num_classes = num_classes

    def stage(self, i: int, state: Tensor) -> Tensor:
        return self.blocks[i](state)

    def exit(self, i: int, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads[i](state)


@BACKBONES.register("conv4", example={"width": 4})
def conv4_exits(in_shape=(1, 28, 28), num_classes: int = 5, width: int = 64, norm: str = "batch") -> Conv4Exits:
    """Conv-4 with four exits. Inputs of 8x8 (digits) keep their last pool via ``ceil_mode``."""
    return Conv4Exits(int(in_shape[0]), num_classes, width, norm)


def tiny_conv4_exits(in_shape=(1, 8, 8), num_classes: int = 5) -> Conv4Exits:
    """Conv-4 of width 8 (tests)."""
    return conv4_exits(in_shape, num_classes, width=8)
