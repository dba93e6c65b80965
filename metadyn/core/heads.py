"""Exit classifiers: read a trunk activation, return ``(logits, features)``."""

from __future__ import annotations

from torch import Tensor, nn


class ExitHead(nn.Module):
    """A linear exit classifier on globally pooled features (the SDN / ResNet-exit head).

    A 4-D activation ``(B, C, H, W)`` is first optionally passed through a 3x3 conv (``conv_channels``
    > 0, the MSDNet-style "bottleneck" head), then average-pooled to ``(B, C)``; a 2-D activation is
    used as is. The pooled vector is the exit's feature; a linear layer maps it to logits.

    Args:
        in_channels: channels (or width) of the trunk activation at this exit.
        num_classes: number of classes.
        conv_channels: width of an optional conv before pooling (0 = none).
    """

    def __init__(self, in_channels: int, num_classes: int, conv_channels: int = 0):
        super().__init__()
        self.conv: nn.Module | None = None
        dim = in_channels
        if conv_channels > 0:
            self.conv = nn.Sequential(
                nn.Conv2d(in_channels, conv_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(conv_channels),
                nn.ReLU(inplace=True),
            )
            dim = conv_channels
        self.feature_dim = dim
        self.fc = nn.Linear(dim, num_classes)

    def features(self, h: Tensor) -> Tensor:
        if h.dim() == 4:
            if self.conv is not None:
                h = self.conv(h)
            h = h.mean(dim=(2, 3))  # (B, C)
        elif h.dim() > 2:
            h = h.flatten(1)
        return h

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(h)
        return self.fc(f), f
