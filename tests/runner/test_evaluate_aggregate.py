"""Aggregation over seeds with diverged trainings, and the scoring of a diverged network (hand-computed)."""

import math

import pytest
import torch

from metadyn.core.evaluation import scored_accuracy
from metadyn.core.stats import aggregate
from metadyn.runner.evaluate import seed_pairs


def _rows(*accs, diverged=False):
    rows = [{"group": "g", "exit": i, "accuracy": a, "mflops": 1.0 + i} for i, a in enumerate(accs)]
    return [{**r, "diverged": True} for r in rows] if diverged else rows


def test_diverged_runs_count_with_what_they_scored_and_are_marked():
    runs = [_rows(0.9, 0.95), _rows(0.8, 0.85), _rows(0.1, 0.1, diverged=True), None]
    out = aggregate(runs, group="g")
    assert [r["exit"] for r in out] == [0, 1]
    e0 = out[0]
    assert e0["accuracy"] == pytest.approx((0.9 + 0.8 + 0.1) / 3)  # the scored divergence is in the mean
    mean = (0.9 + 0.8 + 0.1) / 3
    assert e0["accuracy_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in (0.9, 0.8, 0.1)) / 2))
    # n finished normally; diverged = the scored one and the unmeasured one: n + diverged = all 4 runs
    assert (e0["n"], e0["diverged"], e0["diverged_in_mean"]) == (2, 2, 1)
    assert "diverged" in e0 and e0["mflops"] == 1.0
    # without divergences nothing changes: no diverged_in_mean key, diverged 0
    clean = aggregate([_rows(0.5), _rows(0.7)])
    assert clean[0]["accuracy"] == pytest.approx(0.6) and (clean[0]["n"], clean[0]["diverged"]) == (2, 0)
    assert "diverged_in_mean" not in clean[0]
    # nothing measured at all: one row says so
    (empty,) = aggregate([None, None], group="g")
    assert empty["accuracy"] is None and (empty["n"], empty["diverged"]) == (0, 2)


def test_scored_accuracy_counts_non_finite_outputs_as_wrong():
    logits = torch.tensor([[2.0, 1.0], [float("nan"), 0.0], [0.0, float("inf")], [0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert scored_accuracy(logits, y) == 0.5  # rows 0 and 3 right; the NaN and inf rows are wrong
    assert scored_accuracy(torch.full((3, 4), float("nan")), torch.zeros(3, dtype=torch.long)) == 0.0


def test_seed_pairs_include_scored_divergences():
    runs = {("a", 0): {"rows": _rows(0.9)}, ("b", 0): {"rows": _rows(0.5)},
            ("a", 1): {"rows": _rows(0.1, diverged=True)}, ("b", 1): {"rows": _rows(0.6)},
            ("a", 2): None, ("b", 2): {"rows": _rows(0.7)}}
    (c,) = seed_pairs(runs, [("a", "b")], [0, 1, 2], [0])
    assert c["n"] == 2 and c["difference"] == pytest.approx(((0.9 - 0.5) + (0.1 - 0.6)) / 2)
