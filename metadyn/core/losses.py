"""Training losses over :class:`~metadyn.core.outputs.ExitOutput`.

A loss is a callable ``loss(out: ExitOutput, y: Tensor) -> Tensor``; labels equal to ``-1`` mark
unlabeled samples (semi-supervised methods use them, supervised terms ignore them). Each method is a
factory registered in :data:`metadyn.registry.METHODS` that takes its hyper-parameters and returns
such a callable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metadyn.core.outputs import ExitOutput
from metadyn.errors import InputError
from metadyn.registry import METHODS

UNLABELED = -1


def labeled_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy averaged over the labeled samples (``y != -1``); 0 when there are none."""
    total = F.cross_entropy(logits, y, ignore_index=UNLABELED, reduction="sum")
    return total / (y != UNLABELED).sum().clamp(min=1)


def exitwise_ce(out: ExitOutput, y: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Weighted sum of every exit's cross-entropy, ``sum_k w_k CE(z_k, y)`` (w_k = 1 by default).

    References:
        Huang et al., MSDNet, ICLR 2018, Sec. 4 ("the cumulative loss of all classifiers");
        Kaya et al., "Shallow-Deep Networks", ICML 2019 (weighted exit losses).
    """
    k = out.num_exits
    if weights is not None and len(weights) != k:
        raise InputError(f"exit weights has {len(weights)} entries for a network with {k} exits")
    w = [1.0] * k if weights is None else [float(v) for v in weights]
    return torch.stack([wk * labeled_ce(lg, y) for wk, lg in zip(w, out.logits)]).sum()


@METHODS.register("ce")
def ce_loss(weights: Sequence[float] | None = None):
    """Exit-wise cross-entropy (:func:`exitwise_ce`) with optional per-exit weights."""

    def loss(out: ExitOutput, y: Tensor) -> Tensor:
        return exitwise_ce(out, y, weights)

    return loss


def kd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """Knowledge-distillation loss ``tau^2 * KL(softmax(t / tau) || softmax(s / tau))``, batch mean.

    The teacher logits are detached (no gradient flows into the teacher). The ``tau^2`` factor keeps
    gradient magnitudes comparable across temperatures.

    References:
        Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, Sec. 2.
    """
    log_p_s = F.log_softmax(student / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.detach() / tau, dim=-1)
    return tau * tau * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
