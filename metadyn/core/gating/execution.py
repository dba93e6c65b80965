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
    the same index, each a copy of whole samples (:func:`take_rows`, :func:`put_rows`: the layout, channels-last
    included, is kept). When every block's decisions are known before the network runs (BlockDrop),
    :func:`skip_schedule` plans all blocks with one synchronisation and :func:`run_scheduled` runs each block
    without one.

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


def _sample_rows(t: Tensor) -> Tensor | None:
    """``t`` as a ``(B, rest)`` view, one row per sample, when each sample is one dense run of memory (a
    contiguous or channels-last tensor); None otherwise."""
    b = t.shape[0] if t.dim() >= 2 else 0
    per = t.numel() // b if b else 0
    if not per or t.stride(0) != per:
        return None
    if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        return None
    return t.as_strided((b, per), (per, 1))


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[idx]`` (``idx`` a 1-D index tensor) in ``x``'s own layout. Each sample of a contiguous or channels-last
    ``x`` is one run of memory, so this is ``index_select`` of whole rows (one copy per sample), not the
    element-wise gather of advanced indexing; other tensors fall back to ``x[idx]``."""
    rows = _sample_rows(x)
    if rows is None:
        return x[idx]
    per = rows.shape[1]
    return rows.index_select(0, idx).as_strided((idx.numel(), *x.shape[1:]), (per, *x.stride()[1:]))


def put_rows(out: Tensor, idx: Tensor, y: Tensor) -> None:
    """``out[idx] = y`` in place, as whole-row copies (``index_copy_``) when both have the same per-sample layout."""
    ro, ry = _sample_rows(out), _sample_rows(y)
    if ro is not None and ry is not None and out.stride()[1:] == y.stride()[1:] and out.shape[1:] == y.shape[1:]:
        ro.index_copy_(0, idx, ry)
    else:
        out[idx] = y


def _shortcut_out(block: nn.Module, x: Tensor, inplace: bool) -> Tensor:
    """``block.shortcut(x)`` as a tensor that may be written into (``x`` itself only when ``inplace``)."""
    out = block.shortcut(x)
    if out is x:
        return out if inplace else x.clone()
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return out.clone()  # a strided view of x (a subsampling shortcut): never write through it
    return out


def skip_rows(block: nn.Module, x: Tensor, idx: Tensor, inplace: bool = False) -> Tensor:
    """:func:`skip_block` given the samples that run the block as indices ``idx`` (increasing, a tensor of
    known length): no host synchronisation."""
    n = idx.numel()
    if n == x.shape[0]:
        return block(x)
    if n == 0:
        return block.shortcut(x)
    out = _shortcut_out(block, x, inplace)
    put_rows(out, idx, block(take_rows(x, idx)))
    return out


def skip_plan(actions: Tensor) -> list[Tensor]:
    """The samples each block runs on under ``(B, K)`` 0/1 decisions known before the network runs, found with
    one host synchronisation for all ``K`` blocks (instead of one per block): ``K`` increasing index tensors
    for :func:`skip_rows`."""
    on = actions > 0.5
    order = torch.argsort((~on).T.to(torch.uint8), dim=1, stable=True)  # (K, B): each block's samples first
    counts = on.sum(0).tolist()  # the one host sync
    return [order[k, :n] for k, n in enumerate(counts)]


@dataclass
class SkipSchedule:
    """How to run a batch whose ``(B, K)`` block decisions are all known before the network runs
    (:func:`skip_schedule`).

    Attributes:
        order: ``(B,)`` the batch's samples sorted by policy (run the network on ``x[order]``, then put output
            ``n`` back at ``order[n]``).
        steps: per block, in the sorted order: ``("all", None)``, ``("none", None)``, ``("runs", [(start, end),
            ...])`` (the block runs on these contiguous slices: no gather, no scatter) or ``("rows", idx)`` (it
            runs on the samples ``idx``, :func:`skip_rows`).
    """

    order: Tensor
    steps: list[tuple[str, Any]]


def skip_schedule(actions: Tensor, min_run: int = 16) -> SkipSchedule:
    """Plan a forward under ``(B, K)`` 0/1 decisions known in advance (BlockDrop), with one host synchronisation.

    The samples are sorted by their policy, block 0's decision first (lexicographically, "on" before "off"),
    so that samples sharing a policy are adjacent and so are, at each block, the samples that run it — more
    so the earlier the block and the fewer distinct policies there are. A block whose samples then form
    slices of ``min_run`` samples on average (or one slice) runs on each slice in place (grouped execution:
    what a group of samples with one policy needs, without the gather and scatter); any other runs on its
    samples gathered (:func:`skip_rows`). The order is a permutation: outputs are per sample as without it.
    """
    on = (actions > 0.5).cpu()  # the one host sync
    b, k = on.shape
    order = torch.arange(b)
    for j in reversed(range(k)):  # stable sorts, last key first: lexicographic on (block 0, block 1, ...)
        order = order[torch.argsort((~on[order, j]).to(torch.uint8), stable=True)]
    sorted_on = on[order]
    steps: list[tuple[str, Any]] = []
    rows: list[tuple[int, Tensor]] = []
    for j in range(k):
        col = sorted_on[:, j]
        n = int(col.sum())
        if n == b:
            steps.append(("all", None))
            continue
        if n == 0:
            steps.append(("none", None))
            continue
        edges = torch.diff(col.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                           append=torch.zeros(1, dtype=torch.int8))
        starts, ends = (edges == 1).nonzero().squeeze(1).tolist(), (edges == -1).nonzero().squeeze(1).tolist()
        if len(starts) == 1 or n >= min_run * len(starts):
            steps.append(("runs", list(zip(starts, ends))))
        else:
            steps.append(("rows", None))
            rows.append((j, col.nonzero().squeeze(1)))
    dev = actions.device
    if rows:  # every index moved to the device in one copy
        flat = torch.cat([order] + [r for _, r in rows]).to(dev, non_blocking=True)
        order, rest = flat[:b], flat[b:].split([r.numel() for _, r in rows])
        for (j, _), r in zip(rows, rest):
            steps[j] = ("rows", r)
    else:
        order = order.to(dev, non_blocking=True)
    return SkipSchedule(order, steps)


def run_scheduled(block: nn.Module, x: Tensor, step: tuple[str, Any]) -> Tensor:
    """Block ``k`` of a :class:`SkipSchedule` on the forward's own running activation ``x`` (overwritten)."""
    kind, arg = step
    if kind == "all":
        return block(x)
    if kind == "none":
        return block.shortcut(x)
    if kind == "rows":
        return skip_rows(block, x, arg, inplace=True)
    out = _shortcut_out(block, x, inplace=True)
    for start, end in arg:
        out[start:end] = block(x[start:end])
    return out


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
