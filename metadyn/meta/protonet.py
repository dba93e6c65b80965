"""Prototypical networks at every exit: a metric-based few-shot classifier on each exit's features.

The baseline to the inner-loop methods: no adaptation, each exit classifies a query by the squared
Euclidean distance of its features to the class means (prototypes) of the support features.

References:
    Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017, Eq. 1-2 (prototypes,
    softmax over negative squared distances); the released code embeds support and query in one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.inference import eval_mode
from metadyn.errors import InputError


def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, n_way: int) -> Tensor:
    """``-||f(q) - c_k||^2`` for every query and class, ``c_k`` the mean support feature of class k.

    Args:
        support: ``(S, D)`` support features; support_y: ``(S,)`` labels in ``0..n_way-1``.
        query: ``(Q, D)`` query features.

    Returns:
        ``(Q, n_way)`` logits (Snell et al. Eq. 1-2).
    """
    onehot = F.one_hot(support_y, n_way).to(support.dtype)  # (S, N)
    protos = onehot.t() @ support / onehot.sum(0)[:, None]  # (N, D)
    return -torch.cdist(query, protos).square()


class ProtoExits(nn.Module):
    """A MultiExitNet trained as a prototypical network at every exit (sum of the exits' losses).

    Same interface as :class:`~metadyn.meta.learner.MetaLearner`: ``forward(batch)`` is the training
    loss of a meta-batch and :meth:`predict` gives every exit's query logits for one episode.
    """

    def __init__(self, net: MultiExitNet, exit_weights=None):
        super().__init__()
        self.net = net
        k = net.num_exits
        self.exit_weights = [1.0] * k if exit_weights is None else [float(w) for w in exit_weights]
        if len(self.exit_weights) != k:
            raise InputError(f"exit_weights has {len(self.exit_weights)} entries for {k} exits")
        self.exits = tuple(range(k))
        self.last_stats: dict = {}

    def episode_logits(self, sx: Tensor, sy: Tensor, qx: Tensor) -> list[Tensor]:
        n_way = int(sy.max()) + 1
        feats = self.net(torch.cat([sx, qx])).features  # support and query in one batch, as in Snell's code
        s = len(sx)
        return [prototype_logits(f[:s].flatten(1), sy, f[s:].flatten(1), n_way) for f in feats]

    @torch.no_grad()
    def predict(self, sx: Tensor, sy: Tensor, qx: Tensor, steps=None) -> list[Tensor]:
        """Every exit's ``(Q, N)`` query logits for one episode (``steps`` is ignored: no inner loop), computed in
        eval mode as Snell et al. test (a BatchNorm with running statistics uses them and does not update them;
        validation inside :func:`~metadyn.meta.train.meta_fit` wrote every episode into them); the modes are
        restored after."""
        with eval_mode(self):
            return [z.float() for z in self.episode_logits(sx, sy, qx)]

    def forward(self, batch) -> Tensor:
        sx, sy, qx, qy = batch
        t_all, k = len(sx), len(self.exits)
        total = 0.0
        stats = torch.zeros(2 * k, dtype=torch.float64, device=sx.device)
        for t in range(t_all):
            logits = self.episode_logits(sx[t], sy[t], qx[t])
            losses = [F.cross_entropy(z, qy[t]) for z in logits]
            total = total + sum(w * ls for w, ls in zip(self.exit_weights, losses)) / t_all
            stats[:k] += torch.stack([ls.detach() for ls in losses]).double() / t_all
            stats[k:] += torch.stack([(z.argmax(-1) == qy[t]).double().mean() for z in logits]) / t_all
        self.last_stats = {"query_loss": stats[:k].tolist(), "query_accuracy": stats[k:].tolist()}
        return total
