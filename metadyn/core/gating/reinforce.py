"""Policy-gradient maths of the gating methods: Bernoulli log-probabilities, the REINFORCE surrogate, and
SkipNet's per-gate returns. Pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor


def bernoulli_log_prob(probs: Tensor, actions: Tensor, eps: float = 1e-8) -> Tensor:
    """``log pi(a) = a log p + (1 - a) log(1 - p)`` elementwise, ``(B, K)``."""
    return actions * torch.log(probs.clamp_min(eps)) + (1 - actions) * torch.log((1 - probs).clamp_min(eps))


def reinforce_loss(log_prob: Tensor, advantage: Tensor, learn: Tensor | None = None) -> Tensor:
    """REINFORCE surrogate ``-(1/B) sum_b sum_k learn_k * log pi(a_bk) * A_bk``; its gradient is the
    score-function estimate of ``-grad E[R]``.

    Args:
        log_prob: ``(B, K)`` log-probabilities of the taken actions (with gradient).
        advantage: ``(B, K)`` per-decision returns or ``(B,)`` one per sample (treated as constants).
        learn: ``(K,)`` bool, the decisions that are learnt (others contribute nothing); None = all.

    References:
        Williams, "Simple statistical gradient-following algorithms ...", Machine Learning 1992 (REINFORCE).
    """
    adv = advantage.detach()
    if adv.dim() == 1:
        adv = adv[:, None]
    terms = log_prob * adv
    if learn is not None:
        terms = terms * learn.to(terms.dtype)
    return -terms.sum(1).mean()


def skipnet_returns(actions: Tensor, task_loss: Tensor, alpha: float) -> Tensor:
    """SkipNet's return of every gate: ``r_i = -L + (alpha / N) sum_{j >= i} R_j`` with the skipping reward
    ``R_j = (1 - g_j) C_j``, ``C_j = 1`` (all blocks cost the same, as in the paper).

    Args:
        actions: ``(B, N)`` 0/1 gate decisions (1 = block ran).
        task_loss: ``(B,)`` per-sample prediction loss ``L(y_hat, y)``.
        alpha: weight of the skipping reward.

    Returns:
        ``(B, N)`` returns, the reward-to-go of each decision (undiscounted).

    References:
        Wang et al., SkipNet, ECCV 2018, Sec. 3.3, Eq. 4 (hybrid objective ``min E[L - (alpha/N) sum_i R_i]``)
        and Eq. 5 (REINFORCE gradient with ``r_i = -L + (alpha/N) sum_{j=i}^N R_j``).
    """
    skipped = 1 - actions.detach()
    to_go = skipped.flip(1).cumsum(1).flip(1)  # sum_{j >= i} (1 - g_j)
    return -task_loss.detach()[:, None] + alpha / actions.shape[1] * to_go
