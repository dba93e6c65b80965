"""Exit classifiers: read a trunk activation, return ``(logits, features)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metadyn.errors import InputError


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


# --------------------------------------------------------------------------- SCAN / BYOT exit branches


class ScanAttention(nn.Module):
    """SCAN's attention module: a mask in (0, 1) per channel and position, multiplied into the feature map.

    ``mask = sigmoid(BN(deconv4x4_s2(relu(BN(conv3x3_s2(h))))))`` and ``forward(h) = h * mask``: one strided
    conv down, one transposed conv back up (cropped to ``h``'s size when it is odd). Standalone: it takes
    and returns a ``(B, C, H, W)`` map, so it can be inserted on any branch and removed again.

    References:
        Zhang et al., "SCAN: A Scalable Neural Networks Framework Towards Compact and Efficient Models",
        NeurIPS 2019, Sec. 3.1 and Fig. 2 (attention modules on the shallow classifiers); released code
        ``ArchipLab-LinfengZhang/pytorch-scalable-neural-networks`` (``sresnet.py``, ``attention1..3``;
        its convs also carry a bias, which the BatchNorm after them cancels).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels),
                                  nn.ReLU(inplace=True))
        self.up = nn.Sequential(nn.ConvTranspose2d(channels, channels, 4, 2, 1, bias=False),
                                nn.BatchNorm2d(channels), nn.Sigmoid())

    def mask(self, h: Tensor) -> Tensor:
        """The attention mask ``(B, C, H, W)`` in (0, 1)."""
        return self.up(self.down(h))[..., : h.shape[-2], : h.shape[-1]]

    def forward(self, h: Tensor) -> Tensor:
        return h * self.mask(h)


class ScanHead(nn.Module):
    """A SCAN / BYOT exit branch: [attention], a bottleneck onto the final exit's features, a linear layer.

    The bottleneck (the released code's ``ScalaNet``) is 1x1 conv -> ``inner`` channels, a ``stride x stride``
    conv of stride ``stride`` (the down-sampling factor to the final exit's resolution), 1x1 conv ->
    ``out_channels``, each followed by BatchNorm and ReLU, then global average pooling. Its output — the
    exit's feature ``F_i`` — has the final exit's size, as BYOT's feature loss needs.

    Args:
        in_channels: channels of the trunk map at this exit.
        out_channels: the final exit's feature size.
        num_classes: number of classes.
        stride: spatial down-sampling factor to the final exit's resolution.
        inner: bottleneck width (default ``out_channels // 4``: the released code's 128 for ResNet-18's 512).
        attention: put a :class:`ScanAttention` first (SCAN); without it the branch is BYOT's.
    """

    def __init__(self, in_channels: int, out_channels: int, num_classes: int, stride: int = 1,
                 inner: int | None = None, attention: bool = True):
        super().__init__()
        inner = inner or max(1, out_channels // 4)
        self.attention = ScanAttention(in_channels) if attention else None
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, inner, stride, stride, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )
        self.feature_dim = out_channels
        self.fc = nn.Linear(out_channels, num_classes)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.attention is not None:
            h = self.attention(h)
        f = self.bottleneck(h).mean(dim=(2, 3))  # (B, out_channels)
        return self.fc(f), f


def scan_heads(model: nn.Module, in_shape, attention: bool = True, inner: int | None = None) -> nn.Module:
    """Give every exit but the final one of a multi-exit network a :class:`ScanHead` (in place).

    ``model`` must keep its exit classifiers in ``model.heads`` (one per exit, fed a ``(B, C, H, W)`` map,
    returning ``(logits, features)``), as the resnet, conv4 and msdnet backbones do. The input size of each
    head, the final exit's resolution and feature size are read off one forward pass on zeros of shape
    ``in_shape``. Returns ``model``.
    """
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleList) or len(heads) != getattr(model, "num_exits", -1):
        raise InputError(f"scan exit branches need a network with one head per exit in .heads; "
                         f"{type(model).__name__} has none")
    seen: dict[int, tuple] = {}

    def spy(i):
        def hook(module, args, output):
            seen[i] = (tuple(args[0].shape), tuple(output[0].shape), tuple(output[1].shape))
        return hook

    handles = [h.register_forward_hook(spy(i)) for i, h in enumerate(heads)]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *in_shape), dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if any(len(seen[i][0]) != 4 for i in seen):
        raise InputError("scan exit branches need convolutional feature maps (B, C, H, W) at every exit")
    _, (_, num_classes), (_, dim) = seen[len(heads) - 1]
    final_h = seen[len(heads) - 1][0][2]
    for i in range(len(heads) - 1):
        _, c, h, _ = seen[i][0]
        heads[i] = ScanHead(c, dim, num_classes, max(1, h // final_h), inner, attention).to(p.device, p.dtype)
    return model
