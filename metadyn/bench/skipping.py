"""Real vs masked layer skipping (SkipNet gates or a BlockDrop policy) on one batch.

A gated ResNet-56 (``gate``: SkipNet gates before each of its 27 blocks, ``ff`` feed-forward or ``rnn``
recurrent; or ``blockdrop``, BlockDrop's policy network deciding all 27 blocks from the downsampled input)
whose gate biases are set, on a separate calibration batch, so that each block runs for a fraction ``keep``
(default one half) of the samples. With SkipNet and the BlockDrop policy network every sample gets its own
policy, so each block sees a different subset of the batch. ``policies`` (BlockDrop only) instead draws
every sample's decisions from that many distinct policies (each keeping about ``keep`` of the blocks), as a
trained BlockDrop's concentrate on few; the policy network still runs and is timed. On a batch of 256 it
times

  (a) dense: the always-on ResNet (no gates, every block),
  (b) masked: the reference SkipNet/BlockDrop codes' way — gates, then every block on every sample, mixed
      with the shortcut by the 0/1 decision (``mask * block(x) + (1 - mask) * shortcut(x)``),
  (c) metadyn: the gated network without autograd — a block runs only on the samples whose gate is on
      (SkipNet: ``x[on] = block(x[on])`` with whole-sample row copies,
      :func:`metadyn.core.gating.skip_block`; BlockDrop: samples sorted by policy, blocks run on slices
      of the sorted batch or on gathered samples, :func:`metadyn.core.gating.execution.skip_schedule`),

and reports ``flop_speedup`` (dense FLOPs / mean FLOPs of (c), gates or policy network included),
``realized_speedup`` (a / c), ``masked_speedup`` (a / b), ``ratio`` (realized / FLOP speedup),
``mismatches`` (samples whose prediction differs between b and c) and ``device``. All three run the same
inference-prepared copy (BatchNorm folded, channels-last) and, on the CPU, the same slices of
``micro_batch`` samples; ``threads`` sets torch's intra-op threads (default: torch's; 0: one per core that
other processes leave idle, :func:`metadyn.core.runtime.idle_cores`).

The weights are random (BatchNorm statistics set on random inputs): timing depends only on which blocks
run, which the calibrated gates fix, not on what the network has learnt.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

from metadyn.bench._timing import (
    Batch,
    Fraction,
    MicroBatch,
    Repeats,
    Seed,
    Threads,
    micro_batch_for,
    time_interleaved,
)
from metadyn.config import Check
from metadyn.core.backbones.resnet import resnet_exits
from metadyn.core.flops import exit_costs
from metadyn.core.gating import (
    BlockDropNet,
    FeedForwardGates,
    GatedResNet,
    PolicyNet,
    gated_costs,
    mix_block,
    policy_counts,
    skip_block,
)
from metadyn.core.inference import micro_batched, prepare_for_inference
from metadyn.core.runtime import set_threads
from metadyn.core.train import pick_device
from metadyn.errors import InputError
from metadyn.registry import BENCHMARKS

Depth = Annotated[int, Check(ge=8, le=1000)]  # a CIFAR ResNet's 6n+2
Policies = Annotated[int | None, Check(ge=1, le=65_536)]


def masked_forward(net: GatedResNet | BlockDropNet, x: torch.Tensor, actions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The reference codes' gated forward: every block on every sample, mixed by the gate's 0/1 decision
    (BlockDrop: the policy network's, or ``actions`` after running it)."""
    bb = net.backbone
    if isinstance(net, BlockDropNet):
        keep = (net.policy(x) >= 0.5).to(x.dtype) if actions is None else _after_policy(net, x, actions)
        h = bb.stem(x)
        for i, block in enumerate(bb.blocks):
            h = mix_block(block, h, keep[:, i])
        return bb.exit(bb.num_exits - 1, h)[0]
    h = bb.stem(x)
    state = None
    for i, block in enumerate(bb.blocks):
        z, state = net.gate(i, h, state)
        h = mix_block(block, h, (torch.sigmoid(z) > 0.5).to(h.dtype))
    return bb.exit(bb.num_exits - 1, h)[0]


def _after_policy(net: BlockDropNet, x: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``actions``, once the policy network has run on ``x`` (its cost is paid, its decisions replaced)."""
    net.policy(x)
    return actions


@torch.no_grad()
def calibrate_gates(net: GatedResNet | BlockDropNet, x: torch.Tensor, keep: float) -> None:
    """Shift gate output biases so that blocks run for a fraction ``keep`` of the samples of ``x``: each
    feed-forward gate's own bias or each output of BlockDrop's policy network (exactly ``keep`` per block),
    or the recurrent gate's shared bias (``keep`` over all blocks, by bisection)."""
    bb = net.backbone
    if isinstance(net, BlockDropNet):
        fc = net.policy.net.heads[-1].fc
        fc.bias -= torch.quantile(torch.logit(net.policy(x).double()), 1 - keep, dim=0).to(fc.bias.dtype)
        return
    if isinstance(net.gate, FeedForwardGates):
        h = bb.stem(x)
        for i, block in enumerate(bb.blocks):
            net.gate.fcs[i].bias -= torch.quantile(net.gate(i, h, None)[0], 1 - keep)
            h = skip_block(block, h, net.gate(i, h, None)[0] > 0)
        return
    bias = net.gate.proj.bias
    lo, hi = bias - 20, bias + 20
    for _ in range(30):
        bias.copy_((lo + hi) / 2)
        if float(net(x).actions.mean()) > keep:
            hi = bias.clone()
        else:
            lo = bias.clone()


@BENCHMARKS.register("skipping")
def run(quick: bool = False, model: str = "resnet", gate: Literal["ff", "rnn", "blockdrop"] = "ff", depth: Depth = 56,
        batch: Batch = 256, keep: Fraction = 0.5, policies: Policies = None, repeats: Repeats = None,
        device: str = "auto", seed: Seed = 0, micro_batch: MicroBatch = -1, threads: Threads = None) -> dict:
    set_threads(threads)  # 1 (or 0: one per idle core) on a loaded machine, where parallel ops wait on busy cores
    if model != "resnet":
        raise InputError(f"unknown model {model!r} for the skipping benchmark; choose from: resnet")
    if not 0.0 < keep <= 1.0:
        raise InputError(f"keep must be in (0, 1], got {keep}")
    dev = pick_device(device)
    micro_batch = micro_batch_for(micro_batch, dev)
    torch.manual_seed(seed)
    in_shape = (3, 32, 32)
    if policies is not None and gate != "blockdrop":
        raise InputError("policies is a BlockDrop setting: pass gate=blockdrop with it")
    backbone = resnet_exits(in_shape, 10, depth=depth, exits=((depth - 2) // 2,))
    if gate == "blockdrop":
        net: GatedResNet | BlockDropNet = BlockDropNet(backbone, PolicyNet(in_shape, len(backbone.blocks)))
    else:
        net = GatedResNet(backbone, gate=gate)
    net.train()
    with torch.no_grad():  # give BatchNorm realistic running statistics
        for _ in range(3):
            net(torch.randn(64, *in_shape))
    net.eval()
    g = torch.Generator().manual_seed(seed + 1)
    calibrate_gates(net, torch.randn(batch, *in_shape, generator=g), keep)
    costs = gated_costs(net, in_shape)
    dense_flops = exit_costs(net.backbone, in_shape).full
    fast = prepare_for_inference(net).to(dev)
    x = torch.randn(batch, *in_shape, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    mb = micro_batch

    with torch.inference_mode():
        if policies is None:
            actions = fast(x).actions

            def metadyn(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
                return fast(c).logits

            def masked(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
                return masked_forward(fast, c)
        else:  # each sample draws one of `policies` fixed decision vectors, after the policy network has run
            draw = torch.Generator().manual_seed(seed + 2)
            table = (torch.rand(policies, fast.num_blocks, generator=draw) < keep).to(x.dtype)
            actions = table[torch.randint(0, policies, (batch,), generator=draw)].to(dev)

            def metadyn(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
                return fast.run_policy(c, _after_policy(fast, c, a))

            def masked(c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
                return masked_forward(fast, c, a)

        def sliced(fn) -> torch.Tensor:  # micro_batched, each slice with its own decisions
            step = mb or batch
            return torch.cat([fn(c, a) for c, a in zip(x.split(step), actions.split(step))])

        mismatches = int((sliced(metadyn).argmax(-1) != sliced(masked).argmax(-1)).sum())
        times = time_interleaved({
            "dense": lambda: micro_batched(fast.backbone.forward_final, x, mb),
            "masked": lambda: sliced(masked),
            "metadyn": lambda: sliced(metadyn),
        }, dev, repeats=repeats or (3 if quick else 7))

    actions = actions.cpu()
    flop_speedup = dense_flops / float(costs.mflops(actions).mean() * 1e6)
    realized = times["dense"] / times["metadyn"]
    return {
        "benchmark": "skipping",
        "model": f"resnet-{depth} with " + (f"SkipNet {gate} gates" if gate != "blockdrop" else "a BlockDrop policy"
                                             + (f" drawn from {policies} policies" if policies else "")),
        "batch": batch,
        "micro_batch": micro_batch,
        "flop_speedup": flop_speedup,
        "realized_speedup": realized,
        "masked_speedup": times["dense"] / times["masked"],
        "ratio": realized / flop_speedup,
        "mismatches": mismatches,
        "blocks_used": float(actions.mean()),
        "distinct_policies": len(policy_counts(actions)),
        "gate_mflops": (costs.fixed - (dense_flops - sum(costs.blocks))) / 1e6,
        "dense_mflops": dense_flops / 1e6,
        "median_ms": {k: 1e3 * v for k, v in times.items()},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
