import math

import pytest
import torch

from metadyn.core.policies import (
    BudgetPolicy,
    PatiencePolicy,
    ThresholdPolicy,
    budget_exit_counts,
    confidence_exit,
    entropy,
    entropy_exit,
    fit_thresholds,
    fit_thresholds_for_budget,
    geometric_fractions,
    max_softmax,
    pick_exits,
)
from metadyn.errors import InputError


def test_scores_by_hand():
    z = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert torch.allclose(max_softmax(z), torch.tensor([0.5, 0.75]))
    h = entropy(z)
    assert torch.allclose(h, torch.tensor([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))
    assert confidence_exit(z, 0.6).tolist() == [False, True]
    assert entropy_exit(z, 0.6).tolist() == [False, True]


def test_threshold_policy_entropy_and_temperature():
    z = torch.tensor([[4.0, 0.0], [1.0, 0.0]])
    pol = ThresholdPolicy([-0.2, -math.inf], score="entropy")
    mask, _ = pol(0, z)
    assert mask.tolist() == (entropy(z) <= 0.2).tolist() == [True, False]
    # a high temperature flattens the softmax, so fewer samples are confident enough
    hot = ThresholdPolicy([0.9, 0.0], temperatures=[10.0, 1.0])
    assert hot(0, z)[0].tolist() == [False, False]
    assert ThresholdPolicy([0.9, 0.0])(0, z)[0].tolist() == [True, False]
    with pytest.raises(InputError, match="score"):
        ThresholdPolicy([0.5], score="margin")


def test_pick_exits_takes_first_allowed_exit_and_last_takes_rest():
    # 3 exits, 4 samples; confidence of sample n at exit k chosen by hand
    conf = torch.tensor([[0.9, 0.2, 0.2, 0.95], [0.9, 0.9, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    logits = [torch.stack([torch.log(c), torch.log(1 - c)], -1) for c in conf]  # max softmax = max(c, 1-c)
    conf_max = torch.maximum(conf, 1 - conf)
    assert torch.allclose(max_softmax(logits[0]), conf_max[0])
    idx, chosen = pick_exits(logits, ThresholdPolicy([0.85, 0.85, 0.0]))
    # sample 0: 0.9 at exit 0; 1: 0.8 then 0.9 -> exit 1; 2: 0.8, 0.8 -> final; 3: 0.95 -> exit 0
    assert idx.tolist() == [0, 1, 2, 0]
    assert torch.equal(chosen[1], logits[1][1])


def test_patience_policy():
    # predictions per exit for 3 samples: stable, flipping, stable from exit 1
    preds = torch.tensor([[0, 1, 2], [0, 0, 1], [0, 1, 1], [0, 0, 1]])  # (K=4, B=3)
    logits = [torch.nn.functional.one_hot(p, 3).float() * 5 for p in preds]
    idx, _ = pick_exits(logits, PatiencePolicy(patience=2))
    # sample 0: 0,0,0 -> count 2 at exit 2; sample 1: 1,0,1,0 -> never -> final 3; sample 2: 2,1,1,1 -> count 2 at 3
    assert idx.tolist() == [2, 3, 3]
    idx1, _ = pick_exits(logits, PatiencePolicy(patience=1))
    assert idx1.tolist() == [1, 3, 2]


def test_budget_policy():
    costs = [1.0, 2.0, 4.0]
    assert BudgetPolicy.from_budget(costs, 2.5).exit_index == 1
    assert BudgetPolicy.from_budget(costs, 10).exit_index == 2
    with pytest.raises(InputError, match="budget"):
        BudgetPolicy.from_budget(costs, 0.5)
    idx, _ = pick_exits([torch.zeros(5, 3)] * 3, BudgetPolicy(1))
    assert idx.tolist() == [1] * 5


def test_geometric_fractions_msdnet():
    q = geometric_fractions(0.5, 3)
    assert torch.allclose(q, torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64) / 0.875)
    assert torch.allclose(geometric_fractions(1.0, 4), torch.full((4,), 0.25, dtype=torch.float64))


def test_fit_thresholds_hits_target_fractions():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 1000, generator=g)
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    t = fit_thresholds(scores, q)
    assert t[-1] == -math.inf
    counts = budget_exit_counts(scores, t)
    # exactly floor(N q_k) leave at each non-final exit (continuous scores: no ties)
    assert counts[:3].tolist() == [400, 300, 200]
    assert counts.sum() == 1000


def test_fit_thresholds_for_budget_respects_budget():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(3, 500, generator=g)
    costs = [1.0, 2.0, 3.0]
    for budget in [1.2, 1.5, 2.0, 2.7]:
        t = fit_thresholds_for_budget(scores, costs, budget)
        counts = budget_exit_counts(scores, t).double()
        spent = float((counts * torch.tensor(costs, dtype=torch.float64)).sum() / 500)
        assert spent <= budget + 1e-9
        assert spent >= budget - 0.1  # and close to it
    with pytest.raises(InputError):
        fit_thresholds_for_budget(scores, costs, 0.5)
