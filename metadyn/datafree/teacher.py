"""A small static CNN: the kind of trained network data-free conversion starts from.

Data-free conversion needs a static network that ``torch.fx`` can trace and that returns ``(B, C)``
logits (:func:`~metadyn.core.backbones.attach.attach_exits`), with BatchNorm layers whose running
statistics the DeepInversion prior can match. :class:`StaticCNN` is such a network; the tasks train
one per dataset with the core :func:`~metadyn.core.train.fit` (loss :func:`~metadyn.core.losses.labeled_ce`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metadyn.errors import InputError


class StaticCNN(nn.Module):
    """Stages of ``convs`` conv3x3-BatchNorm-ReLU layers (a 2x2 max-pool opens every stage after the
    first), global average pooling and a linear classifier.

    ``stages[i]`` (named ``"stages.0"``, ``"stages.1"``, ...) are the natural places to attach exits.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64), convs: int = 2):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or convs < 1:
            raise InputError(f"StaticCNN needs positive widths and convs, got widths={widths}, convs={convs}")
        stages, c = [], in_channels
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if i > 0 else []
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(x)).flatten(1))  # (B, num_classes)


def static_cnn(in_shape=(1, 8, 8), num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
               convs: int = 2) -> StaticCNN:
    """A :class:`StaticCNN` for inputs of shape ``in_shape`` ``(C, H, W)``."""
    return StaticCNN(int(in_shape[0]), num_classes, widths, convs)


def tiny_static_cnn(in_shape=(1, 8, 8), num_classes: int = 10) -> StaticCNN:
    """Two stages of two convs, widths 8 and 16 (tests)."""
    return static_cnn(in_shape, num_classes, widths=(8, 16), convs=2)
