"""Consistency between each early exit's representation and the final exit's (the seed's Idea 3).

Each early exit ``i`` gets a projection head ``g_i`` and a predictor ``q_i`` on its exit branch (the
backbone is untouched); the prediction ``q_i(g_i(F_i))`` is pulled towards the final exit's
representation ``F_C`` behind a stop-gradient, so the consistency term never moves the final exit:

- ``byol``:    ``2 - 2 cos(q_i(g_i(F_i)), sg(F_C))``  (Grill et al., NeurIPS 2020, Eq. 2, with the final
  exit in the role of the target network);
- ``simsiam``: two augmented views, symmetrised ``1/2 D(p_i^1, sg(F_C^2)) + 1/2 D(p_i^2, sg(F_C^1))`` with
  Chen & He's ``D = -cos`` (CVPR 2021, Eq. 1-2) taken in BYOL's form ``2 - 2 cos``: twice the paper's term up to a
  constant, so ``weight`` here is twice the paper's weight;
- ``l2``:      ``1/D ||g_i(F_i) - sg(F_C / ||F_C||)||^2`` (a feature hint like BYOT's ``||F_i - F_C||^2``, with the
  target scaled to unit length; unlike ``byol``, the prediction is not normalised and there is no predictor).
  The mean over the ``D`` dimensions keeps the term's curvature small: summed over dimensions, at weight 1
  and SGD lr 0.05, the projector's last layer took steps past the minimum and diverged (NaN) in 7 of 12
  glyphs label-scarce trainings.

The supervised part is exit-wise cross-entropy on the labeled samples (label ``-1`` = unlabeled); the
consistency part uses every sample. So in label-scarce training the unlabeled data reach the early
exits through the final exit's representation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.flops import probe
from metadyn.core.losses import check_exit_weights, exitwise_ce
from metadyn.core.outputs import ExitOutput
from metadyn.errors import InputError
from metadyn.registry import METHODS

KINDS = ("byol", "simsiam", "l2")


def byol_distance(p: Tensor, z: Tensor) -> Tensor:
    """``2 - 2 cos(p, z)`` per sample, ``(B, D) x (B, D) -> (B,)``; ``z`` is detached."""
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))


def consistency_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Mean consistency between online predictions ``(B, D)`` and stop-gradient targets ``(B, D)``."""
    if kind == "l2":
        # The target is scaled to unit length: raw final features grow without bound when CE fits a few
        # labels, and chasing them diverged (NaN) with one label per class. See the module docstring for
        # the mean over dimensions.
        t = F.normalize(target.detach(), dim=-1)
        return (pred - t).pow(2).mean()
    return byol_distance(pred, target).mean()


class ExitConsistency(nn.Module):
    """Exit-wise CE + ``weight`` x consistency of every early exit with the final exit (a loss with parameters).

    Args:
        feature_dims: ``D`` of every exit's features (``ExitOutput.features``), shallow to deep.
        kind: ``byol``, ``simsiam`` (asks :func:`~metadyn.core.train.fit` for two views) or ``l2``.
        weight: weight of the consistency term.
        hidden: width of the projection/predictor MLPs.
        ce_weights: per-exit CE weights (default 1).
    """

    def __init__(self, feature_dims: Sequence[int], kind: str = "byol", weight: float = 1.0, hidden: int = 128,
                 ce_weights: Sequence[float] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"unknown consistency kind {kind!r}; choose from: {', '.join(KINDS)}")
        if len(feature_dims) < 2:
            raise InputError("consistency needs at least two exits")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
            raise InputError(f"consistency weight must be a finite number >= 0, got {weight!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 1:
            raise InputError(f"consistency hidden width must be a whole number >= 1, got {hidden!r}")
        check_exit_weights(ce_weights)
        self.kind, self.weight, self.ce_weights = kind, float(weight), ce_weights
        self.views = 2 if kind == "simsiam" else 1
        d_final = int(feature_dims[-1])
        self.projectors = nn.ModuleList(_mlp(int(d), hidden, d_final) for d in feature_dims[:-1])
        self.predictors = nn.ModuleList(
            nn.Identity() if kind == "l2" else _mlp(d_final, hidden, d_final) for _ in feature_dims[:-1]
        )

    def predictions(self, out: ExitOutput) -> list[Tensor]:
        """``q_i(g_i(F_i))`` for every early exit ``i``."""
        return [q(g(f)) for g, q, f in zip(self.projectors, self.predictors, out.features[:-1])]

    def consistency(self, out: ExitOutput) -> Tensor:
        """The consistency term alone (summed over early exits); the final exit's side is detached."""
        target = out.features[-1].detach()
        preds = self.predictions(out)
        if self.views == 1:
            return torch.stack([consistency_loss(p, target, self.kind) for p in preds]).sum()
        t1, t2 = target.chunk(2)  # (B, D) each: view 1 and view 2
        terms = []
        for p in preds:
            p1, p2 = p.chunk(2)
            terms.append(0.5 * consistency_loss(p1, t2, self.kind) + 0.5 * consistency_loss(p2, t1, self.kind))
        return torch.stack(terms).sum()

    def forward(self, out: ExitOutput, y: Tensor) -> Tensor:
        return exitwise_ce(out, y, self.ce_weights) + self.weight * self.consistency(out)


def feature_dims(model: nn.Module, in_shape: Sequence[int]) -> list[int]:
    """``D`` of every exit's features, from one forward of a zero batch in eval mode."""
    with probe(model, in_shape, batch=2) as x:
        out = model(x)
    return [int(f.shape[-1]) for f in out.features]


@METHODS.register("consistency")
def consistency_method(model: nn.Module, in_shape: Sequence[int], kind: str = "byol", weight: float = 1.0,
                       hidden: int = 128, ce_weights: Sequence[float] | None = None) -> ExitConsistency:
    """Exit-wise CE plus consistency between early exits and the final exit (:class:`ExitConsistency`)."""
    return ExitConsistency(feature_dims(model, in_shape), kind, weight, hidden, ce_weights)
