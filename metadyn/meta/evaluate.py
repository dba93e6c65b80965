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
from torch import Tensor, nn

from metadyn.core.device import fits_on, module_device
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


class DeviceEpisodes:
    """Episodes of ``sampler`` gathered on ``device``: the pool's images are put there once (in ``dtype``) when
    they fit (:func:`~metadyn.core.device.fits_on`) and every episode is gathered there with one index copy;
    the labels, the same for every episode, are built there once. The episodes equal ``sampler.episode(i)`` /
    ``sampler.batch(start, t)`` moved to ``device``; a sampler that is not a plain
    :class:`~metadyn.data.EpisodeSampler`, or a pool too large for the device, is served that way."""

    def __init__(self, sampler, device: torch.device | str, dtype: torch.dtype | None = None):
        from metadyn.data.episodes import EpisodeSampler

        self.sampler, self.device, self.dtype = sampler, torch.device(device), dtype
        self.x = None
        plain = type(sampler).episode is EpisodeSampler.episode and type(sampler).batch is EpisodeSampler.batch
        x = getattr(getattr(sampler, "pool", None), "x", None)
        if isinstance(sampler, EpisodeSampler) and plain and isinstance(x, Tensor):
            dt = dtype if dtype is not None and x.is_floating_point() else x.dtype
            if fits_on(self.device, x.numel() * torch.empty((), dtype=dt).element_size()):
                self.x = x.to(self.device, dt)
                labels = torch.arange(sampler.n_way, device=self.device)
                self.sy = labels.repeat_interleave(sampler.k_shot)
                self.qy = labels.repeat_interleave(sampler.n_query)

    def _moved(self, tensors) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device, self.dtype) if self.dtype is not None and t.is_floating_point()
                     else t.to(self.device) for t in tensors)

    def episode(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support_x, support_y, query_x, query_y)`` of episode ``i`` on the device."""
        if self.x is None:
            ep = self.sampler.episode(i)
            return self._moved((ep.support_x, ep.support_y, ep.query_x, ep.query_y))
        _, sup, qry = self.sampler.episode_indices(i)
        idx = torch.cat([sup.flatten(), qry.flatten()]).to(self.device, non_blocking=True)
        xs = self.x[idx]
        n = self.sy.numel()
        return xs[:n], self.sy, xs[n:], self.qy

    def batch(self, start: int, meta_batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Episodes ``start .. start + meta_batch - 1`` stacked, as ``sampler.batch``, on the device."""
        if self.x is None:
            return self._moved(self.sampler.batch(start, meta_batch))
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            self.sampler.batch(start, meta_batch)  # its own error
        parts = [self.sampler.episode_indices(start + t) for t in range(meta_batch)]
        sup = torch.stack([p[1].flatten() for p in parts])  # (T, N*K)
        qry = torch.stack([p[2].flatten() for p in parts])  # (T, N*Q)
        idx = torch.cat([sup, qry], 1).to(self.device, non_blocking=True)
        xs = self.x[idx]  # (T, N*K + N*Q, C, H, W)
        n = sup.shape[1]
        return xs[:, :n], self.sy.expand(meta_batch, -1), xs[:, n:], self.qy.expand(meta_batch, -1)


def predictor_device(predictor) -> torch.device:
    """Where a predictor computes: a module's device, or the first of a stacked predictor's learners'."""
    if isinstance(predictor, nn.Module):
        return module_device(predictor)
    for lrn in getattr(predictor, "learners", ()):
        return predictor_device(lrn)
    return torch.device("cpu")


def evaluate_episodes(learner, sampler, episodes: int, start: int = 0, steps=None,
                      device: torch.device | str | None = None) -> FewShotResult:
    """Adapt ``learner`` (anything with ``predict(sx, sy, qx, steps) -> [logits per exit]``) on the
    episodes ``start .. start + episodes - 1`` of ``sampler`` and score every exit on the queries.

    Runs on ``device`` (``None``: the learner's); episodes are gathered there (:class:`DeviceEpisodes`), and the
    scores stay there until the last episode (one copy back, not one per episode)."""
    dev = predictor_device(learner) if device is None else torch.device(device)
    source = DeviceEpisodes(sampler, dev)
    accs, logits, labels = [], [], []
    for i in range(start, start + episodes):
        sx, sy, qx, qy = source.episode(i)
        out = learner.predict(sx, sy, qx, steps)
        accs.append(torch.stack([(z.argmax(-1) == qy).double().mean() for z in out]))
        logits.append(out)
        labels.append(qy)
    k = len(logits[0])
    return FewShotResult(torch.stack(accs).cpu(), [torch.cat([lg[i] for lg in logits]).cpu() for i in range(k)],
                         torch.cat(labels).cpu())


def evaluate_runs(predictor, runs: Sequence, steps=None, device: torch.device | str | None = None) -> FewShotResult:
    """Omniglot's one-shot test (Lake et al., Science 2015) for a multi-exit ``predictor``: on each run
    (:class:`~metadyn.data.fewshot_folders.OneShotRun`) adapt on its training images (class ``i`` is training
    image ``i``) and classify its test images. ``accuracy`` is ``(runs, exits)``: a run's error is
    ``100 * (1 - accuracy)``, as the authors score it; ``logits`` hold every test image of every run."""
    dev = predictor_device(predictor) if device is None else torch.device(device)
    accs, logits = [], []
    for run in runs:
        sy = torch.arange(len(run.train_files), device=dev)
        out = [z.cpu() for z in predictor.predict(run.train_x.to(dev), sy, run.test_x.to(dev), steps)]
        accs.append(torch.stack([(z.argmax(-1) == run.test_y).double().mean() for z in out]))
        logits.append(out)
    return FewShotResult(torch.stack(accs), [torch.cat([lg[i] for lg in logits]) for i in range(len(logits[0]))],
                         torch.cat([run.test_y for run in runs]))


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
