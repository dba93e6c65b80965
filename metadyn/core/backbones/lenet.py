"""LeNet-5 and LeNet-5-Half: the teacher and student of ZSKD's MNIST and Fashion-MNIST experiments.

LeNet-5 (LeCun et al., 1998, as used by Lopes et al., 2017 and by ZSKD): conv5x5(6) -> ReLU -> maxpool2 ->
conv5x5(16) -> ReLU -> maxpool2 -> fc(120) -> ReLU -> fc(84) -> ReLU -> fc(classes), on 32x32 inputs (28x28
images are zero-padded to 32x32, as LeCun et al. did for MNIST): 61,706 parameters for 10 classes.
LeNet-5-Half halves the number of filters of each convolution (3 and 8), keeping the fully connected layers:
35,820 parameters. The parameter counts are ZSKD's (Sec. 4.1).

As a multi-exit network: the trunk is three stages (conv block 1, conv block 2, the two hidden fc layers);
the final exit is the paper's last fc layer. ``early_exits`` adds exits after conv block 1 (``0``) and/or
conv block 2 (``1``) (average pooling + linear, :class:`~metadyn.core.heads.ExitHead`); the paper's networks
have none (the default).

References:
    LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied to Document Recognition", Proc. IEEE 1998;
    Lopes, Fenu & Starner, "Data-Free Knowledge Distillation for Deep Neural Networks", NIPS-W 2017 (LeNet-5-Half);
    Nayak et al., "Zero-Shot Knowledge Distillation in Deep Networks", ICML 2019, Sec. 4.1-4.2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.heads import ExitHead
from metadyn.errors import InputError
from metadyn.registry import BACKBONES

INPUT_SIZE = 32  # LeNet-5's input side; smaller inputs are zero-padded (centred) to it


class LeNet5(MultiExitNet):
    """LeNet-5 with ``filters`` convolution widths (``(6, 16)``: LeNet-5, ``(3, 8)``: LeNet-5-Half).

    Args:
        in_channels, num_classes: input channels and classes.
        filters: filters of the two 5x5 convolutions.
        hidden: widths of the two hidden fully connected layers (the paper: 120, 84).
        in_size: ``(H, W)`` of the inputs; each side smaller than 32 is zero-padded (centred) to 32.
        early_exits: stages (``0``: after conv block 1, ``1``: after conv block 2) that get an exit before the
            final one.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, filters: Sequence[int] = (6, 16),
                 hidden: Sequence[int] = (120, 84), in_size: Sequence[int] = (28, 28),
                 early_exits: Sequence[int] = ()):
        super().__init__()
        for name, vals, n in (("filters", filters, 2), ("hidden", hidden, 2), ("in_size", in_size, 2)):
            if isinstance(vals, str) or not isinstance(vals, Sequence) or len(vals) != n or any(
                    isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096 for v in vals):
                raise InputError(f"lenet5 {name} must be a list of {n} integers in [1, 4096], got {str(vals)[:40]}")
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"lenet5 {name} must be a positive integer, got {str(v)[:40]}")
        bad = isinstance(early_exits, str) or not isinstance(early_exits, Sequence) or any(
            isinstance(e, bool) or e not in (0, 1) for e in early_exits)
        if bad or len(set(early_exits)) != len(early_exits):
            raise InputError(f"lenet5 early_exits must be distinct stages among 0 and 1, got {str(early_exits)[:40]}")
        grow = [max(INPUT_SIZE - s, 0) for s in in_size]
        self.pad = [(g // 2, g - g // 2) for g in grow]  # [(top, bottom), (left, right)]
        h, w = (s + a + b for s, (a, b) in zip(in_size, self.pad))
        for _ in range(2):
            h, w = (h - 4) // 2, (w - 4) // 2
        if h < 1 or w < 1:
            raise InputError(f"lenet5 needs inputs of at least 12x12 after padding, got {list(in_size)}")
        f1, f2 = filters
        layers = [nn.Sequential(nn.Conv2d(in_channels, f1, 5), nn.ReLU(), nn.MaxPool2d(2)),
                  nn.Sequential(nn.Conv2d(f1, f2, 5), nn.ReLU(), nn.MaxPool2d(2)),
                  nn.Sequential(nn.Flatten(), nn.Linear(f2 * h * w, hidden[0]), nn.ReLU(),
                                nn.Linear(hidden[0], hidden[1]), nn.ReLU())]
        widths = [f1, f2, hidden[1]]
        cuts = sorted(early_exits) + [2]  # the last layer of each stage
        starts = [0] + [c + 1 for c in cuts[:-1]]
        self.blocks = nn.ModuleList(nn.Sequential(*layers[a:b + 1]) for a, b in zip(starts, cuts))
        self.heads = nn.ModuleList(ExitHead(widths[c], num_classes) for c in cuts)
        self.num_exits = len(cuts)
        self.num_classes = num_classes

    def stem(self, x: Tensor) -> Tensor:
        (top, bottom), (left, right) = self.pad
        return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x

    def stage(self, i: int, state: Tensor) -> Tensor:
        return self.blocks[i](state)

    def exit(self, i: int, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads[i](state)


def _lenet(in_shape, num_classes, filters, hidden, early_exits) -> LeNet5:
    if len(in_shape) != 3:
        raise InputError(f"lenet5 takes images (C, H, W), got input shape {list(in_shape)}")
    return LeNet5(int(in_shape[0]), num_classes, tuple(filters) if isinstance(filters, list) else filters,
                  tuple(hidden) if isinstance(hidden, list) else hidden, (int(in_shape[1]), int(in_shape[2])),
                  tuple(early_exits) if isinstance(early_exits, list) else early_exits)


@BACKBONES.register("lenet5", example={"filters": [2, 4], "hidden": [8, 8], "early_exits": [0, 1]})
def lenet5(in_shape=(1, 28, 28), num_classes: int = 10, filters: Sequence[int] = (6, 16),
           hidden: Sequence[int] = (120, 84), early_exits: Sequence[int] = ()) -> LeNet5:
    """LeNet-5 (ZSKD's MNIST / Fashion-MNIST teacher: 61,706 parameters for 10 classes); inputs smaller than
    32x32 are zero-padded to it."""
    return _lenet(in_shape, num_classes, filters, hidden, early_exits)


@BACKBONES.register("lenet5_half", example={"early_exits": [0, 1]})
def lenet5_half(in_shape=(1, 28, 28), num_classes: int = 10, early_exits: Sequence[int] = ()) -> LeNet5:
    """LeNet-5-Half (ZSKD's MNIST / Fashion-MNIST student: half the filters, 3 and 8; 35,820 parameters for
    10 classes)."""
    return _lenet(in_shape, num_classes, (3, 8), (120, 84), early_exits)
