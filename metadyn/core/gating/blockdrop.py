"""BlockDrop: a policy network decides, in one shot from a downsampled input, which residual blocks run.

The policy network (:class:`PolicyNet`) gives the probability of keeping each block; it is trained by policy
gradient with a self-critical baseline (:func:`blockdrop_loss`, registered as method ``"blockdrop"``) under a
curriculum (:class:`Curriculum`) on a frozen, pretrained backbone, then jointly with it.

References:
    Wu et al., "BlockDrop: Dynamic Inference Paths in Residual Networks", CVPR 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.backbones.resnet import resnet_exits
from metadyn.core.callbacks import Callback, TrainState
from metadyn.core.device import module_device
from metadyn.core.freeze import freeze, is_frozen, unfreeze
from metadyn.core.gating.execution import (
    GatedOutput,
    check_gateable,
    check_mode,
    final_logits,
    run_block,
    run_scheduled,
    skip_schedule,
)
from metadyn.core.gating.reinforce import bernoulli_log_prob, reinforce_loss
from metadyn.errors import InputError
from metadyn.registry import METHODS


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
    """BlockDrop: a policy network decides, from a downsampled input, which blocks of a (pretrained) gated
    backbone run for that input; decisions are made in one shot before the backbone runs.

    ``"greedy"`` keeps block ``k`` when ``s_k >= 0.5``; ``"sample"`` draws ``u_k ~ Bernoulli(s'_k)`` with the
    bounded ``s'`` (:func:`bound_probs`) and also runs the greedy policy, without gradients, for the
    self-critical baseline. ``learn_last`` (set by :class:`Curriculum`) keeps all but the last
    ``learn_last`` blocks on. :meth:`freeze_backbone` freezes the backbone (curriculum stage,
    :func:`~metadyn.core.freeze.freeze`): its parameters stop requiring gradients, it stays in eval mode and,
    autograd being off for it, it really skips blocks. The policy network is moved to the backbone's device and
    dtype (the two always run on the same input). Without autograd, all decisions being known before the
    backbone runs, a forward synchronises with the host once and runs samples grouped by policy
    (:func:`~metadyn.core.gating.execution.skip_schedule`), not once per block.

    Args:
        backbone: a gated backbone (:func:`~metadyn.core.gating.execution.check_gateable`), e.g. a ResNet
            from :func:`~metadyn.core.backbones.resnet_exits`.
        policy: the policy network, one output per block of ``backbone``.
        alpha: the probability bound of :func:`bound_probs`.

    References:
        Wu et al., "BlockDrop: Dynamic Inference Paths in Residual Networks", CVPR 2018, Sec. 3 (Eq. 1-2).
    """

    def __init__(self, backbone: nn.Module, policy: PolicyNet, alpha: float = 0.8):
        super().__init__()
        self.backbone = check_gateable(backbone)
        p = next(backbone.parameters(), None)
        self.policy = policy if p is None else policy.to(module_device(backbone), p.dtype)
        if not 0.5 <= alpha <= 1.0:
            raise InputError(f"BlockDrop alpha (probability bound) must be in [0.5, 1], got {alpha}")
        self.alpha = alpha
        self.learn_last: int | None = None
        self._mode = "greedy"
        self._learn_masks: dict[tuple[int, torch.device], Tensor] = {}  # the curriculum's masks, built once

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if check_mode(value) == "relaxed":
            raise InputError("BlockDrop has no relaxed mode; choose from: sample, greedy")
        self._mode = value

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    @property
    def frozen(self) -> bool:
        """Whether the backbone is frozen (:meth:`freeze_backbone`)."""
        return is_frozen(self.backbone)

    def freeze_backbone(self, frozen: bool = True) -> BlockDropNet:
        """Freeze the backbone (``frozen=True``) or let it train with the policy again; returns ``self``."""
        (freeze if frozen else unfreeze)(self.backbone)
        return self.train(self.training)

    def run_policy(self, x: Tensor, actions: Tensor) -> Tensor:
        """The backbone's logits when block ``k`` runs for sample ``n`` iff ``actions[n, k]`` (0/1)."""
        bb = self.backbone
        if torch.is_grad_enabled():  # training: every block on every sample, mixed by the decisions
            h = bb.stem(x)
            for i, block in enumerate(bb.blocks):
                h = run_block(block, h, actions[:, i])
            return final_logits(bb, h)
        plan = skip_schedule(actions)  # real skipping, samples grouped by policy: one sync for all blocks
        h = bb.stem(x[plan.order])
        for block, step in zip(bb.blocks, plan.steps):
            h = run_scheduled(block, h, step)
        z = final_logits(bb, h)
        return torch.empty_like(z).index_copy_(0, plan.order, z)  # back in the batch's order

    def learn_mask(self, device: torch.device) -> Tensor:
        """``(K,)`` bool on ``device``: the blocks whose decisions the curriculum's step ``learn_last`` learns."""
        key = (int(self.learn_last), device)
        if key not in self._learn_masks:
            self._learn_masks[key] = ~curriculum_forced(self.num_blocks, key[0]).to(device)
        return self._learn_masks[key]

    def forward(self, x: Tensor) -> GatedOutput:
        s = self.policy(x)  # (B, K)
        learn = None
        keep = s >= 0.5
        if self.learn_last is not None:
            learn = self.learn_mask(s.device)
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
    After training, set ``net.learn_last = None`` (all blocks learnt).

    Its state (``net.learn_last``) is checkpointed, so a run resumed after its last epoch ends with the
    curriculum where the uninterrupted run left it.

    References:
        Wu et al., BlockDrop, CVPR 2018, Sec. 3.2 (curriculum learning).
    """

    def __init__(self, net: BlockDropNet):
        self.net = net

    def on_epoch_start(self, state: TrainState) -> None:
        self.net.learn_last = state.epoch + 1

    def state_dict(self) -> dict[str, Any]:
        return {"learn_last": self.net.learn_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.learn_last = state.get("learn_last")


def blockdrop_reward(logits: Tensor, y: Tensor, actions: Tensor, gamma: float) -> Tensor:
    """BlockDrop's reward ``R(u) = 1 - (|u|_0 / K)^2`` if the prediction is correct, ``-gamma`` otherwise, ``(B,)``.

    References:
        Wu et al., BlockDrop, CVPR 2018, Sec. 3.1, Eq. 2.
    """
    used = actions.detach().sum(1) / actions.shape[1]
    correct = logits.detach().argmax(-1) == y
    return torch.where(correct, 1 - used**2, torch.full_like(used, -gamma))


def policy_entropy_bonus(probs: Tensor) -> Tensor:
    """The released curriculum code's entropy term ``(1/B) sum_b sum_k -p'_bk log p'_bk`` of the bounded keep
    probabilities ``p'`` (clamped to ``[1e-15, 1 - 1e-15]``), over every block — the curriculum's forced ones
    included. It is the ``u = 1`` half of each Bernoulli's entropy, as the code writes it.

    References:
        ``Tushar-N/blockdrop``, ``cl_training.py`` (``entropy_loss = -probs * torch.log(probs)``, summed, times
        ``--beta`` = 0.1, subtracted from the policy-gradient loss, divided by the batch size).
    """
    p = probs.clamp(1e-15, 1 - 1e-15)
    return -(p * torch.log(p)).sum(1).mean()


@METHODS.register("blockdrop", example=lambda: _tiny_blockdrop_net())
def blockdrop_loss(gamma: float = 1.0, joint: bool = False, entropy: float = 0.1):
    """BlockDrop's policy-gradient loss for ``"sample"`` mode, with the self-critical baseline: the advantage
    of the sampled policy ``u`` is ``R(u) - R(u_greedy)``; decisions outside the curriculum's learnt blocks
    are not trained. ``entropy`` (the released curriculum code's ``beta``, 0.1) subtracts ``entropy`` times
    :func:`policy_entropy_bonus`, which keeps the keep probabilities from collapsing to 0 or 1 early.
    ``joint=True`` (joint fine-tuning) adds the cross-entropy of the sampled policy's prediction, which trains
    the backbone; the released fine-tuning code has no entropy term (pass ``entropy=0``, as the ``blockdrop``
    task kind does). Needs a :class:`BlockDropNet` output.

    References:
        Wu et al., BlockDrop, CVPR 2018, Sec. 3.1 (Eq. 3-4: ``J = E[R(u)]``, policy gradient with the greedy
        policy's reward as baseline), Sec. 3.2 (curriculum, joint fine-tuning). The paper writes no entropy
        term; the released ``cl_training.py`` adds it (``--beta 0.1``), ``finetune.py`` does not. The released
        code sums the policy-gradient term over the batch and divides the total by the batch size, as here.
    """
    if isinstance(entropy, bool) or not entropy >= 0:
        raise InputError(f"blockdrop entropy weight must be a non-negative number, got {entropy!r}")

    def loss(out: GatedOutput, y: Tensor) -> Tensor:
        if not isinstance(out, GatedOutput) or out.baseline_logits is None:
            raise InputError("blockdrop_loss needs a BlockDropNet in 'sample' mode")
        r = blockdrop_reward(out.logits, y, out.actions, gamma)
        rb = blockdrop_reward(out.baseline_logits, y, out.baseline_actions, gamma)
        value = reinforce_loss(bernoulli_log_prob(out.probs, out.actions), r - rb, out.learn)
        if entropy:
            value = value - entropy * policy_entropy_bonus(out.probs)
        if joint:
            value = value + F.cross_entropy(out.logits, y)
        return value

    return loss


def _tiny_blockdrop_net() -> BlockDropNet:
    """A tiny BlockDrop network in ``"sample"`` mode (the registry's example for ``blockdrop``)."""
    from metadyn.core.backbones.resnet import tiny_resnet_exits

    backbone = tiny_resnet_exits((1, 8, 8), 5)
    net = BlockDropNet(backbone, PolicyNet((1, 8, 8), len(backbone.blocks), width=4), 0.8)
    net.mode = "sample"
    return net
