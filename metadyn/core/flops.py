"""Per-exit cumulative FLOPs (``torch.utils.flop_counter``) and the expected cost of a policy.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which counts matrix
multiplications and convolutions at 2 FLOPs per multiply-add and ignores element-wise operations
(normalisation, activations, pooling) — so our "MFLOPs" are about twice the "multiply-adds" that
MSDNet and SDN tables call FLOPs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from metadyn.core.backbones.base import MultiExitNet


def count_flops(fn, *args) -> int:
    """FLOPs of one call ``fn(*args)`` as counted by ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


@dataclass
class ExitCosts:
    """FLOPs per sample of a MultiExitNet.

    Attributes:
        stem, stages, heads: FLOPs of each piece.
        cumulative: ``(K,)`` cost of leaving at exit k under dynamic inference: the stem, stages
            ``0..k`` and heads ``0..k`` (every earlier exit was evaluated on the way).
        full: the static network: stem, every stage and only the final head.
    """

    stem: int
    stages: list[int]
    heads: list[int]

    @property
    def cumulative(self) -> list[int]:
        out, run = [], self.stem
        for s, h in zip(self.stages, self.heads):
            run += s + h
            out.append(run)
        return out

    @property
    def full(self) -> int:
        return self.stem + sum(self.stages) + self.heads[-1]

    def mflops(self) -> list[float]:
        return [c / 1e6 for c in self.cumulative]


@contextmanager
def probe(model: nn.Module, in_shape: Sequence[int], batch: int = 1) -> Iterator[Tensor]:
    """A zero batch ``(batch, *in_shape)`` on the model's device and dtype, with the model in eval mode and
    gradients off for the duration (the model's mode is restored after). Use ``batch=2`` for networks
    whose normalisation always uses batch statistics."""
    p = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield torch.zeros((batch, *in_shape), dtype=p.dtype, device=p.device)
    finally:
        model.train(was_training)


def exit_costs(model: MultiExitNet, in_shape: Sequence[int]) -> ExitCosts:
    """Count the FLOPs of each stage and head of ``model`` on one input of shape ``in_shape`` (C, H, W)."""
    with probe(model, in_shape) as x:
        stem = count_flops(model.stem, x)
        state = model.stem(x)
        stages, heads = [], []
        for i in range(model.num_exits):
            stages.append(count_flops(model.stage, i, state))
            state = model.stage(i, state)
            heads.append(count_flops(model.exit, i, state))
    return ExitCosts(stem, stages, heads)


def expected_cost(exit_idx: Tensor, cumulative: Sequence[float]) -> float:
    """Mean per-sample cost when sample ``n`` leaves at exit ``exit_idx[n]``."""
    costs = torch.as_tensor(cumulative, dtype=torch.float64, device=exit_idx.device)
    return float(costs[exit_idx].mean())
