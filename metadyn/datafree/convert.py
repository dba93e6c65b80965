"""Data-free conversion: a trained static network becomes an early-exit one, trained on impressions only.

The teacher is frozen and cut into stages by :func:`~metadyn.core.backbones.attach.attach_exits`; its
final output stays bit-identical, and the new exit heads learn by distillation from that final output
on a transfer set (data impressions, or for comparison real images or noise). This is IMTA's
self-distillation with the final exit as every exit's teacher and no label term (there are no labels).
A smaller multi-exit student can instead be distilled from the teacher (:func:`distill_student`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from metadyn.core.backbones.attach import AttachedExits, HeadFactory, attach_exits
from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.callbacks import TrainState
from metadyn.core.losses import UNLABELED, distillation_loss, kd_loss
from metadyn.core.outputs import ExitOutput
from metadyn.core.train import fit
from metadyn.errors import InputError


def exit_distillation_loss(tau: float = 1.0) -> Callable[[ExitOutput, Tensor], Tensor]:
    """Every early exit distils the final exit's output: the core's self-distillation
    :func:`~metadyn.core.losses.distillation_loss` with ``teachers="last"`` and no label term (labels are
    ignored; the final exit, the frozen teacher, gets no loss).

    References:
        Li et al., "Improved Techniques for Training Adaptive Deep Networks" (IMTA), ICCV 2019, and
        Phuong & Lampert, "Distillation-Based Training for Multi-Exit Architectures", ICCV 2019, Sec. 3
        (L_dist with the teacher set T(m) = {final exit}).
    """

    def loss(out: ExitOutput, y: Tensor) -> Tensor:
        return distillation_loss(out, tau, teachers="last")

    return loss


def teacher_distillation_loss(tau: float = 1.0) -> Callable[[ExitOutput, Tensor], Tensor]:
    """``sum_k tau^2 KL(softmax(t / tau) || softmax(z_k / tau))`` over every exit of a student, where the
    batch "labels" ``y`` are the teacher's ``(B, C)`` logits.

    References:
        Nayak et al., ICML 2019, Eq. (4) (distillation on data impressions), applied to every exit.
    """

    def loss(out: ExitOutput, y: Tensor) -> Tensor:
        return torch.stack([kd_loss(z, y, tau) for z in out.logits]).sum()

    return loss


def train_exits(net: AttachedExits, x: Tensor, *, tau: float = 1.0, **fit_options) -> TrainState:
    """Train the exit heads of a frozen :class:`AttachedExits` on the inputs ``x`` alone, by
    :func:`exit_distillation_loss` through the core :func:`~metadyn.core.train.fit`.

    Args:
        net: from ``attach_exits(teacher, at, freeze=True)``; the trunk (the teacher) never changes.
        x: ``(N, C, H, W)`` transfer set (impressions, or real images or noise for comparison).
        tau: distillation temperature.
        **fit_options: passed to :func:`~metadyn.core.train.fit` (epochs, batch_size, lr, optimizer,
            augment, seed, device, checkpoint, progress, ...).
    """
    if not isinstance(net, AttachedExits) or not net.freeze:
        raise InputError("train_exits needs a frozen AttachedExits (attach_exits(..., freeze=True)): "
                         "its final exit is the teacher")
    if not tau > 0:
        raise InputError(f"distillation tau must be positive, got {tau}")
    y = torch.full((len(x),), UNLABELED, dtype=torch.long)
    return fit(net, (x, y), loss=exit_distillation_loss(tau), **fit_options)


def convert_to_early_exit(teacher: nn.Module, at: str | Sequence[str], x: Tensor, *, tau: float = 1.0,
                          head: HeadFactory | None = None, **fit_options) -> tuple[AttachedExits, TrainState]:
    """Freeze ``teacher``, attach exits after the modules ``at`` and train them on ``x`` only.

    The returned network's final exit is ``teacher(x)`` bit for bit (in eval mode), and ``teacher``'s
    parameters and buffers are unchanged.

    Example::

        imps = synthesize_impressions(teacher, 1280, in_shape=(1, 8, 8))
        net, state = convert_to_early_exit(teacher, ["stages.0", "stages.1"], imps.x, epochs=30)
    """
    example = x[:1].to(next(teacher.parameters()).device)
    net = attach_exits(teacher, at, example_input=example, head=head, freeze=True)
    return net, train_exits(net, x, tau=tau, **fit_options)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """``teacher(x)`` in eval mode by batches, ``(N, C)`` on the CPU (the teacher's modes are restored)."""
    p = next(teacher.parameters())
    modes = {m: m.training for m in teacher.modules()}
    teacher.eval()
    try:
        return torch.cat([teacher(x[s:s + batch_size].to(p.device, p.dtype)).float().cpu()
                          for s in range(0, len(x), batch_size)])
    finally:
        for m, mode in modes.items():
            m.training = mode


def distill_student(student: MultiExitNet, teacher: nn.Module, x: Tensor, *, tau: float = 1.0,
                    **fit_options) -> TrainState:
    """Train every exit of a (smaller) multi-exit ``student`` to match ``teacher``'s output on ``x``
    (:func:`teacher_distillation_loss`; the teacher's logits are computed once, so ``augment`` is not
    supported here).
    """
    if fit_options.get("augment") is not None:
        raise InputError("distill_student precomputes the teacher's outputs; augmentation is not supported")
    if not tau > 0:
        raise InputError(f"distillation tau must be positive, got {tau}")
    return fit(student, (x, teacher_logits(teacher, x)), loss=teacher_distillation_loss(tau), **fit_options)
