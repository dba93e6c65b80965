"""What a gated network costs: FLOPs of its always-paid parts and of each block, and the policies it took."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metadyn.core.device import autocast, fits_on, module_device
from metadyn.core.flops import count_flops, probe
from metadyn.core.gating.blockdrop import BlockDropNet
from metadyn.core.gating.execution import final_logits
from metadyn.core.gating.skipnet import GatedResNet


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
    """Count the FLOPs (``count_flops``) of the stem, each block, each gate (SkipNet) or the policy network
    (BlockDrop), and the final head of ``model`` on one input of shape ``in_shape`` ``(C, H, W)``."""
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
        fixed += count_flops(final_logits, bb, h)
        if isinstance(model, BlockDropNet):
            fixed += count_flops(model.policy, x)
    return GatedCosts(fixed, blocks)


def policy_counts(actions: Tensor) -> list[tuple[str, int]]:
    """The distinct policies among ``(N, K)`` 0/1 decisions, as strings (block 0 first, ``1`` = ran), with how
    many samples took each, most frequent first (ties by string)."""
    rows = ["".join("1" if v else "0" for v in r) for r in (actions > 0.5).tolist()]
    return sorted(Counter(rows).items(), key=lambda kv: (-kv[1], kv[0]))


@torch.no_grad()
def evaluate_gated(net: GatedResNet | BlockDropNet, x: Tensor, y: Tensor, costs: GatedCosts,
                   batch_size: int = 256, top: int = 10, precision: str | None = None) -> dict:
    """Greedy decisions with real skipping (a block computes only on the samples whose gate is on): accuracy,
    MFLOPs per sample, blocks run, the share of samples running each block, the ``top`` policies taken, and
    ``correct`` (per-sample 0/1, for paired comparisons). Leaves ``net`` in eval mode with greedy decisions.

    Runs on ``net``'s device (``x`` is put there once when it fits) at ``precision`` (``None``: the ambient
    :func:`~metadyn.core.device.default_precision`); outputs stay on the device until the end, so a batch costs
    only the network's own host synchronisations (one for BlockDrop, one per block for SkipNet)."""
    dev = module_device(net)
    dtype = next(net.parameters()).dtype
    if x.device != dev and fits_on(dev, x.numel() * x.element_size()):
        x = x.to(dev)
    net.eval()
    net.mode = "greedy"
    logits, actions = [], []
    with autocast(dev, precision):
        for s in range(0, len(x), batch_size):
            out = net(x[s : s + batch_size].to(dev, dtype, non_blocking=True))
            logits.append(out.logits.float())
            actions.append(out.actions)
    lg, act = torch.cat(logits).cpu(), torch.cat(actions).cpu()
    hits = (lg.argmax(-1) == y.cpu()).double()
    pols = policy_counts(act)
    return {"accuracy": float(hits.mean()), "mflops": float(costs.mflops(act).mean()),
            "blocks_used": float(act.sum(1).mean()), "block_usage": act.float().mean(0).tolist(),
            "distinct_policies": len(pols), "correct": hits.tolist(), "logits": lg,
            "top_policies": [{"policy": k, "fraction": c / len(x)} for k, c in pols[:top]]}
