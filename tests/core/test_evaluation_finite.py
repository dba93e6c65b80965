"""evaluate_exits refuses a network whose logits are not finite, naming the split and the exit."""

import pytest
import torch

from metadyn.core.backbones.mlp import mlp_exits
from metadyn.core.evaluation import evaluate_exits
from metadyn.data import load_classification
from metadyn.errors import InputError


def test_non_finite_logits_are_refused_with_split_and_exit():
    data = load_classification("digits", seed=0)
    torch.manual_seed(0)
    net = mlp_exits(data.in_shape, data.num_classes, hidden=(16, 16))
    assert len(evaluate_exits(net, data, calibrate=False).rows) == len(net.heads)  # finite: fine
    with torch.no_grad():
        net.heads[-1].fc.weight[0, 0] = float("inf")  # any sample with a non-zero first feature overflows
    with pytest.raises(InputError, match=r"model: exit 1 gives non-finite \(NaN or inf\) logits on val"):
        evaluate_exits(net, data, calibrate=False)
