"""Training losses over :class:`~metadyn.core.outputs.ExitOutput`.

A loss is a callable ``loss(out: ExitOutput, y: Tensor) -> Tensor``; labels equal to ``-1`` mark
unlabeled samples (semi-supervised methods use them, supervised terms ignore them). Each method is a
factory registered in :data:`metadyn.registry.METHODS` that takes its hyper-parameters and returns
such a callable.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from metadyn.core import distributed
from metadyn.core.callbacks import Callback, TrainState
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
    w = [1.0] * k if weights is None else [float(v) for v in weights]  # checked where the loss is built
    return torch.stack([wk * labeled_ce(lg, y) for wk, lg in zip(w, out.logits)]).sum()


def check_exit_weights(weights: Sequence[float] | None) -> None:
    """Per-exit loss weights, checked once where a loss is built: finite, non-negative, not all zero (a negative
    weight rewards a wrong exit without bound, all zeros train nothing; both ran to chance accuracy with exit
    status 0)."""
    if weights is None:
        return
    if isinstance(weights, str | bytes) or not isinstance(weights, Sequence) or any(
            isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < math.inf for v in weights) \
            or not any(v > 0 for v in weights):
        raise InputError(f"exit weights must be finite, non-negative numbers, not all zero, got {str(weights)[:80]}")


@METHODS.register("ce")
def ce_loss(weights: Sequence[float] | None = None):
    """Exit-wise cross-entropy (:func:`exitwise_ce`) with optional per-exit weights."""
    check_exit_weights(weights)

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
    if isinstance(tau, numbers.Real) and not 0 < tau < math.inf:
        raise InputError(f"kd_loss needs a positive, finite temperature, got {tau!r}")
    log_p_s = F.log_softmax(student / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.detach() / tau, dim=-1)
    return tau * tau * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


# --------------------------------------------------------------------------- self-distillation (IMTA)


def distillation_loss(out: ExitOutput, tau: float | Tensor = 3.0, teachers: str = "last",
                      reduction: str = "sum") -> Tensor:
    """Self-distillation between exits, ``L_dist = sum_{m<M} 1/|T(m)| sum_{t in T(m)} l^tau(p_t, p_m)``.

    ``M`` is the number of exits; the teachers ``T(m)`` of exit ``m`` are the final exit only (``"last"``, the
    paper's and its released code's choice) or all later exits (``"later"``); the final exit has no teacher.
    ``l^tau`` is :func:`kd_loss`: ``tau^2 * KL(p_t^tau || p_m^tau)`` with the teacher detached — the paper
    writes the cross-entropy of the softened distributions, which differs from the KL by the teacher's
    entropy, a constant without gradient. Every sample counts, labeled or not. ``reduction="mean"`` divides
    the sum by ``M`` (metadyn's earlier variant, which gave distillation ``1/M`` of the paper's weight).
    ``tau`` may be a 0-dim tensor (the adaptive temperature of :class:`AdaptiveTemperature`).

    References:
        Phuong & Lampert, "Distillation-Based Training for Multi-Exit Architectures", ICCV 2019, Sec. 3
        (``L_dist``, the teacher sets, the semi-supervised use of unlabeled samples); released code
        ``mary-phuong/multiexit-distillation``, ``main.py``, ``DistillationBasedLoss``.
    """
    if teachers not in ("later", "last"):
        raise InputError(f"unknown distillation teachers {teachers!r}; choose from: later, last")
    if reduction not in ("sum", "mean"):
        raise InputError(f"unknown distillation reduction {reduction!r}; choose from: sum, mean")
    m = out.num_exits
    total = out.logits[0].new_zeros(())
    for s in range(m - 1):
        ts = range(s + 1, m) if teachers == "later" else (m - 1,)
        total = total + torch.stack([kd_loss(out.logits[s], out.logits[t], tau) for t in ts]).mean()
    return total / m if reduction == "mean" else total


class AdaptiveTemperature(Callback):
    """Phuong & Lampert's adaptive distillation temperature, as a loss's state and a training callback.

    ``tau`` starts at ``start``; after every training step (a loss call with gradients enabled) whose teacher
    — the final exit — has a batch-mean maximal softened probability ``mean_n max_c softmax(z_M / tau)_c``
    above ``maxprob``, ``tau`` is multiplied by ``factor``. So the temperature rises until the softened
    teacher is no longer confident on average, and stays there. ``tau`` is a 0-dim float64 tensor on the
    logits' device (updated without a host synchronisation); the callback checkpoints it and records it in
    the epoch history (``"tau"``).

    References:
        Phuong & Lampert, ICCV 2019, Sec. 3 (temperature); the released ``DistillationBasedLoss``
        (``T = 1.0``, ``Tmult = 1.05``, ``maxprob = 0.5`` in ``train_cifar.py``), ported exactly.
    """

    def __init__(self, start: float = 1.0, maxprob: float = 0.5, factor: float = 1.05):
        if not start > 0 or not factor >= 1 or not 0 < maxprob <= 1:
            raise InputError(f"adaptive temperature needs start > 0, factor >= 1 and 0 < maxprob <= 1, got "
                             f"{start}, {factor}, {maxprob}")
        self.tau = torch.tensor(float(start), dtype=torch.float64)
        self.maxprob, self.factor = float(maxprob), float(factor)

    def current(self, device: torch.device) -> Tensor:
        if self.tau.device != device:
            self.tau = self.tau.to(device)
        return self.tau

    def update(self, teacher_logits: Tensor) -> None:
        """One step of the schedule on the teacher's logits of the batch just used (no gradient)."""
        tau = self.current(teacher_logits.device)
        with torch.no_grad():
            confidence = (teacher_logits.detach().double() / tau).softmax(-1).amax(-1).mean()
            if distributed.active():  # under torchrun: the global batch's confidence, so every rank keeps one tau
                confidence = distributed.mean_over_ranks(confidence)
            self.tau = torch.where(confidence > self.maxprob, tau * self.factor, tau)

    def on_epoch_end(self, state: TrainState) -> None:
        state.history[-1]["tau"] = float(self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {"tau": float(self.tau)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = torch.tensor(float(state["tau"]), dtype=torch.float64)


def _stage_params(model, x: Tensor) -> list[list[nn.Parameter]]:
    """The trainable parameters each stage of a MultiExitNet uses first (the stem's count as stage 0's).

    Found with autograd on ``x``: stage ``j`` runs on a detached copy of State ``j - 1`` and the parameters
    its output depends on are its own. The model runs in eval mode (no BatchNorm statistics change).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    groups: list[list[nn.Parameter]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            state = model.stem(x)
            for j in range(model.num_exits):
                if j > 0:
                    state = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
                state = model.stage(j, state)
                leaves = [t for t in tree_leaves(state) if isinstance(t, Tensor) and t.requires_grad]
                grads = (torch.autograd.grad(torch.stack([t.sum() for t in leaves]).sum(), params, allow_unused=True)
                         if leaves else [None] * len(params))
                group = [p for p, g in zip(params, grads) if g is not None and id(p) not in seen]
                seen.update(id(p) for p in group)
                groups.append(group)
    finally:
        model.train(was_training)
    return groups


class GradientEquilibrium(Callback):
    """Gradient equilibrium (GE) as a training callback for :func:`metadyn.core.train.fit`.

    GE rescales gradients where exit ``i`` (1-based, ``K`` exits) branches off the trunk: the gradient from
    classifier ``i`` by ``1/(K-i+1)`` and the gradient coming back from the later blocks by
    ``(K-i)/(K-i+1)`` (the released code: ``gradient_rescale(x, 1/(K-i))`` before classifier ``i`` and
    ``gradient_rescale(x, K-i-1)`` after it, 0-based ``i``). Along the chain of stages these factors
    telescope: any loss that depends on stage ``j`` (0-based) reaches stage ``j``'s parameters scaled by
    exactly ``1/(K-j)``, whatever exit it comes from, while exit heads keep their full gradient. So this
    callback multiplies the gradient of stage ``j``'s parameters (the stem counting as stage 0) by
    ``1/(K-j)`` after each backward pass — no extra autograd nodes. This relies on the MultiExitNet
    contract: stage ``i`` reads only State ``i-1`` and exit ``i`` only State ``i``.

    As in the paper, every tensor of the State is rescaled; the released MSDNet code rescales only the
    coarsest scale (the one its classifiers read), which leaves the finer scales' gradients unscaled.

    The stage of each parameter is found once, on the first batch (two samples, eval mode); it depends on the
    model only, so a resumed run finds it again and the callback has no state to checkpoint.

    References:
        Li, Zhang, Qi, Yang & Huang, "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019,
        Sec. 3.1 (gradient equilibrium) and Fig. 3; code ``kalviny/IMTA``, ``models/msdnet_ge.py``.
    """

    def __init__(self) -> None:
        self.scales: list[tuple[nn.Parameter, float]] | None = None

    def setup(self, model, x: Tensor) -> None:
        k = model.num_exits
        self.scales = [(p, 1.0 / (k - j)) for j, group in enumerate(_stage_params(model, x)) for p in group
                       if k - j > 1]

    def on_after_backward(self, state) -> None:
        if self.scales is None:
            self.setup(state.model, state.batch[0][:2])
        with torch.no_grad():
            for p, s in self.scales:
                if p.grad is not None:
                    p.grad.mul_(s)



@METHODS.register("imta")
def imta_loss(tau: float | str = "adaptive", teachers: str = "last", weights: Sequence[float] | None = None,
              equilibrium: bool = True, reduction: str = "sum", tau_start: float = 1.0, maxprob: float = 0.5,
              tau_factor: float = 1.05):
    """Exit-wise cross-entropy plus self-distillation, trained with gradient equilibrium.

    ``loss = sum_k w_k CE(z_k, y) + L_dist`` (:func:`exitwise_ce`, :func:`distillation_loss`): Phuong &
    Lampert's objective (classification loss of every exit plus the distillation of every early exit from the
    final one), with their adaptive temperature by default (``tau="adaptive"``: :class:`AdaptiveTemperature`
    from ``tau_start``, times ``tau_factor`` after each step whose softened teacher has mean max-probability
    above ``maxprob``); a number fixes ``tau``. Unlabeled samples (``y = -1``) enter ``L_dist`` only — the
    semi-supervised variant. The returned loss has a ``callbacks(model)`` method giving
    ``[GradientEquilibrium()]`` (none with ``equilibrium=False``) followed by the temperature's callback when
    it is adaptive; :func:`~metadyn.runner.specs.train` passes them to :func:`~metadyn.core.train.fit`.

    The released code (``DistillationBasedLoss``) writes each early exit's term as
    ``(1 - C) CE + C tau^2 CE(p_M^tau, p_m^tau)`` and the final exit's as ``(1 - C) CE`` with ``C = 0.5``, and
    multiplies the sum by ``global_scale = 2 * 5 / M``: that is ``(5 / M) (L_cls + L_dist)``, this loss up to a
    constant factor (equal for five exits). metadyn's earlier variant is ``tau=3.0, teachers="later",
    reduction="mean"`` (fixed temperature, all later exits as teachers, ``L_dist / M``).

    Not included: IMTA's inline subnetwork collaboration (an architectural change) and its two-step
    schedule (GE first, then distillation from the frozen GE network's final exit); both are trained together.

    References:
        Li et al., ICCV 2019 (GE, Sec. 3.1); Phuong & Lampert, ICCV 2019 (``L_cls + L_dist``, the temperature,
        Sec. 3); code ``mary-phuong/multiexit-distillation`` (``main.py``, ``train_cifar.py``).
    """
    if teachers not in ("later", "last"):
        raise InputError(f"unknown distillation teachers {teachers!r}; choose from: later, last")
    if reduction not in ("sum", "mean"):
        raise InputError(f"unknown distillation reduction {reduction!r}; choose from: sum, mean")
    check_exit_weights(weights)
    adaptive = None
    if tau == "adaptive":
        adaptive = AdaptiveTemperature(tau_start, maxprob, tau_factor)
    elif isinstance(tau, str) or isinstance(tau, bool) or not tau > 0:
        raise InputError(f"distillation tau must be a positive number or 'adaptive', got {tau!r}")

    def loss(out: ExitOutput, y: Tensor) -> Tensor:
        t = tau if adaptive is None else adaptive.current(out.logits[-1].device)
        value = exitwise_ce(out, y, weights) + distillation_loss(out, t, teachers, reduction)
        if adaptive is not None and torch.is_grad_enabled():
            adaptive.update(out.logits[-1])
        return value

    loss.temperature = adaptive
    loss.callbacks = lambda model: ([GradientEquilibrium()] if equilibrium else []) + (
        [adaptive] if adaptive is not None else [])
    return loss


# --------------------------------------------------------------------------- BYOT / SCAN


def byot_distillation(out: ExitOutput, y: Tensor, alpha: float = 0.5, tau: float = 3.0, lam: float = 1e-4,
                      final_weight: float | None = None) -> Tensor:
    """``sum_i (1-alpha) CE(q_i, y) + alpha tau^2 KL(q_C^tau || q_i^tau) + lam ||F_i - F_C||^2`` over exits.

    ``q_C``/``F_C`` are the final exit's logits/features, detached (the deepest classifier teaches, as in
    both released codes); for ``i = C`` only the cross-entropy term remains, weighted ``1 - alpha`` as the
    paper's sum over all classifiers states it. Both released codes weight the deepest classifier's
    cross-entropy by 1 (``loss += criterion(outputs[0], labels)``): ``final_weight=1.0`` does that.
    ``||F_i - F_C||^2`` is the squared L2 distance per sample, averaged over the batch — so ``F_i`` must have
    the final exit's feature size (the bottleneck exit branches of
    :func:`metadyn.core.backbones.scan.scan_exits` give it).
    Unlabeled samples (``y = -1``) enter only the distillation and feature terms.

    References:
        Zhang et al., "Be Your Own Teacher: Improve the Performance of Convolutional Neural Networks via
        Self Distillation", ICCV 2019, Sec. 3.2 (Eq. 1-3); Zhang et al., "SCAN: A Scalable Neural Networks
        Framework Towards Compact and Efficient Models", NeurIPS 2019, Sec. 3.2 (the same loss); codes
        ``ArchipLab-LinfengZhang/pytorch-self-distillation-final`` and ``.../pytorch-scalable-neural-networks``
        (``train.py``: deepest classifier's CE weighted 1).
    """
    k = out.num_exits
    teacher, target = out.logits[-1].detach(), out.features[-1].detach()
    total = (1 - alpha if final_weight is None else final_weight) * labeled_ce(out.logits[-1], y)
    for i in range(k - 1):
        total = total + (1 - alpha) * labeled_ce(out.logits[i], y) + alpha * kd_loss(out.logits[i], teacher, tau)
        if lam:
            f = out.features[i]
            if f.shape[1:] != target.shape[1:]:
                raise InputError(f"byot feature loss: exit {i} features {tuple(f.shape[1:])} differ from the final "
                                 f"exit's {tuple(target.shape[1:])}; use the 'scan' backbone (bottleneck exit "
                                 "branches) or lam=0")
            total = total + lam * (f - target).square().flatten(1).sum(1).mean()
    return total


@METHODS.register("byot", example=lambda: _tiny_byot_net())
def byot_loss(alpha: float = 0.5, tau: float = 3.0, lam: float = 1e-4, final_weight: float | None = None):
    """BYOT / SCAN self-distillation (:func:`byot_distillation`). SCAN = this loss on the ``scan`` backbone
    (attention + bottleneck exit branches) with genetic-algorithm thresholds
    (:func:`metadyn.core.policies.ga_thresholds`) and, at inference, the ensemble fallback
    (:class:`metadyn.core.policies.EnsembleFallbackPolicy`). ``final_weight``: the deepest classifier's
    cross-entropy weight (default the paper's ``1 - alpha``; ``1.0`` as both released codes)."""
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"byot alpha must lie in [0, 1], got {alpha}")
    if not tau > 0:
        raise InputError(f"byot tau must be positive, got {tau}")
    if final_weight is not None and (isinstance(final_weight, bool) or not final_weight >= 0):
        raise InputError(f"byot final_weight must be a non-negative number, got {final_weight!r}")

    def loss(out: ExitOutput, y: Tensor) -> Tensor:
        return byot_distillation(out, y, alpha, tau, lam, final_weight)

    return loss


def _tiny_byot_net():
    """A tiny network with BYOT's bottleneck exit branches (the registry's example for ``byot``)."""
    from metadyn.core.backbones.scan import scan_exits

    return scan_exits((1, 8, 8), 5, "resnet", {"depth": 8, "exits": [1, 2, 3], "width": 4}, attention=False)
