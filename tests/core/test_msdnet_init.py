"""MSDNet's initialisation is the authors' Torch release's (He), not the PyTorch port's effective default."""

import math

import torch
from torch import nn

from metadyn.core.backbones.msdnet import msdnet


def test_msdnet_convs_are_he_initialised_like_the_torch_release():
    torch.manual_seed(0)
    net = msdnet((3, 32, 32), 10, blocks=3, step=2, base=2, channels=8, growth=4, head_channels=32)
    ratios, default_ratios = [], []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels  # models/msdnet.lua: ConvInit
            ratios.append((m.weight.detach() / math.sqrt(2.0 / n)).flatten())
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            default_ratios.append(math.sqrt(1.0 / (3 * fan_in)) / math.sqrt(2.0 / n))  # PyTorch's default std
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
    r = torch.cat(ratios)
    assert r.numel() > 10_000 and abs(float(r.std()) - 1.0) < 0.03 and abs(float(r.mean())) < 0.03
    # PyTorch's default (what the port's unreached _init_weights leaves) would give a clearly different spread
    assert sum(default_ratios) / len(default_ratios) < 0.9
