import math

import pytest
import torch
import torch.nn.functional as F

from metadyn.core.backbones.mlp import MLPExits
from metadyn.core.backbones.resnet import resnet_exits
from metadyn.core.calibration import ece, fit_temperature, reliability
from metadyn.core.flops import count_flops, exit_costs, expected_cost
from metadyn.core.losses import ce_loss, exitwise_ce
from metadyn.core.outputs import ExitOutput
from metadyn.errors import InputError


def test_exit_costs_mlp_by_hand():
    m = MLPExits(in_dim=8, num_classes=3, hidden=(4, 6))
    c = exit_costs(m, (8,))
    # linear layers: 2 * in * out FLOPs
    assert c.stem == 0
    assert c.stages == [2 * 8 * 4, 2 * 4 * 6]
    assert c.heads == [2 * 4 * 3, 2 * 6 * 3]
    assert c.cumulative == [64 + 24, 64 + 24 + 48 + 36]
    assert c.full == 64 + 48 + 36
    assert expected_cost(torch.tensor([0, 1, 1, 0]), c.cumulative) == pytest.approx((88 + 172) / 2)


def test_exit_costs_resnet_conv_by_hand():
    m = resnet_exits(in_shape=(3, 8, 8), num_classes=10, depth=8, width=4)
    c = exit_costs(m, (3, 8, 8))
    assert c.stem == 2 * (3 * 9) * 4 * 64  # 3x3 conv 3->4 channels at 8x8
    assert c.stages[0] == 2 * 2 * (4 * 9) * 4 * 64  # two 3x3 convs 4->4 at 8x8
    assert c.heads[-1] == 2 * 16 * 10
    assert count_flops(lambda x: x + 1, torch.zeros(3)) == 0  # element-wise ops are not counted


def test_exitwise_ce_by_hand_and_unlabeled():
    z0 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    z1 = torch.tensor([[0.5, 0.5], [3.0, 0.0]])
    y = torch.tensor([0, 1])
    out = ExitOutput([z0, z1], [z0, z1])
    want = F.cross_entropy(z0, y) + 0.5 * F.cross_entropy(z1, y)
    assert torch.allclose(exitwise_ce(out, y, [1.0, 0.5]), want)
    assert torch.allclose(ce_loss()(out, y), F.cross_entropy(z0, y) + F.cross_entropy(z1, y))
    # unlabeled samples (-1) are ignored; an all-unlabeled batch gives 0, not NaN
    y_semi = torch.tensor([0, -1])
    assert torch.allclose(exitwise_ce(out, y_semi), F.cross_entropy(z0[:1], y[:1]) + F.cross_entropy(z1[:1], y[:1]))
    assert exitwise_ce(out, torch.tensor([-1, -1])).item() == 0.0
    with pytest.raises(InputError, match="weights"):
        exitwise_ce(out, y, [1.0])


def test_temperature_recovers_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g) * 3
    y = torch.distributions.Categorical(logits=true_logits).sample()
    # an over-confident model reports 2.5x the calibrated logits
    t = fit_temperature(true_logits * 2.5, y)
    assert t == pytest.approx(2.5, rel=0.08)
    assert ece(true_logits * 2.5 / t, y) < ece(true_logits * 2.5, y)


def test_ece_and_reliability_by_hand():
    # two samples, confidence 0.7 (correct) and 0.7 (wrong): acc 0.5, conf 0.7 -> ECE 0.2
    z = torch.tensor([[math.log(7 / 3), 0.0], [math.log(7 / 3), 0.0]])
    y = torch.tensor([0, 1])
    assert ece(z, y, n_bins=10) == pytest.approx(0.2, abs=1e-6)
    r = reliability(z, y, n_bins=4)
    assert r["count"] == [0.0, 0.0, 2.0, 0.0]  # 0.7 falls in (0.5, 0.75]
    assert r["accuracy"][2] == pytest.approx(0.5)
    assert r["confidence"][2] == pytest.approx(0.7)


def test_kd_loss_by_hand_and_teacher_detached():
    from metadyn.core.losses import kd_loss

    s = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0]], requires_grad=True)
    tau = 2.0
    ps, pt = (s / tau).softmax(-1), (t / tau).softmax(-1)
    want = tau**2 * (pt * (pt.log() - ps.log())).sum()
    got = kd_loss(s, t, tau)
    assert torch.allclose(got, want)
    got.backward()
    assert t.grad is None and s.grad is not None
    assert kd_loss(t.detach(), t.detach()).item() == pytest.approx(0.0, abs=1e-7)
