"""Few-shot evaluation per exit: accuracy with a 95% confidence interval over episodes, and the cost
model of anytime inference after adaptation.

References:
    Finn et al., ICML 2017 and Snell et al., NeurIPS 2017 report mean accuracy over 600 test episodes
    with a 95% confidence interval (1.96 standard errors), as done here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metadyn.core.flops import ExitCosts


@dataclass
class FewShotResult:
    """Attributes:
    accuracy: ``(E, K)`` query accuracy of each episode at each exit.
    logits: one ``(E*Q, N)`` tensor per exit: every query's logits after adaptation.
    labels: ``(E*Q,)`` query labels.
    """

    accuracy: Tensor
    logits: list[Tensor]
    labels: Tensor

    def mean_ci(self) -> list[tuple[float, float]]:
        """Per exit: mean accuracy and the half-width of its 95% confidence interval."""
        return [mean_ci(self.accuracy[:, i]) for i in range(self.accuracy.shape[1])]


def mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` of per-episode values."""
    v = values.double()
    n = v.numel()
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(v.mean()), half


def evaluate_episodes(learner, sampler, episodes: int, start: int = 0, steps=None,
                      device: torch.device | str = "cpu") -> FewShotResult:
    """Adapt ``learner`` (anything with ``predict(sx, sy, qx, steps) -> [logits per exit]``) on the
    episodes ``start .. start + episodes - 1`` of ``sampler`` and score every exit on the queries."""
    accs, logits, labels = [], [], []
    for i in range(start, start + episodes):
        ep = sampler.episode(i).to(device)
        out = learner.predict(ep.support_x, ep.support_y, ep.query_x, steps)
        accs.append(torch.stack([(z.argmax(-1) == ep.query_y).double().mean() for z in out]).cpu())
        logits.append([z.cpu() for z in out])
        labels.append(ep.query_y.cpu())
    k = len(logits[0])
    return FewShotResult(torch.stack(accs), [torch.cat([lg[i] for lg in logits]) for i in range(k)],
                         torch.cat(labels))


def anytime_costs(costs: ExitCosts, own_trunk: Sequence[bool]) -> list[float]:
    """Cumulative FLOPs of leaving at each exit after evaluating every earlier one.

    An exit whose trunk prefix was adapted for it alone (``own_trunk[i]``: exits as separate tasks)
    must recompute the stem and stages ``0..i`` with its own weights; exits that share a trunk (joint
    MAML, ANIL, prototypical networks) extend one trunk computation stage by stage, as in
    :func:`metadyn.core.flops.ExitCosts.cumulative`.
    """
    total, shared_upto, out = 0, -1, []
    for i, own in enumerate(own_trunk):
        if own:
            total += costs.stem + sum(costs.stages[: i + 1])
        else:
            total += (costs.stem if shared_upto < 0 else 0) + sum(costs.stages[shared_upto + 1 : i + 1])
            shared_upto = i
        total += costs.heads[i]
        out.append(total)
    return out
