"""SkipNet and BlockDrop: per-input layer skipping on the core's ResNet, with real skipping at inference.

Both decide, for every input, which residual blocks of a
:class:`~metadyn.core.backbones.resnet.ResNetExits` run; a skipped block passes its input through its
shortcut (the identity, or option A's subsample-and-pad for a downsampling block).

* **SkipNet** (:class:`GatedResNet`): a gate before every block reads the block's input and decides whether
  the block runs — a small feed-forward gate per block (:class:`FeedForwardGates`) or one LSTM shared by all
  blocks (:class:`RecurrentGate`). Trained in two stages: supervised pre-training with relaxed gates (hard in
  the forward pass, soft in the backward pass; :func:`gated_ce`), then the hybrid objective with REINFORCE
  on the gates (:func:`skipnet_loss`).
* **BlockDrop** (:class:`BlockDropNet`): a policy network on a downsampled input (:class:`PolicyNet`) gives,
  in one shot, the probability of keeping each block; the policy is trained by policy gradient with a
  self-critical baseline (:func:`blockdrop_loss`) under a curriculum (:class:`Curriculum`) on a frozen,
  pretrained ResNet, then jointly with it.

Execution (:func:`run_block`): with autograd on (training), every block runs on every sample and the gate
mixes block output and shortcut — gradients must reach the relaxed gates, and BatchNorm sees the whole
batch. Without autograd (inference), a block runs only on the samples whose gate is on
(:func:`metadyn.core.inference.skip_block`): the skipped work is never done. The two agree to floating
point, and an always-on gate reproduces the ungated network exactly.

Networks return a :class:`GatedOutput`; losses are ``loss(out: GatedOutput, y) -> Tensor`` as for
:func:`metadyn.core.train.fit`. The decision mode of a network (``net.mode``) is ``"relaxed"`` (SkipNet's
supervised pre-training), ``"sample"`` (policy-gradient training) or ``"greedy"`` (inference).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.backbones.resnet import ResNetExits, resnet_exits
from metadyn.core.flops import count_flops, probe
from metadyn.core.inference import skip_block
from metadyn.core.train import Callback, TrainState
from metadyn.errors import InputError

MODES = ("relaxed", "sample", "greedy")
OPEN_BIAS = 2.0  # initial gate logit: sigmoid(2) = 0.88


@dataclass
class GatedOutput:
    """What a gated network returns.

    Attributes:
        logits: ``(B, C)`` final classifier logits (of the sampled policy in ``"sample"`` mode).
        probs: ``(B, K)`` probability that each block runs (BlockDrop ``"sample"`` mode: after bounding).
        actions: ``(B, K)`` 0/1 decisions, 1 = the block ran (``"relaxed"`` mode: the hard decision carrying
            the straight-through gradient of ``probs``).
        baseline_logits, baseline_actions: BlockDrop ``"sample"`` mode: the greedy policy's logits and
            decisions (the self-critical baseline), computed without gradients.
        learn: ``(K,)`` bool, the blocks whose decisions are being learnt (BlockDrop's curriculum); None = all.
    """

    logits: Tensor
    probs: Tensor
    actions: Tensor
    baseline_logits: Tensor | None = None
    baseline_actions: Tensor | None = None
    learn: Tensor | None = None


# --------------------------------------------------------------------------- execution


def mix_block(block: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Training-time gated block on every sample: ``g * block(x) + (1 - g) * shortcut(x)``, ``g`` ``(B,)`` in [0, 1]
    (may carry a straight-through gradient). With ``g = 1`` it is exactly ``block(x)``."""
    g4 = g.to(x.dtype).view(-1, 1, 1, 1)
    return g4 * block(x) + (1 - g4) * block.shortcut(x)


def run_block(block: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """One gated block: :func:`mix_block` when autograd is on (training), real skipping otherwise
    (:func:`~metadyn.core.inference.skip_block`: the block computes only on the samples with ``g > 0.5``).
    ``x`` is the forward's own running activation and may be overwritten."""
    if torch.is_grad_enabled():
        return mix_block(block, x, g)
    return skip_block(block, x, g > 0.5, inplace=True)


def _check_backbone(backbone: Any) -> ResNetExits:
    if not isinstance(backbone, ResNetExits):
        raise InputError(f"a gated network needs a ResNetExits backbone (resnet_exits), got {type(backbone).__name__}")
    return backbone


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"unknown gate mode {mode!r}; choose from: {', '.join(MODES)}")
    return mode


# --------------------------------------------------------------------------- SkipNet gates


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
    """SkipNet: a core ResNet with a gate before every residual block.

    Gate ``i`` reads block ``i``'s input (the previous block's output, or the stem's for block 0) and the
    block runs when ``sigmoid(logit) > 0.5`` (``"greedy"``), with a Bernoulli draw (``"sample"``), or with the
    hard decision in the forward pass and the soft one in the backward pass (``"relaxed"``, straight-through).
    Unlike the paper, whose first block is always executed, every block has a gate here, so that ``K`` is the
    number of blocks and an always-on gate reproduces the ResNet.

    Args:
        backbone: a :class:`ResNetExits` (its stem, ``blocks`` and final head are used; earlier heads are not).
        gate: ``"ff"`` (:class:`FeedForwardGates`) or ``"rnn"`` (:class:`RecurrentGate`).
        embed_dim, hidden_dim: sizes of the recurrent gate.

    References:
        Wang et al., SkipNet, ECCV 2018, Sec. 3 (gated residual blocks ``x_{i+1} = G_i(x_i) F_i(x_i) + (1 -
        G_i(x_i)) x_i``, Eq. 1).
    """

    def __init__(self, backbone: ResNetExits, gate: str = "ff", embed_dim: int = 10, hidden_dim: int = 10):
        super().__init__()
        self.backbone = _check_backbone(backbone)
        channels = [b.residual[0].in_channels for b in backbone.blocks]
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
        self._mode = _check_mode(value)

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
        state = None
        probs, actions = [], []
        for i, block in enumerate(bb.blocks):
            z, state = self.gate(i, h, state)
            p = torch.sigmoid(z)
            g = self._decide(p)
            h = run_block(block, h, g)
            probs.append(p)
            actions.append(g)
        logits = bb.exit(bb.num_exits - 1, h)[0]
        return GatedOutput(logits, torch.stack(probs, 1), torch.stack(actions, 1))


# --------------------------------------------------------------------------- BlockDrop


class PolicyNet(nn.Module):
    """BlockDrop's policy network ``s = f_pn(x; W)``: a core ResNet-8 on the input average-pooled by
    ``downsample``, with one sigmoid output per block — the probability of keeping it.

    References:
        Wu et al., "BlockDrop: Dynamic Inference Paths in Residual Networks", CVPR 2018, Sec. 3.1 (a ResNet
        policy network on a downsampled image, Eq. 1's ``s``).
    """

    def __init__(self, in_shape: Sequence[int], num_blocks: int, width: int = 8, downsample: int = 2):
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        if downsample < 1 or h // downsample < 1 or w // downsample < 1:
            raise InputError(f"policy downsample must be in 1..{min(h, w)} for images of {h}x{w}, got {downsample}")
        if width < 1:
            raise InputError(f"policy width must be positive, got {width}")
        self.downsample = downsample
        self.net = resnet_exits((c, h // downsample, w // downsample), num_blocks, depth=8, exits=(3,), width=width)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return torch.sigmoid(self.net.forward_final(x))  # (B, K)


def bound_probs(s: Tensor, alpha: float) -> Tensor:
    """BlockDrop's exploration bound ``s' = alpha * s + (1 - alpha) * (1 - s)``, keeping ``s'`` in
    ``[1 - alpha, alpha]`` (alpha = 0.8 in the paper's code)."""
    return alpha * s + (1 - alpha) * (1 - s)


def curriculum_forced(num_blocks: int, step: int) -> Tensor:
    """``(K,)`` bool: the blocks kept on at curriculum step ``step`` (1-based epoch): the first ``K - step``.

    References:
        Wu et al., BlockDrop, CVPR 2018, Sec. 3.2 (curriculum learning: in epoch t, the policy learns the
        last t blocks while the first K - t stay on).
    """
    forced = torch.zeros(num_blocks, dtype=torch.bool)
    forced[: max(num_blocks - step, 0)] = True
    return forced


class BlockDropNet(nn.Module):
    """BlockDrop: a policy network decides, from a downsampled input, which blocks of a (pretrained) core
    ResNet run for that input; decisions are made in one shot before the ResNet runs.

    ``"greedy"`` keeps block ``k`` when ``s_k >= 0.5``; ``"sample"`` draws ``u_k ~ Bernoulli(s'_k)`` with the
    bounded ``s'`` (:func:`bound_probs`) and also runs the greedy policy, without gradients, for the
    self-critical baseline. ``learn_last`` (set by :class:`Curriculum`) keeps all but the last
    ``learn_last`` blocks on. :meth:`freeze_backbone` freezes the ResNet (curriculum stage): its parameters
    stop requiring gradients, it stays in eval mode and, autograd being off for it, it really skips blocks.

    References:
        Wu et al., "BlockDrop: Dynamic Inference Paths in Residual Networks", CVPR 2018, Sec. 3 (Eq. 1-2).
    """

    def __init__(self, backbone: ResNetExits, policy: PolicyNet, alpha: float = 0.8):
        super().__init__()
        self.backbone = _check_backbone(backbone)
        self.policy = policy
        if not 0.5 <= alpha <= 1.0:
            raise InputError(f"BlockDrop alpha (probability bound) must be in [0.5, 1], got {alpha}")
        self.alpha = alpha
        self.learn_last: int | None = None
        self.frozen = False
        self._mode = "greedy"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if _check_mode(value) == "relaxed":
            raise InputError("BlockDrop has no relaxed mode; choose from: sample, greedy")
        self._mode = value

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def freeze_backbone(self, frozen: bool = True) -> BlockDropNet:
        self.frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> BlockDropNet:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def run_policy(self, x: Tensor, actions: Tensor) -> Tensor:
        """The ResNet's logits when block ``k`` runs for sample ``n`` iff ``actions[n, k]`` (0/1)."""
        bb = self.backbone
        h = bb.stem(x)
        for i, block in enumerate(bb.blocks):
            h = run_block(block, h, actions[:, i])
        return bb.exit(bb.num_exits - 1, h)[0]

    def forward(self, x: Tensor) -> GatedOutput:
        s = self.policy(x)  # (B, K)
        learn = None
        keep = s >= 0.5
        if self.learn_last is not None:
            learn = ~curriculum_forced(self.num_blocks, self.learn_last).to(s.device)
            keep = keep | ~learn
        keep = keep.to(s.dtype)
        grad = torch.is_grad_enabled() and not self.frozen
        if self._mode == "greedy":
            with torch.set_grad_enabled(grad):
                logits = self.run_policy(x, keep)
            return GatedOutput(logits, s, keep)
        p = bound_probs(s, self.alpha)
        u = torch.bernoulli(p.detach())
        if learn is not None:
            u = torch.where(learn, u, torch.ones_like(u))
        with torch.set_grad_enabled(grad):
            logits = self.run_policy(x, u)
        with torch.no_grad():
            base = self.run_policy(x, keep)
        return GatedOutput(logits, p, u, base, keep, learn)


class Curriculum(Callback):
    """BlockDrop's curriculum as a :func:`~metadyn.core.train.fit` callback: in epoch ``t`` (1-based) the
    policy learns the decisions of the last ``t`` blocks, the first ``K - t`` stay on (:func:`curriculum_forced`).
    After training, set ``net.learn_last = None`` (all blocks learnt)."""

    def __init__(self, net: BlockDropNet):
        self.net = net

    def on_epoch_start(self, state: TrainState) -> None:
        self.net.learn_last = state.epoch + 1


# --------------------------------------------------------------------------- rewards and losses (pure)


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


def gated_ce(out: GatedOutput, y: Tensor) -> Tensor:
    """Cross-entropy of the final logits: SkipNet's supervised pre-training loss (with ``"relaxed"`` gates,
    the gates learn through the straight-through gradient)."""
    return F.cross_entropy(out.logits, y)


def skipnet_loss(alpha: float = 0.1):
    """SkipNet's hybrid objective for ``"sample"`` mode: the cross-entropy of the sampled network (its
    gradient trains the ResNet and the gated path) plus REINFORCE on the gates with :func:`skipnet_returns`.

    References:
        Wang et al., SkipNet, ECCV 2018, Sec. 3.3, Eq. 4-5. The released code also scales the REINFORCE term
        (``--rl-weight``); here, as in the paper, it is unscaled.
    """

    def loss(out: GatedOutput, y: Tensor) -> Tensor:
        ce = F.cross_entropy(out.logits, y, reduction="none")  # (B,)
        returns = skipnet_returns(out.actions, ce, alpha)
        return ce.mean() + reinforce_loss(bernoulli_log_prob(out.probs, out.actions), returns)

    return loss


def blockdrop_reward(logits: Tensor, y: Tensor, actions: Tensor, gamma: float) -> Tensor:
    """BlockDrop's reward ``R(u) = 1 - (|u|_0 / K)^2`` if the prediction is correct, ``-gamma`` otherwise, ``(B,)``.

    References:
        Wu et al., BlockDrop, CVPR 2018, Sec. 3.1, Eq. 2.
    """
    used = actions.detach().sum(1) / actions.shape[1]
    correct = logits.detach().argmax(-1) == y
    return torch.where(correct, 1 - used**2, torch.full_like(used, -gamma))


def blockdrop_loss(gamma: float = 1.0, joint: bool = False):
    """BlockDrop's policy-gradient loss for ``"sample"`` mode, with the self-critical baseline: the advantage
    of the sampled policy ``u`` is ``R(u) - R(u_greedy)``; decisions outside the curriculum's learnt blocks
    are not trained. ``joint=True`` (joint fine-tuning) adds the cross-entropy of the sampled policy's
    prediction, which trains the ResNet.

    References:
        Wu et al., BlockDrop, CVPR 2018, Sec. 3.1 (Eq. 3-4: ``J = E[R(u)]``, policy gradient with the greedy
        policy's reward as baseline), Sec. 3.2 (curriculum, joint fine-tuning). The released code sums the
        policy-gradient term over the batch; here both terms are batch means.
    """

    def loss(out: GatedOutput, y: Tensor) -> Tensor:
        if out.baseline_logits is None:
            raise InputError("blockdrop_loss needs a BlockDropNet in 'sample' mode")
        r = blockdrop_reward(out.logits, y, out.actions, gamma)
        rb = blockdrop_reward(out.baseline_logits, y, out.baseline_actions, gamma)
        value = reinforce_loss(bernoulli_log_prob(out.probs, out.actions), r - rb, out.learn)
        if joint:
            value = value + F.cross_entropy(out.logits, y)
        return value

    return loss


# --------------------------------------------------------------------------- costs and policies


@dataclass
class GatedCosts:
    """FLOPs per sample of a gated network.

    Attributes:
        fixed: what every sample pays: the stem, the final head, and every gate (SkipNet) or the policy
            network (BlockDrop).
        blocks: ``(K,)`` FLOPs of each residual block, paid only when it runs.
    """

    fixed: int
    blocks: list[int]

    @property
    def full(self) -> int:
        """Every block on, gates included."""
        return self.fixed + sum(self.blocks)

    def mflops(self, actions: Tensor) -> Tensor:
        """``(N,)`` MFLOPs of each sample under ``(N, K)`` 0/1 decisions."""
        blocks = torch.as_tensor(self.blocks, dtype=torch.float64, device=actions.device)
        return (self.fixed + actions.to(torch.float64) @ blocks) / 1e6


def gated_costs(model: GatedResNet | BlockDropNet, in_shape: Sequence[int]) -> GatedCosts:
    """Count the FLOPs (``count_flops``) of the stem, each block, each gate or the policy network, and the
    final head of ``model`` on one input of shape ``in_shape`` ``(C, H, W)``."""
    bb = model.backbone
    with probe(model, in_shape) as x:
        fixed = count_flops(bb.stem, x)
        h = bb.stem(x)
        state, blocks = None, []
        for i, block in enumerate(bb.blocks):
            if isinstance(model, GatedResNet):
                fixed += count_flops(model.gate, i, h, state)
                _, state = model.gate(i, h, state)
            blocks.append(count_flops(block, h))
            h = block(h)
        fixed += count_flops(bb.exit, bb.num_exits - 1, h)
        if isinstance(model, BlockDropNet):
            fixed += count_flops(model.policy, x)
    return GatedCosts(fixed, blocks)


def policy_counts(actions: Tensor) -> list[tuple[str, int]]:
    """The distinct policies among ``(N, K)`` 0/1 decisions, as strings (block 0 first, ``1`` = ran), with how
    many samples took each, most frequent first (ties by string)."""
    rows = ["".join("1" if v else "0" for v in r) for r in (actions > 0.5).tolist()]
    return sorted(Counter(rows).items(), key=lambda kv: (-kv[1], kv[0]))
