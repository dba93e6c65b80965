import math

import pytest
import torch

from metadyn.attention import attention_map, attention_transfer
from metadyn.errors import InputError


def test_attention_map_is_the_normalised_channel_sum_of_powers():
    a = torch.tensor([[[[1.0, 2.0]], [[-1.0, 0.0]]]])  # (1, 2, 1, 2)
    q = torch.tensor([[1.0 + 1.0, 4.0 + 0.0]])  # sum_c |A_c|^2
    assert torch.allclose(attention_map(a), q / q.norm())
    q1 = torch.tensor([[2.0, 2.0]])  # p = 1
    assert torch.allclose(attention_map(a, p=1), q1 / q1.norm())


def test_attention_transfer_equals_a_hand_computed_value():
    # sample 0: student Q = [2, 2] -> [1/sqrt2, 1/sqrt2]; teacher Q = [0, 4] -> [0, 1]
    # distance = sqrt(1/2 + (1/sqrt2 - 1)^2) = sqrt(2 - sqrt2); sample 1: identical maps, distance 0
    student = torch.tensor([[[[1.0, 1.0]], [[1.0, -1.0]]], [[[0.0, 3.0]], [[0.0, 0.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[0.0, 2.0]]], [[[0.0, -5.0]]]], requires_grad=True)  # (2, 1, 1, 2): C may differ
    d = attention_transfer(student, teacher)
    assert d.item() == pytest.approx(math.sqrt(2 - math.sqrt(2)) / 2, rel=1e-6)
    d.backward()
    assert teacher.grad is None  # the teacher is the target


def test_attention_transfer_is_zero_for_a_rescaled_map_and_rejects_size_mismatch():
    a = torch.randn(3, 4, 5, 5)
    assert attention_transfer(a, 7 * a).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InputError, match="spatial size"):
        attention_transfer(a, torch.randn(3, 4, 4, 4))
