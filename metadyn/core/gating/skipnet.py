"""SkipNet: a gate before every residual block decides, from the block's input, whether the block runs.

A small feed-forward gate per block (:class:`FeedForwardGates`) or one LSTM shared by all blocks
(:class:`RecurrentGate`). Trained in two stages: supervised pre-training with relaxed gates (hard in the
forward pass, soft in the backward pass; :func:`gated_ce`), then the hybrid objective with REINFORCE on the
gates (:func:`skipnet_loss`, registered as method ``"skipnet"``).

References:
    Wang et al., "SkipNet: Learning Dynamic Routing in Convolutional Networks", ECCV 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.gating.execution import GatedOutput, check_gateable, check_mode, final_logits, run_block
from metadyn.core.gating.reinforce import bernoulli_log_prob, reinforce_loss, skipnet_returns
from metadyn.errors import InputError
from metadyn.registry import METHODS

OPEN_BIAS = 2.0  # initial gate logit: sigmoid(2) = 0.88


class FeedForwardGates(nn.Module):
    """One SkipNet feed-forward gate per block: a 3x3 conv of stride 2 (+ BatchNorm, ReLU), global average
    pooling and a linear map to the logit of running the block.

    Gate interface (shared with :class:`RecurrentGate`): ``gate(i, x, state) -> (logit (B,), state)`` for the
    input ``x`` of block ``i``; feed-forward gates carry no state (``None``).

    References:
        Wang et al., "SkipNet: Learning Dynamic Routing in Convolutional Networks", ECCV 2018, Sec. 3.2,
        feed-forward gate FFGate-II (one stride-2 conv, then pooling and a 1x1 conv to the decision).
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
            for c in channels
        )
        self.fcs = nn.ModuleList(nn.Linear(c, 1) for c in channels)

    def forward(self, i: int, x: Tensor, state: Any = None) -> tuple[Tensor, None]:
        z = self.convs[i](x).mean(dim=(2, 3))  # (B, C)
        return self.fcs[i](z).squeeze(1), None


class RecurrentGate(nn.Module):
    """SkipNet's recurrent gate: block ``i``'s input is average-pooled and projected to ``embed_dim`` (a
    projection per block, as the widths differ), then one LSTM shared by all blocks steps once per block and
    its hidden state maps to the logit of running the block. The state ``(h, c)`` is per sample.

    References:
        Wang et al., SkipNet, ECCV 2018, Sec. 3.2, recurrent gate (shared LSTM, hidden size 10 in the paper).
    """

    def __init__(self, channels: Sequence[int], embed_dim: int = 10, hidden_dim: int = 10):
        super().__init__()
        if embed_dim < 1 or hidden_dim < 1:
            raise InputError(f"recurrent gate sizes must be positive, got embed_dim={embed_dim}, "
                             f"hidden_dim={hidden_dim}")
        self.embed = nn.ModuleList(nn.Linear(c, embed_dim) for c in channels)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, 1)

    def forward(self, i: int, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        e = self.embed[i](x.mean(dim=(2, 3)))  # (B, embed_dim)
        h, c = self.lstm(e, state)
        return self.proj(h).squeeze(1), (h, c)


class GatedResNet(nn.Module):
    """SkipNet: a residual network with a gate before every residual block.

    Gate ``i`` reads block ``i``'s input (the previous block's output, or the stem's for block 0) and the
    block runs when ``sigmoid(logit) > 0.5`` (``"greedy"``), with a Bernoulli draw (``"sample"``), or with the
    hard decision in the forward pass and the soft one in the backward pass (``"relaxed"``, straight-through).
    Unlike the paper, whose first block is always executed, every block has a gate here, so that ``K`` is the
    number of blocks and an always-on gate reproduces the backbone.

    Args:
        backbone: a gated backbone (:func:`~metadyn.core.gating.execution.check_gateable`: its stem, ``blocks``
            and final head are used; earlier heads are not), e.g. :func:`~metadyn.core.backbones.resnet_exits`.
        gate: ``"ff"`` (:class:`FeedForwardGates`) or ``"rnn"`` (:class:`RecurrentGate`).
        embed_dim, hidden_dim: sizes of the recurrent gate.

    References:
        Wang et al., SkipNet, ECCV 2018, Sec. 3 (gated residual blocks ``x_{i+1} = G_i(x_i) F_i(x_i) + (1 -
        G_i(x_i)) x_i``, Eq. 1).
    """

    def __init__(self, backbone: nn.Module, gate: str = "ff", embed_dim: int = 10, hidden_dim: int = 10):
        super().__init__()
        self.backbone = check_gateable(backbone)
        channels = [b.in_channels for b in backbone.blocks]
        if gate == "ff":
            self.gate: nn.Module = FeedForwardGates(channels)
        elif gate == "rnn":
            self.gate = RecurrentGate(channels, embed_dim, hidden_dim)
        else:
            raise InputError(f"unknown gate {gate!r}; choose from: ff, rnn")
        with torch.no_grad():  # gates start open (p = 0.88): at first the network is the ResNet it gates
            for fc in self.gate.fcs if gate == "ff" else [self.gate.proj]:
                fc.bias.fill_(OPEN_BIAS)
        self._mode = "greedy"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_mode(value)

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def _decide(self, p: Tensor) -> Tensor:
        hard = (p > 0.5).to(p.dtype)
        if self._mode == "relaxed":
            return hard + (p - p.detach())  # forward: exactly hard; backward: d/dp (straight-through)
        if self._mode == "sample":
            return torch.bernoulli(p.detach())
        return hard

    def forward(self, x: Tensor) -> GatedOutput:
        bb = self.backbone
        h = bb.stem(x)
        if not torch.is_grad_enabled() and h.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            h = h.clone()  # real skipping overwrites the running activation: never the caller's input
        state = None
        probs, actions = [], []
        for i, block in enumerate(bb.blocks):
            z, state = self.gate(i, h, state)
            p = torch.sigmoid(z)
            g = self._decide(p)
            h = run_block(block, h, g)
            probs.append(p)
            actions.append(g)
        return GatedOutput(final_logits(bb, h), torch.stack(probs, 1), torch.stack(actions, 1))


def gated_ce(out: GatedOutput, y: Tensor) -> Tensor:
    """Cross-entropy of the final logits: SkipNet's supervised pre-training loss (with ``"relaxed"`` gates,
    the gates learn through the straight-through gradient)."""
    return F.cross_entropy(out.logits, y)


@METHODS.register("skipnet", example=lambda: _tiny_gated_net())
def skipnet_loss(alpha: float = 0.1):
    """SkipNet's hybrid objective for ``"sample"`` mode: the cross-entropy of the sampled network (its
    gradient trains the ResNet and the gated path) plus REINFORCE on the gates with
    :func:`~metadyn.core.gating.reinforce.skipnet_returns`. Needs a :class:`GatedResNet` output.

    References:
        Wang et al., SkipNet, ECCV 2018, Sec. 3.3, Eq. 4-5. The released code also scales the REINFORCE term
        (``--rl-weight``); here, as in the paper, it is unscaled.
    """

    def loss(out: GatedOutput, y: Tensor) -> Tensor:
        if not isinstance(out, GatedOutput):
            raise InputError(f"skipnet_loss needs the GatedOutput of a GatedResNet, got {type(out).__name__}")
        ce = F.cross_entropy(out.logits, y, reduction="none")  # (B,)
        returns = skipnet_returns(out.actions, ce, alpha)
        return ce.mean() + reinforce_loss(bernoulli_log_prob(out.probs, out.actions), returns)

    return loss


def _tiny_gated_net() -> GatedResNet:
    """A tiny SkipNet in ``"sample"`` mode (the registry's example for ``skipnet``)."""
    from metadyn.core.backbones.resnet import tiny_resnet_exits

    net = GatedResNet(tiny_resnet_exits((1, 8, 8), 5))
    net.mode = "sample"
    return net
