"""Running a gated network: the contract a gated backbone satisfies, its decisions' modes, and gated blocks.

Execution (:func:`run_block`): with autograd on (training), every block runs on every sample and the gate
mixes block output and shortcut (:func:`mix_block`) — gradients must reach the relaxed gates, and BatchNorm
sees the whole batch. Without autograd (inference), a block runs only on the samples whose gate is on
(:func:`skip_block`): the skipped work is never done. The two agree to floating point, and an always-on
gate reproduces the ungated network exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metadyn.errors import InputError

MODES = ("relaxed", "sample", "greedy")

GATEABLE = (
    "a gated backbone exposes stem(x) -> h (the input of block 0), blocks (an nn.ModuleList of residual "
    "blocks run in order, each with in_channels and a shortcut module, the path a skipped block takes), "
    "num_exits, and exit(num_exits - 1, h) -> (logits, features) on the last block's output"
)


def check_gateable(backbone: Any) -> Any:
    """Check that ``backbone`` satisfies the gated-backbone contract and return it.

    A gated network (SkipNet's :class:`~metadyn.core.gating.skipnet.GatedResNet`, BlockDrop's
    :class:`~metadyn.core.gating.blockdrop.BlockDropNet`) decides, per input, which residual blocks of its
    backbone run. The backbone must expose:

    * ``stem(x) -> h``: the ``(B, C, H, W)`` input of the first block;
    * ``blocks``: an ``nn.ModuleList`` of the residual blocks, in execution order; block ``k`` reads block
      ``k - 1``'s output and has ``in_channels`` (``C`` of its input) and ``shortcut``, a module computing
      the path a skipped block takes (the identity, or a projection when the block changes the shape), so
      that ``block(x)`` and ``block.shortcut(x)`` have the same shape;
    * ``num_exits`` and ``exit(num_exits - 1, h) -> (logits, features)``: the final head, on the last
      block's output.

    :class:`~metadyn.core.backbones.resnet.ResNetExits` satisfies it (its earlier exits are not used).

    Raises:
        InputError: one line naming what is missing.
    """
    name = type(backbone).__name__
    missing = [a for a in ("stem", "exit") if not callable(getattr(backbone, a, None))]
    if not isinstance(getattr(backbone, "num_exits", None), int):
        missing.append("num_exits")
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        missing.append("blocks")
    else:
        for k, b in enumerate(blocks):
            if not isinstance(getattr(b, "shortcut", None), nn.Module):
                missing.append(f"blocks[{k}].shortcut")
            if not isinstance(getattr(b, "in_channels", None), int):
                missing.append(f"blocks[{k}].in_channels")
    if missing:
        raise InputError(f"{name} cannot be gated, it lacks {', '.join(missing[:3])}: {GATEABLE} "
                         "(as resnet_exits does)")
    return backbone


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else an :class:`InputError`."""
    if mode not in MODES:
        raise InputError(f"unknown gate mode {mode!r}; choose from: {', '.join(MODES)}")
    return mode


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


def mix_block(block: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Training-time gated block on every sample: ``g * block(x) + (1 - g) * shortcut(x)``, ``g`` ``(B,)`` in [0, 1]
    (may carry a straight-through gradient). With ``g = 1`` it is exactly ``block(x)``."""
    g4 = g.to(x.dtype).view(-1, 1, 1, 1)
    return g4 * block(x) + (1 - g4) * block.shortcut(x)


def skip_block(block: nn.Module, x: Tensor, on: Tensor, inplace: bool = False) -> Tensor:
    """A gated residual block that computes only on the samples whose gate is on: ``x[on] = block(x[on])``.

    The other samples take the block's shortcut (``block.shortcut``: the identity, or option A's
    subsample-and-pad, so a downsampling block can be skipped too). The reference SkipNet/BlockDrop codes
    compute ``mask * block(x) + (1 - mask) * shortcut(x)`` instead, which saves FLOPs only on paper.

    There is one host synchronisation (finding the gated-on samples) and one gather and one scatter with
    the same index; advanced indexing (``t[idx]``) keeps a channels-last layout, ``index_select`` would not.
    When every block's decisions are known before the network runs (BlockDrop), :func:`skip_plan` finds the
    samples of all blocks with one synchronisation and :func:`skip_rows` runs each block without one.

    Args:
        block: a residual block with a ``shortcut`` module (:class:`~metadyn.core.backbones.resnet.BasicBlock`).
        x: ``(B, C, H, W)`` input.
        on: ``(B,)`` bool, the samples whose block runs.
        inplace: write the block's outputs into ``x`` where the shortcut is the identity; only for a tensor
            the caller owns and no longer needs (a gated forward's running activation). Otherwise ``x`` is
            left untouched.

    Returns:
        ``(B, C', H', W')``: ``block(x[n])`` where ``on[n]``, ``block.shortcut(x[n])`` elsewhere.
    """
    return skip_rows(block, x, on.nonzero().squeeze(1), inplace)  # nonzero: the one host sync of this block


def skip_rows(block: nn.Module, x: Tensor, idx: Tensor, inplace: bool = False) -> Tensor:
    """:func:`skip_block` given the samples that run the block as indices ``idx`` (increasing, a tensor of
    known length): no host synchronisation."""
    n = idx.numel()
    if n == x.shape[0]:
        return block(x)
    out = block.shortcut(x)
    if n == 0:
        return out
    if out is x:
        if not inplace:
            out = x.clone()
    elif out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        out = out.clone()  # a strided view of x (a subsampling shortcut): never write through it
    out[idx] = block(x[idx])
    return out


def skip_plan(actions: Tensor) -> list[Tensor]:
    """The samples each block runs on under ``(B, K)`` 0/1 decisions known before the network runs, found with
    one host synchronisation for all ``K`` blocks (instead of one per block): ``K`` increasing index tensors
    for :func:`skip_rows`."""
    on = actions > 0.5
    order = torch.argsort((~on).T.to(torch.uint8), dim=1, stable=True)  # (K, B): each block's samples first
    counts = on.sum(0).tolist()  # the one host sync
    return [order[k, :n] for k, n in enumerate(counts)]


def run_block(block: nn.Module, x: Tensor, g: Tensor, idx: Tensor | None = None) -> Tensor:
    """One gated block: :func:`mix_block` when autograd is on (training), real skipping otherwise
    (:func:`skip_block`: the block computes only on the samples with ``g > 0.5``, or on ``idx`` when the
    caller found them already, :func:`skip_plan`). ``x`` is the forward's own running activation and may be
    overwritten."""
    if torch.is_grad_enabled():
        return mix_block(block, x, g)
    if idx is not None:
        return skip_rows(block, x, idx, inplace=True)
    return skip_block(block, x, g > 0.5, inplace=True)


def final_logits(backbone: Any, h: Tensor) -> Tensor:
    """The backbone's final head on the last block's output ``h``: ``(B, C)`` logits."""
    return backbone.exit(backbone.num_exits - 1, h)[0]
