"""freeze: no gradients, and eval mode whatever mode the parent is put in."""

import copy
import io

import torch
from torch import nn

from metadyn.core.freeze import freeze, freeze_untrainable, is_frozen, unfreeze


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.Dropout(0.5), nn.Conv2d(2, 2, 1)))


def test_a_frozen_part_stays_in_eval_and_keeps_its_statistics_under_parent_train():
    net = _net()
    assert freeze(net[1]) is net[1] and is_frozen(net[1]) and not is_frozen(net)
    net.train()
    assert net.training and net[0].training and net[2][0].training
    assert not net[1].training
    stats = net[1].running_mean.clone()
    net(torch.randn(4, 1, 5, 5))
    assert torch.equal(net[1].running_mean, stats)
    assert not any(p.requires_grad for p in net[1].parameters()) and net[0].weight.requires_grad
    net[1].train()  # even asked directly
    assert not net[1].training
    unfreeze(net[1])
    assert not is_frozen(net[1]) and all(p.requires_grad for p in net[1].parameters())
    net.train()
    assert net[1].training


def test_frozen_survives_deepcopy_and_pickling():
    net = _net()
    freeze(net[2])
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(net), torch.load(buf, weights_only=False)):
        twin.train()
        assert is_frozen(twin[2]) and not twin[2].training and not twin[2][0].training and twin[0].training
        twin[2].train()
        assert not twin[2].training
    net.train()
    assert not net[2].training  # the copies' flags are their own


def test_freeze_untrainable_freezes_the_largest_parts_without_trainable_parameters():
    net = _net()
    net[1].requires_grad_(False)
    freeze_untrainable(net)
    assert is_frozen(net[1]) and is_frozen(net[2][0])  # parameter-free dropout inside a trainable block
    assert not is_frozen(net) and not is_frozen(net[0]) and not is_frozen(net[2]) and not is_frozen(net[2][1])
    net.train()
    assert net[0].training and not net[1].training and not net[2][0].training and net[2][1].training
