"""LeNet-5 / LeNet-5-Half (ZSKD's MNIST and Fashion-MNIST teacher and student)."""

from __future__ import annotations

import pytest
import torch

from metadyn.core.backbones.lenet import lenet5, lenet5_half
from metadyn.errors import InputError


def _params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_are_the_papers():
    # ZSKD Sec. 4.1: LeNet-5 61,706 parameters, LeNet-5-Half 35,820 (10 classes, 32x32 inputs)
    assert _params(lenet5((1, 28, 28), 10)) == 61706
    assert _params(lenet5_half((1, 28, 28), 10)) == 35820
    assert _params(lenet5((1, 32, 32), 10)) == 61706  # 32x32 inputs are not padded


def test_28x28_inputs_are_zero_padded_to_32x32():
    torch.manual_seed(0)
    a, b = lenet5((1, 28, 28), 10).eval(), lenet5((1, 32, 32), 10).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(a.forward_final(x), b.forward_final(torch.nn.functional.pad(x, (2, 2, 2, 2))))


def test_early_exits_add_only_their_heads():
    plain, multi = lenet5((1, 28, 28), 10), lenet5((1, 28, 28), 10, early_exits=[1, 0])
    assert plain.num_exits == 1 and multi.num_exits == 3
    assert _params(multi) == _params(plain) + (6 * 10 + 10) + (16 * 10 + 10)  # pooled linear heads
    out = multi(torch.rand(4, 1, 28, 28))
    assert [tuple(lg.shape) for lg in out.logits] == [(4, 10)] * 3


@pytest.mark.parametrize("bad", [{"filters": [6]}, {"filters": [6, 0]}, {"hidden": "120"}, {"early_exits": [2]},
                                 {"early_exits": [0, 0]}, {"early_exits": [True]},
                                 {"early_exits": [[0]]}])
def test_bad_options_are_input_errors(bad):
    with pytest.raises(InputError):
        lenet5((1, 28, 28), 10, **bad)


def test_too_large_inputs_for_the_flatten_are_fine_and_3_channels_work():
    net = lenet5((3, 40, 36), 7)
    assert net(torch.rand(2, 3, 40, 36)).logits[-1].shape == (2, 7)
