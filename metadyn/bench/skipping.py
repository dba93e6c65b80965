"""Real vs masked layer skipping (SkipNet gates) on one batch.

A gated ResNet-56 (SkipNet gates before each of its 27 blocks; ``gate``: ``ff`` feed-forward or ``rnn``
recurrent) whose gate biases are set, on a separate calibration batch, so that each gate runs its block
for a fraction ``keep`` (default one half) of the samples — every sample gets its own policy, so each
block sees a different subset of the batch. On a batch of 256 it times

  (a) dense: the always-on ResNet (no gates, every block),
  (b) masked: the reference SkipNet/BlockDrop codes' way — gates, then every block on every sample, mixed
      with the shortcut by the 0/1 decision (``mask * block(x) + (1 - mask) * shortcut(x)``),
  (c) metadyn: the gated network without autograd — a block runs only on the samples whose gate is on
      (``x[on] = block(x[on])``, :func:`metadyn.core.inference.skip_block`),

and reports ``flop_speedup`` (dense FLOPs / mean FLOPs of (c), gates included), ``realized_speedup``
(a / c), ``masked_speedup`` (a / b), ``ratio`` (realized / FLOP speedup), ``mismatches`` (samples whose
prediction differs between b and c) and ``device``. All three run the same inference-prepared copy
(BatchNorm folded, channels-last) and, on the CPU, the same slices of ``micro_batch`` samples.

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
from metadyn.core.gating import FeedForwardGates, GatedResNet, gated_costs, mix_block, policy_counts, skip_block
from metadyn.core.inference import micro_batched, prepare_for_inference
from metadyn.core.train import pick_device
from metadyn.errors import InputError
from metadyn.registry import BENCHMARKS

Depth = Annotated[int, Check(ge=8, le=1000)]  # a CIFAR ResNet's 6n+2


def masked_forward(net: GatedResNet, x: torch.Tensor) -> torch.Tensor:
    """The reference codes' gated forward: every block on every sample, mixed by the gate's 0/1 decision."""
    bb = net.backbone
    h = bb.stem(x)
    state = None
    for i, block in enumerate(bb.blocks):
        z, state = net.gate(i, h, state)
        h = mix_block(block, h, (torch.sigmoid(z) > 0.5).to(h.dtype))
    return bb.exit(bb.num_exits - 1, h)[0]


@torch.no_grad()
def calibrate_gates(net: GatedResNet, x: torch.Tensor, keep: float) -> None:
    """Shift gate output biases so that blocks run for a fraction ``keep`` of the samples of ``x``: each
    feed-forward gate's own bias (exactly ``keep`` per block), or the recurrent gate's shared bias (``keep``
    over all blocks, by bisection)."""
    bb = net.backbone
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
def run(quick: bool = False, model: str = "resnet", gate: Literal["ff", "rnn"] = "ff", depth: Depth = 56,
        batch: Batch = 256, keep: Fraction = 0.5, repeats: Repeats = None, device: str = "auto", seed: Seed = 0,
        micro_batch: MicroBatch = -1, threads: Threads = None) -> dict:
    if threads is not None:  # 1 on a loaded machine, where parallel ops wait on descheduled threads
        torch.set_num_threads(threads)
    if model != "resnet":
        raise InputError(f"unknown model {model!r} for the skipping benchmark; choose from: resnet")
    if not 0.0 < keep <= 1.0:
        raise InputError(f"keep must be in (0, 1], got {keep}")
    dev = pick_device(device)
    micro_batch = micro_batch_for(micro_batch, dev)
    torch.manual_seed(seed)
    in_shape = (3, 32, 32)
    net = GatedResNet(resnet_exits(in_shape, 10, depth=depth, exits=((depth - 2) // 2,)), gate=gate)
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
        out = fast(x)
        masked = masked_forward(fast, x)
        mismatches = int((out.logits.argmax(-1) != masked.argmax(-1)).sum())
        times = time_interleaved({
            "dense": lambda: micro_batched(fast.backbone.forward_final, x, mb),
            "masked": lambda: micro_batched(lambda c: masked_forward(fast, c), x, mb),
            "metadyn": lambda: micro_batched(lambda c: fast(c).logits, x, mb),
        }, dev, repeats=repeats or (3 if quick else 7))

    actions = out.actions.cpu()
    flop_speedup = dense_flops / float(costs.mflops(actions).mean() * 1e6)
    realized = times["dense"] / times["metadyn"]
    return {
        "benchmark": "skipping",
        "model": f"resnet-{depth} with SkipNet {gate} gates",
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
