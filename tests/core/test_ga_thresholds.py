import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from metadyn.core.policies import budget_exit_counts, ga_thresholds
from metadyn.errors import InputError


def _case(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(k, n, generator=g)
    correct = torch.rand(k, n, generator=g) < torch.linspace(0.4, 0.9, k)[:, None] + 0.3 * (scores - 0.5)
    costs = torch.cumsum(torch.rand(k, generator=g, dtype=torch.float64) + 0.1, 0)
    return scores, correct, costs


def _outcome(scores, correct, costs, t):
    counts = budget_exit_counts(scores, t).double()
    first = (scores.double() >= t[:, None]).float()
    first[-1] = 1
    first = first.argmax(0)
    return float((counts * costs).sum() / scores.shape[1]), float(correct[first, torch.arange(scores.shape[1])]
                                                                 .double().mean())


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 5), n=st.integers(3, 60), seed=st.integers(0, 10_000), frac=st.floats(0.0, 1.2))
@example(k=2, n=23, seed=0, frac=0.0)  # a budget of exactly the first exit's cost: float means round above it
def test_ga_never_exceeds_its_budget_on_the_fitting_data(k, n, seed, frac):
    scores, correct, costs = _case(k, n, seed)
    budget = float(costs[0] + frac * (costs[-1] - costs[0]))
    t = ga_thresholds(scores, correct, costs.tolist(), budget, population=16, generations=15, seed=seed)
    counts = budget_exit_counts(scores, t).tolist()
    exact = sum(Fraction(c) * Fraction(float(v)) for c, v in zip(counts, costs.tolist()))
    assert exact <= Fraction(budget) * n  # the mean cost in exact arithmetic
    assert t[-1] == float("-inf")


def test_ga_finds_the_best_thresholds_of_a_small_problem():
    scores, correct, costs = _case(3, 12, 7)
    budget = float(0.5 * (costs[0] + costs[-1]))
    ladder = [sorted(scores[e].tolist()) + [float("inf")] for e in range(2)]
    outcomes = [_outcome(scores, correct, costs, torch.tensor([t0, t1, -torch.inf], dtype=torch.float64))
                for t0, t1 in itertools.product(*ladder)]  # every distinct policy: brute force
    best = max(a for c, a in outcomes if c <= budget)
    t = ga_thresholds(scores, correct, costs.tolist(), budget, population=32, generations=60, seed=0)
    cost, acc = _outcome(scores, correct, costs, t)
    assert cost <= budget and acc == pytest.approx(best)
    assert acc > min(a for c, a in outcomes if c <= budget)


def test_ga_is_seeded_and_checks_its_inputs():
    scores, correct, costs = _case(4, 50, 1)
    b = float(costs.mean())
    a1 = ga_thresholds(scores, correct, costs.tolist(), b, seed=3, generations=20)
    a2 = ga_thresholds(scores, correct, costs.tolist(), b, seed=3, generations=20)
    assert torch.equal(a1, a2)
    with pytest.raises(InputError, match="below the cheapest"):
        ga_thresholds(scores, correct, costs.tolist(), float(costs[0]) / 2)
    with pytest.raises(InputError, match="do not match"):
        ga_thresholds(scores, correct[:2], costs.tolist(), b)
