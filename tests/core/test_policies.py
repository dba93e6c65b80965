import math

import pytest
import torch

from metadyn.core.policies import (
    BudgetPolicy,
    EnsembleFallbackPolicy,
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


def _reference_find_threshold(scores, p):
    """Port of ``Tester.dynamic_eval_find_threshold`` (kalviny/MSDNet-PyTorch, adaptive_inference.py): the
    threshold loop on ``max_preds`` (here the scores), with its ``1e8`` / ``-1e8`` sentinels."""
    m, n = scores.shape
    _, sorted_idx = scores.sort(dim=1, descending=True)
    filtered = torch.zeros(n)
    T = torch.full((m,), 1e8, dtype=torch.float64)
    for k in range(m - 1):
        count = 0
        out_n = math.floor(n * float(p[k]))
        for i in range(n):
            ori_idx = sorted_idx[k][i]
            if filtered[ori_idx] == 0:
                count += 1
                if count == out_n:
                    T[k] = scores[k][ori_idx]
                    break
        filtered.add_(scores[k].ge(T[k]).type_as(filtered))
    T[m - 1] = -1e8
    return T


def test_fit_thresholds_tied_case_by_hand():
    # exit 0: three tied top scores; its quota (1) takes the tie, all three leave; exit 1's quota (2) exceeds
    # the one sample left: unreachable threshold, the sample goes on to the final exit (as the reference)
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.5], [0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    t = fit_thresholds(scores, torch.tensor([0.25, 0.5, 0.25]))
    assert t.tolist() == [1.0, math.inf, -math.inf]
    assert budget_exit_counts(scores, t).tolist() == [3, 0, 1]
    assert _reference_find_threshold(scores, [0.25, 0.5, 0.25])[:2].tolist() == [1.0, 1e8]


@pytest.mark.parametrize("seed", range(6))
def test_fit_thresholds_equals_the_reference_with_saturated_ties(seed):
    g = torch.Generator().manual_seed(seed)
    k, n = 5, 200
    scores = torch.rand(k, n, generator=g, dtype=torch.float64)
    scores[scores > 0.6] = 1.0  # saturated softmax: many samples tie at exactly 1.0
    for p in (0.05, 0.3, 0.7, 1.0, 1.5, 3.0):
        q = geometric_fractions(p, k)
        ours, ref = fit_thresholds(scores, q), _reference_find_threshold(scores, q)
        ref = torch.where(ref >= 1e8, math.inf, torch.where(ref <= -1e8, -math.inf, ref))
        assert torch.equal(ours, ref), (seed, p)


def test_ensemble_fallback_policy_equals_scans_inference_code():
    """A port of SCAN's inference.py loop: per sample, the first classifier (shallow to deep, the deepest
    included) whose softmax maximum exceeds its threshold predicts; else the mean of all classifiers' logits."""
    from metadyn.core.policies import EnsembleFallbackPolicy
    from metadyn.registry import POLICIES

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(300, 6, generator=g) * s for s in (1.0, 2.0, 3.0, 4.0)]
    thresholds = [0.9, 0.85, 0.8, 0.7]
    pol = POLICIES.get("ensemble_fallback")(thresholds)
    assert isinstance(pol, EnsembleFallbackPolicy)
    idx, chosen = pick_exits(logits, pol)
    ensemble = sum(logits) / len(logits)
    probs = [lg.softmax(-1) for lg in logits]
    for n in range(300):
        want_idx, want = 3, ensemble[n]
        for c in range(4):
            if float(probs[c][n].max()) >= thresholds[c]:  # the code's judge() uses '>': equal at ties only
                want_idx, want = c, logits[c][n]
                break
        assert int(idx[n]) == want_idx and torch.allclose(chosen[n], want)
    fell_back = ~torch.stack([p.amax(-1) >= t for p, t in zip(probs, thresholds)]).any(0)
    assert 0 < int(fell_back.sum()) < 300  # both cases occur
    # a last threshold of -inf never falls back: the plain confidence policy
    plain = pick_exits(logits, EnsembleFallbackPolicy(thresholds[:3] + [-math.inf]))
    ref = pick_exits(logits, ThresholdPolicy(thresholds[:3] + [-math.inf]))
    assert torch.equal(plain[0], ref[0]) and torch.equal(plain[1], ref[1])


@pytest.mark.parametrize("make, match", [
    (lambda: BudgetPolicy(-1), "exit_index must be a whole number"),
    (lambda: BudgetPolicy(1.5), "exit_index must be a whole number"),
    (lambda: BudgetPolicy(True), "exit_index must be a whole number"),
    (lambda: PatiencePolicy("2"), "patience must be a whole number"),
    (lambda: EnsembleFallbackPolicy("0.9"), "EnsembleFallbackPolicy thresholds must be a list"),
    (lambda: EnsembleFallbackPolicy([0.9, float("nan")]), "must not be NaN"),
    (lambda: EnsembleFallbackPolicy([]), "needs one threshold per exit"),
    (lambda: EnsembleFallbackPolicy([0.9, 0.8], temperatures=[1.0, 0.0]), "temperatures must be positive"),
])
def test_every_policy_refuses_bad_arguments(make, match):
    with pytest.raises(InputError, match=match):
        make()


def test_policies_refuse_a_network_with_other_exits():
    logits = [torch.randn(10, 4) for _ in range(3)]
    for pol, match in ((BudgetPolicy(3), "beyond the network's 3 exits"),
                       (EnsembleFallbackPolicy([0.9, 0.9]), "EnsembleFallbackPolicy has 2 thresholds")):
        with pytest.raises(InputError, match=match):
            pick_exits(logits, pol)
    assert pick_exits(logits, BudgetPolicy(1))[0].eq(1).all()  # a valid exit: every sample leaves there
