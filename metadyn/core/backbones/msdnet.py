"""MSDNet: multi-scale dense networks with classifiers on the coarsest scale, run stage by stage.

References:
    Huang, Chen, Li, Wu, van der Maaten & Weinberger, "Multi-Scale Dense Networks for Resource Efficient
    Image Classification", ICLR 2018, Sec. 4 and Fig. 2; released code ``gaohuang/MSDNet`` (Lua) and its
    PyTorch port ``kalviny/MSDNet-PyTorch`` (``models/msdnet.py``, ``--stepmode/--step/--base``,
    ``--prune max``, ``--reduction``, ``--bottleneck``, ``--grFactor/--bnFactor``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """conv -> BatchNorm -> ReLU (the released code's ``ConvBasic``)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def dense_conv(c_in: int, c_out: int, down: bool, bottleneck: bool, bn_width: int) -> nn.Sequential:
    """The new features of one scale: [1x1 bottleneck to ``min(c_in, bn_width * c_out)``] then a 3x3 conv,
    strided when it reads the next finer scale (``ConvBN`` in the released code)."""
    layers: list[nn.Module] = []
    inner = c_in
    if bottleneck:
        inner = min(c_in, bn_width * c_out)
        layers += [nn.Conv2d(c_in, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(inner, c_out, 3, 2 if down else 1, 1, bias=False), nn.BatchNorm2d(c_out),
               nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ScaleUpdate(nn.Module):
    """Scale ``s`` of one MSDNet layer: ``cat([x_s, strided(x_{s-1}), regular(x_s)])``, or
    ``cat([x_s, regular(x_s)])`` on the finest scale kept (dense connectivity: old features are kept)."""

    def __init__(self, c_same: int, c_new: int, bottleneck: bool, bn_same: int, c_fine: int = 0, bn_fine: int = 1):
        super().__init__()
        self.down = dense_conv(c_fine, c_new // 2, True, bottleneck, bn_fine) if c_fine else None
        self.regular = dense_conv(c_same, c_new // 2 if c_fine else c_new, False, bottleneck, bn_same)

    def forward(self, same: Tensor, fine: Tensor | None = None) -> Tensor:
        if self.down is None:
            return torch.cat([same, self.regular(same)], 1)
        return torch.cat([same, self.down(fine), self.regular(same)], 1)


class MSDLayer(nn.Module):
    """One layer of MSDNet on the scales ``S - out_scales .. S - 1`` (0 = finest).

    It reads ``in_scales`` tensors (``in_scales - out_scales`` is 0, or 1 when the finest scale is dropped:
    the new finest scale then still reads the dropped one through its strided conv).
    """

    def __init__(self, c_in: int, growth: int, gr_factor: Sequence[int], bn_factor: Sequence[int],
                 in_scales: int, out_scales: int, bottleneck: bool):
        super().__init__()
        n = len(gr_factor)
        self.offset = n - out_scales
        self.in_offset = n - in_scales
        updates = []
        for s in range(self.offset, n):
            if s == self.offset and in_scales == out_scales:
                updates.append(ScaleUpdate(c_in * gr_factor[s], growth * gr_factor[s], bottleneck, bn_factor[s]))
            else:
                updates.append(ScaleUpdate(c_in * gr_factor[s], growth * gr_factor[s], bottleneck, bn_factor[s],
                                           c_in * gr_factor[s - 1], bn_factor[s - 1]))
        self.updates = nn.ModuleList(updates)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        out = []
        for k, up in enumerate(self.updates):
            i = self.offset + k - self.in_offset  # index of this scale in the input list
            out.append(up(xs[i]) if up.down is None else up(xs[i], xs[i - 1]))
        return out


class Transition(nn.Module):
    """1x1 conv-BN-ReLU per scale that compresses the channels after a scale is dropped (``--reduction``)."""

    def __init__(self, c_in: int, c_out: int, scales: Sequence[int], gr_factor: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn_relu(c_in * gr_factor[s], c_out * gr_factor[s], 1) for s in scales)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class MSDNetHead(nn.Module):
    """MSDNet's CIFAR classifier on the coarsest scale: two strided 3x3 conv-BN-ReLU, global average
    pooling (the released code's ``AvgPool2d(2)`` on its 2x2 map), a linear layer."""

    def __init__(self, c_in: int, num_classes: int, channels: int = 128):
        super().__init__()
        self.conv = nn.Sequential(conv_bn_relu(c_in, channels, 3, 2), conv_bn_relu(channels, channels, 3, 2))
        self.fc = nn.Linear(channels, num_classes)
        self.feature_dim = channels

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = self.conv(h).mean(dim=(2, 3))  # (B, channels)
        return self.fc(f), f


def msdnet_steps(blocks: int, stepmode: str, step: int, base: int) -> list[int]:
    """Layers per block: ``base`` first, then ``step`` each (``even``) or ``step * i + 1`` (``lin_grow``)."""
    if stepmode not in ("even", "lin_grow"):
        raise InputError(f"unknown msdnet stepmode {stepmode!r}; choose from: even, lin_grow")
    if blocks < 1 or step < 1 or base < 1:
        raise InputError(f"msdnet blocks, step and base must be at least 1, got {blocks}, {step}, {base}")
    return [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, blocks)]


class MSDNet(MultiExitNet):
    """Multi-scale dense network with one classifier after each block, on the coarsest scale.

    The State is the list of feature maps of the scales still in use, finest first; each holds the
    concatenation of every earlier layer's features at that scale (dense connectivity). Scales are dropped
    from the finest as depth grows (the released code's ``--prune max``), followed by a transition that
    compresses the channels by ``reduction``.

    Args:
        in_channels, num_classes: input channels and classes.
        steps: layers per block (:func:`msdnet_steps`); one exit per block.
        channels: base channels of the first layer (``--nChannels``), times ``gr_factor[s]`` at scale ``s``.
        growth: growth rate (``--growthRate``), times ``gr_factor[s]`` at scale ``s``.
        gr_factor, bn_factor: per-scale channel and bottleneck-width factors; their length is the number
            of scales (3 for CIFAR: 32x32, 16x16, 8x8).
        bottleneck: 1x1 bottleneck convs before each 3x3 conv.
        reduction: transition compression (0 = no transitions).
        head_channels: width of the classifiers' convs (128 in the CIFAR configuration).
    """

    def __init__(self, in_channels: int, num_classes: int, steps: Sequence[int], channels: int = 16, growth: int = 6,
                 gr_factor: Sequence[int] = (1, 2, 4), bn_factor: Sequence[int] = (1, 2, 4), bottleneck: bool = True,
                 reduction: float = 0.5, head_channels: int = 128):
        super().__init__()
        gr, bnf, n = list(gr_factor), list(bn_factor), len(gr_factor)
        if n < 1 or len(bnf) != n:
            raise InputError(f"msdnet gr_factor and bn_factor need one entry per scale, got {gr} and {bnf}")
        small = {k: v for k, v in (("channels", channels), ("growth", growth), ("head_channels", head_channels))
                 if not isinstance(v, int) or v < 1}
        if small or any(not isinstance(f, int) or f < 1 for f in gr + bnf):
            bad = ", ".join(f"{k} {v!r}" for k, v in small.items()) or f"gr_factor {gr}, bn_factor {bnf}"
            raise InputError(f"msdnet channels, growth, head_channels and every gr_factor / bn_factor entry must be "
                             f"integers of at least 1, got {bad}")
        if any(growth * g % 2 for g in gr[1:]):
            raise InputError(f"msdnet growth * gr_factor must be even on all scales but the first, got growth {growth}")
        if not 0.0 <= reduction <= 1.0:
            raise InputError(f"msdnet reduction must lie in [0, 1], got {reduction}")
        self.steps = list(steps)
        self.num_exits = len(self.steps)
        self.num_classes = num_classes

        first, c = [], in_channels
        for s in range(n):  # the first layer: a conv per scale, strided from the second scale on
            first.append(conv_bn_relu(c, channels * gr[s], 3, 1 if s == 0 else 2))
            c = channels * gr[s]
        self.first = nn.ModuleList(first)

        total = sum(self.steps)
        interval = math.ceil(total / n)
        c_in, layer = channels, 0
        blocks, heads = [], []
        for n_layers in self.steps:
            mods: list[nn.Module] = []
            for _ in range(n_layers):
                layer += 1
                in_scales = n - (max(0, layer - 2) // interval)
                out_scales = n - ((layer - 1) // interval)
                mods.append(MSDLayer(c_in, growth, gr, bnf, in_scales, out_scales, bottleneck))
                c_in += growth
                if in_scales > out_scales and reduction > 0:
                    c_out = math.floor(reduction * c_in)
                    if c_out < 1:
                        raise InputError(f"msdnet reduction {reduction} leaves no channel after a transition "
                                         f"({c_in} channels in); use a larger reduction or 0 (no transitions)")
                    mods.append(Transition(c_in, c_out, range(n - out_scales, n), gr))
                    c_in = c_out
            blocks.append(nn.Sequential(*mods))
            heads.append(MSDNetHead(c_in * gr[-1], num_classes, head_channels))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation: conv ``N(0, 2 / (k*k*out))``, BatchNorm (1, 0), linear bias 0 (linear weights keep
        the default uniform ``±1/sqrt(fan_in)``).

        This is what the authors' Torch release applies (``gaohuang/MSDNet``, ``models/msdnet.lua``: ``ConvInit``,
        ``BNInit``). The PyTorch port (``kalviny/MSDNet-PyTorch``, ``models/msdnet.py``) writes the same
        ``_init_weights`` but calls it only on each block's direct children (whole MSDNet layers) and on each
        classifier module, none of them a ``Conv2d``/``BatchNorm2d``/``Linear``, so the port actually runs
        PyTorch's default initialisation. metadyn follows the Torch release."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stem(self, x: Tensor) -> list[Tensor]:
        xs = []
        for conv in self.first:
            x = conv(x)
            xs.append(x)
        return xs

    def stage(self, i: int, state: list[Tensor]) -> list[Tensor]:
        return self.blocks[i](state)

    def exit(self, i: int, state: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.heads[i](state[-1])


@BACKBONES.register("msdnet", example={"blocks": 3, "step": 1, "base": 1, "channels": 4, "growth": 2,
                                        "head_channels": 8})
def msdnet(in_shape=(3, 32, 32), num_classes: int = 10, blocks: int = 10, stepmode: str = "even", step: int = 2,
           base: int = 4, channels: int = 16, growth: int = 6, gr_factor: Sequence[int] = (1, 2, 4),
           bn_factor: Sequence[int] = (1, 2, 4), bottleneck: bool = True, reduction: float = 0.5,
           head_channels: int = 128) -> MSDNet:
    """MSDNet; the defaults are the released code's CIFAR anytime configuration
    (``--nBlocks 10 --stepmode even --step 2 --base 4 --nChannels 16``, growth 6, factors 1-2-4)."""
    return MSDNet(int(in_shape[0]), num_classes, msdnet_steps(blocks, stepmode, step, base), channels, growth,
                  gr_factor, bn_factor, bottleneck, reduction, head_channels)


def tiny_msdnet(in_shape=(1, 8, 8), num_classes: int = 5) -> MSDNet:
    """Three blocks of one layer, so that both scale drops and transitions occur (tests; milliseconds)."""
    return msdnet(in_shape, num_classes, blocks=3, step=1, base=1, channels=4, growth=2, head_channels=8)
