"""Data-free conversion: a trained static network becomes an early-exit one, trained on impressions only.

The teacher is frozen and cut into stages by :func:`~metadyn.core.backbones.attach.attach_exits`; its
final output stays bit-identical, and the new exit heads learn by distillation from that final output
on a transfer set (data impressions, or for comparison real images or noise). This is IMTA's
self-distillation with the final exit as every exit's teacher and no label term (there are no labels).
A smaller multi-exit student can instead be distilled from the teacher (:func:`distill_student`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metadyn.core.backbones.attach import AttachedExits, HeadFactory, attach_exits
from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.callbacks import TrainState
from metadyn.core.losses import UNLABELED, distillation_loss, kd_loss
from metadyn.core.outputs import ExitOutput
from metadyn.core.train import fit
from metadyn.datafree.impressions import SynthesisSettings
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


# --------------------------------------------------------------------------- one call


BUDGET_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class ConversionReport:
    """What :func:`convert` did and measured.

    Attributes:
        at: the modules the exits follow (execution order).
        prior: the impression prior used (``"bn"``, ``"image"`` or ``"none"``; ``"auto"`` resolved).
        mflops: cumulative MFLOPs of leaving at each exit (its head included; the last is the teacher's own).
        impressions: :meth:`~metadyn.datafree.impressions.Impressions.summary` (achieved KL, argmax agreement).
        agreement: per exit, the fraction of held-out impressions on which the exit's argmax is the teacher's
            (a data-free check of the exits; the last is 1).
        budgets: per budget fraction of the teacher's FLOPs, thresholds fitted on the held-out impressions alone
            (MSDNet's geometric family, :func:`~metadyn.core.policies.policy_for_budget`, max-softmax score) and
            the MFLOPs they spend on those impressions; with labelled data, also the accuracy and the MFLOPs
            those thresholds give on it. ``None`` thresholds: budget below the first exit.
        accuracy: per exit, accuracy on the labelled data passed to :func:`convert` (``None`` without).
        data_size: how many labelled samples were scored (0 without).
    """

    at: list[str]
    prior: str
    mflops: list[float]
    impressions: dict
    agreement: list[float]
    budgets: list[dict]
    accuracy: list[float] | None = None
    data_size: int = 0

    def table(self) -> str:
        """A markdown summary: one row per exit, then one per budget."""
        acc = self.accuracy or [None] * len(self.mflops)
        names = [*self.at, "final (the teacher)"]
        lines = ["| exit | after | MFLOPs | agreement with the teacher on held-out impressions % | accuracy % |",
                 "|---|---|---|---|---|"]
        for i, (n, f, g, a) in enumerate(zip(names, self.mflops, self.agreement, acc)):
            lines.append(f"| {i} | {n} | {f:.3f} | {100 * g:.1f} | {'—' if a is None else f'{100 * a:.2f}'} |")
        lines += ["", "| budget (of the teacher's FLOPs) | thresholds (fitted on impressions) | MFLOPs on impressions "
                  "| MFLOPs on data | accuracy on data % |", "|---|---|---|---|---|"]
        for b in self.budgets:
            t = "—" if b["thresholds"] is None else ", ".join(f"{v:.3f}" for v in b["thresholds"][:-1])
            fmt = lambda v, s="", k=1: "—" if v is None else f"{k * v:{s}}"  # noqa: E731
            lines.append(f"| {100 * b['fraction']:.0f}% | {t} | {fmt(b['impression_mflops'], '.3f')} | "
                         f"{fmt(b.get('mflops'), '.3f')} | {fmt(b.get('accuracy'), '.2f', 100)} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _labelled(data) -> tuple[Tensor, Tensor] | None:
    if data is None:
        return None
    x, y = (data.x, data.y) if hasattr(data, "x") and hasattr(data, "y") else data
    if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() >= 2 and y.dim() == 1 and len(x) == len(y)):
        raise InputError("convert(data=...) takes labelled data as (x, y) tensors (N, ...) and (N,), or a split")
    return x, y


def convert(teacher: nn.Module, at: str | Sequence[str] = "auto", *, example_input: Tensor, exits: int = 3,
            num_impressions: int = 1024, prior: str = "auto", prior_weight: float = 0.5,
            input_range: Sequence[float] = (0.0, 1.0), mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, synthesis: SynthesisSettings | None = None, holdout: float = 0.2,
            data=None, budgets: Sequence[float] = BUDGET_FRACTIONS, tau: float = 1.0, head: HeadFactory | None = None,
            seed: int = 0, device=None, epochs: int = 30, batch_size: int = 64, lr: float = 0.01,
            progress: bool = False) -> tuple[AttachedExits, ConversionReport]:
    """A trained static classifier -> an early-exit network, without its training data, in one call.

    Data impressions (ZSKD, Nayak et al., ICML 2019, Eq. 3) are synthesised from ``teacher`` with a feature
    prior (:mod:`metadyn.datafree.priors`); exits are attached after ``at`` (the teacher frozen, its output
    bit-identical) and trained by distillation from its final output on ``1 - holdout`` of them
    (:func:`train_exits`); exit thresholds for each budget are fitted on the held-out rest. Every choice is made
    on impressions: with ``data`` it is only scored, never used to choose.

    Args:
        teacher: a static classifier returning ``(B, K)`` logits (e.g. from
            :func:`~metadyn.datafree.teacher.build_teacher` or torchvision).
        at: module names the exits follow, or ``"auto"``: ``exits`` cuts at even fractions of the teacher's
            FLOPs (:func:`~metadyn.core.backbones.attach.auto_cut_points`).
        example_input: a batch in the teacher's input space; its shape gives the impressions' shape.
        exits: the number of early exits when ``at="auto"``.
        num_impressions: impressions synthesised (``holdout`` of them fit the thresholds only).
        prior: ``"bn"`` (DeepInversion's BatchNorm-statistics prior), ``"image"`` (its TV + l2 image prior, for
            networks without BatchNorm), ``"auto"`` (``"bn"`` when the teacher has BatchNorm layers, else
            ``"image"``) or ``"none"``.
        prior_weight: the prior's weight in the impression loss.
        input_range, mean, std: the teacher's inputs are images in ``input_range`` normalised by ``mean`` /
            ``std`` per channel (:class:`~metadyn.datafree.teacher.InputSpace`); impressions respect both.
        synthesis: other synthesis settings (:class:`~metadyn.datafree.impressions.SynthesisSettings`; its
            bounds, prior and prior weight are replaced by the arguments above).
        holdout: fraction of the impressions kept out of training to fit the thresholds.
        data: optional labelled data ``(x, y)`` (or a split) in the teacher's input space: only scored.
        budgets: fractions of the teacher's FLOPs to fit thresholds for.
        tau: distillation temperature; head: exit head factory (default :class:`~metadyn.core.heads.ExitHead`).
        seed, device, epochs, batch_size, lr, progress: synthesis seed and the exits' training (Adam).

    Returns:
        ``(net, report)``: the :class:`AttachedExits` and a :class:`ConversionReport`.

    Example::

        net, report = md.convert(resnet, at="auto", example_input=torch.randn(1, 3, 64, 64), num_impressions=2048,
                                 mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        print(report)
    """
    from dataclasses import replace

    from metadyn.core.backbones.attach import auto_cut_points
    from metadyn.core.flops import exit_costs, expected_cost
    from metadyn.core.inference import collect_logits
    from metadyn.core.policies import anytime_accuracy, pick_exits, policy_for_budget
    from metadyn.datafree.impressions import synthesize_impressions
    from metadyn.datafree.priors import PRIORS, PriorSettings, resolve_prior
    from metadyn.datafree.teacher import InputSpace

    if not isinstance(teacher, nn.Module):
        raise InputError(f"convert needs the teacher as an nn.Module, got {type(teacher).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise InputError("convert needs example_input, a batch (B, ...) in the teacher's input space")
    if prior not in (*PRIORS, "none"):
        raise InputError(f"unknown impression prior {prior!r}; choose from: {', '.join((*PRIORS, 'none'))}")
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if isinstance(num_impressions, bool) or not isinstance(num_impressions, int) or num_impressions < 2:
        raise InputError(f"num_impressions must be an integer of at least 2, got {num_impressions!r}")
    if isinstance(budgets, str | bytes) or not isinstance(budgets, Sequence) or not budgets or any(
            isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < math.inf for f in budgets):
        raise InputError(f"budgets must be positive, finite fractions of the teacher's FLOPs, got {budgets!r}")
    labelled = _labelled(data)
    space = InputSpace(input_range, mean, std)
    in_shape = tuple(example_input.shape[1:])
    space.check_channels(in_shape[0])
    was_training = teacher.training
    teacher.eval()
    names = auto_cut_points(teacher, example_input, exits) if at == "auto" else at
    used = "none" if prior == "none" else resolve_prior(prior, teacher)
    s = PriorSettings(**vars(synthesis or SynthesisSettings()))
    s = replace(s, bounds=list(space.bounds), prior=used if used != "none" else "bn",
                bn_weight=0.0 if used == "none" else float(prior_weight))
    imps = synthesize_impressions(space.synthesis_model(teacher), num_impressions, in_shape=in_shape, settings=s,
                                  seed=seed, device=device, progress=progress)
    x = space.to_teacher(imps.x)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, round(holdout * len(x)))
    if n_hold >= len(x):
        raise InputError(f"holdout {holdout} of {len(x)} impressions leaves none to train on")
    train_x, held_x = x[order[n_hold:]], x[order[:n_hold]]
    dev = next(teacher.parameters()).device
    net = attach_exits(teacher, names, example_input=example_input[:1].to(dev), head=head, freeze=True)
    train_exits(net, train_x, tau=tau, epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam",
                weight_decay=0.0, seed=seed, device=device, progress=progress)
    net.eval()
    costs = exit_costs(net, in_shape)
    cum = list(costs.cumulative)
    held = collect_logits(net, held_x)
    agreement = [float((lg.argmax(-1) == held[-1].argmax(-1)).double().mean()) for lg in held]
    test = collect_logits(net, labelled[0]) if labelled is not None else None
    rows = []
    for f in budgets:
        row: dict = {"fraction": float(f), "budget_mflops": f * costs.full / 1e6, "thresholds": None,
                     "impression_mflops": None}
        if f * costs.full >= cum[0]:
            policy = policy_for_budget(held, cum, f * costs.full)
            row["thresholds"] = list(policy.thresholds)
            row["impression_mflops"] = expected_cost(pick_exits(held, policy)[0], cum) / 1e6
            if test is not None:
                idx, chosen = pick_exits(test, policy)
                row["mflops"] = expected_cost(idx, cum) / 1e6
                row["accuracy"] = float((chosen.argmax(-1) == labelled[1]).double().mean())
        rows.append(row)
    teacher.train(was_training)
    net.eval()
    report = ConversionReport(list(net.exit_names[:-1]), used, [c / 1e6 for c in cum], imps.summary(), agreement,
                              rows, anytime_accuracy(test, labelled[1]) if test is not None else None,
                              len(labelled[1]) if labelled is not None else 0)
    return net, report
