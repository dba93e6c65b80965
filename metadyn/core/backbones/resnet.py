"""CIFAR-style ResNet (depth 6n+2) with exits after chosen blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.heads import ExitHead
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


class PadShortcut(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra > 0:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class BasicBlock(nn.Module):
    """``relu(shortcut(x) + residual(x))`` with two 3x3 convs; ``shortcut`` and ``in_channels`` are exposed for
    gating (:func:`metadyn.core.gating.check_gateable`)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.residual(x)  # a fresh tensor: adding and rectifying in place saves two passes over memory
        out += self.shortcut(x)
        return out.relu_()


class ResNetExits(MultiExitNet):
    """CIFAR ResNet of depth ``6n + 2`` (three stages of ``n`` basic blocks, widths w, 2w, 4w).

    Exits sit after the blocks listed in ``exits`` (1-based block counts, e.g. ``(9, 18, 27)`` for
    ResNet-56 puts one at the end of each stage); the final block always carries the final exit.
    ``blocks`` is the flat list of residual blocks, so gating methods can run them one by one (it satisfies
    the gated-backbone contract, :func:`metadyn.core.gating.check_gateable`).

    References:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2 (CIFAR ResNets,
        option-A shortcuts); Kaya et al., "Shallow-Deep Networks", ICML 2019 (exits on ResNet-56).
    """

    def __init__(self, depth: int = 56, exits: Sequence[int] | None = None, num_classes: int = 10,
                 in_channels: int = 3, width: int = 16):
        super().__init__()
        for name, v in (("depth", depth), ("width", width), ("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"resnet {name} must be a positive integer, got {str(v)[:40]}")
        if (depth - 2) % 6 != 0 or depth < 8:
            raise InputError(f"resnet depth must be 6n+2 (20, 56, 110, ...), got {depth}")
        if depth > 2000 or width > 4096:
            raise InputError(f"resnet depth {depth} / width {width} is beyond any CIFAR ResNet (depth <= 2000, "
                             "width <= 4096)")
        n = (depth - 2) // 6
        total = 3 * n
        if exits is not None and (isinstance(exits, str) or not isinstance(exits, Sequence)
                                  or not all(isinstance(e, int) and not isinstance(e, bool) for e in exits)):
            raise InputError(f"resnet exits must be a list of block numbers, got {str(exits)[:40]}")
        if exits is not None and (len(exits) == 0 or any(a >= b for a, b in zip(exits, exits[1:]))):
            raise InputError(f"resnet exits must be increasing, distinct block numbers (null: after each stage), got "
                             f"{list(exits)}")
        exits = list(exits) if exits is not None else [n, 2 * n, 3 * n]
        if exits[0] < 1 or exits[-1] > total:
            raise InputError(f"resnet exits must lie in 1..{total} for depth {depth}, got {exits}")
        if exits[-1] != total:
            exits.append(total)
        self.exit_blocks = tuple(exits)
        self.stem_layer = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks, widths = [], []
        c_in = width
        for s in range(3):
            c_out = width * 2**s
            for b in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if (s > 0 and b == 0) else 1))
                widths.append(c_out)
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(ExitHead(widths[e - 1], num_classes) for e in exits)
        self.num_exits = len(exits)
        self.num_classes = num_classes

    def block_range(self, i: int) -> range:
        """Indices into ``blocks`` that stage ``i`` runs."""
        start = 0 if i == 0 else self.exit_blocks[i - 1]
        return range(start, self.exit_blocks[i])

    def stem(self, x: Tensor) -> Tensor:
        return self.stem_layer(x)

    def stage(self, i: int, state: Tensor) -> Tensor:
        for b in self.block_range(i):
            state = self.blocks[b](state)
        return state

    def exit(self, i: int, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads[i](state)


@BACKBONES.register("resnet", example={"depth": 8, "exits": [1, 2, 3], "width": 4})
def resnet_exits(in_shape=(3, 32, 32), num_classes: int = 10, depth: int = 56,
                 exits: Sequence[int] | None = None, width: int = 16) -> ResNetExits:
    """CIFAR ResNet-``depth`` with exits after the blocks ``exits`` (default: the end of each stage)."""
    return ResNetExits(depth, exits, num_classes, int(in_shape[0]), width)


def tiny_resnet_exits(in_shape=(1, 8, 8), num_classes: int = 10) -> ResNetExits:
    """ResNet-8 of width 4 with three exits (tests; milliseconds per batch)."""
    return resnet_exits(in_shape, num_classes, depth=8, exits=(1, 2, 3), width=4)
