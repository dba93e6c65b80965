"""Real vs simulated early exit on one batch.

On the same batch of 256 and the same network, under a confidence policy whose thresholds (fitted on
a separate validation batch) spend about half of the static network's FLOPs, it times

  (a) the static network (the final exit only),
  (b) every exit computed, then one picked per sample (how the MSDNet / SDN reference codes do it),
  (c) metadyn's dynamic inference with batch compaction,

and reports ``flop_speedup`` (static FLOPs / expected FLOPs of the policy), ``realized_speedup``
(a / c), ``simulated_speedup`` (a / b), ``ratio`` (realized / FLOP speedup), ``mismatches`` (samples
whose prediction differs between b and c) and ``device``. All three run the same inference-prepared
copy of the network (BatchNorm folded, channels-last) and, on the CPU, the same micro-batching (slices
of 64 that fit the cache; ``micro_batch``), so the ratios measure early exit alone. ``threads`` sets torch's
intra-op threads (default: torch's; 0: one per core other processes leave idle). ``plain_ratio`` is
the same ratio on the network as trained, run as one batch (BatchNorm kept, default layout): there the
memory-bound work that FLOPs ignore, and the cache misses of a 256-sample batch at full resolution,
weigh on the early stages that every sample runs.

The weights are random (BatchNorm statistics set on random inputs): timing depends only on where
samples leave, which the thresholds fix, not on what the network has learnt.
"""

from __future__ import annotations

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
from metadyn.core.flops import exit_costs, expected_cost
from metadyn.core.inference import dynamic_exit, micro_batched, prepare_for_inference, simulated_exit
from metadyn.core.policies import ThresholdPolicy, fit_thresholds_for_budget, policy_scores
from metadyn.core.runtime import set_threads
from metadyn.core.train import pick_device
from metadyn.errors import InputError
from metadyn.registry import BENCHMARKS


def build_model(model: str, in_shape):
    from metadyn.registry import BACKBONES

    if model == "resnet":
        return BACKBONES.get("resnet")(in_shape=in_shape, num_classes=10, depth=56, exits=(9, 18, 27))
    if model in BACKBONES:
        return BACKBONES.get(model)(in_shape=in_shape, num_classes=10)
    raise InputError(f"unknown model {model!r} for the inference benchmark")


@BENCHMARKS.register("inference")
def run(quick: bool = False, model: str = "resnet", batch: Batch = 256, budget: Fraction = 0.5, repeats: Repeats = None,
        device: str = "auto", seed: Seed = 0, micro_batch: MicroBatch = -1, threads: Threads = None) -> dict:
    import metadyn.core.backbones  # noqa: F401  (registers the backbones)

    set_threads(threads)  # None: torch's default; 0: one per core other processes leave idle

    dev = pick_device(device)
    micro_batch = micro_batch_for(micro_batch, dev)
    torch.manual_seed(seed)
    in_shape = (3, 32, 32)
    net = build_model(model, in_shape)
    net.train()
    with torch.no_grad():  # give BatchNorm realistic running statistics
        for _ in range(3):
            net(torch.randn(64, *in_shape))
    net.eval()
    costs = exit_costs(net, in_shape)
    fast = prepare_for_inference(net).to(dev)
    g = torch.Generator().manual_seed(seed + 1)
    x_val = torch.randn(batch, *in_shape, generator=g).to(dev).contiguous(memory_format=torch.channels_last)
    x = torch.randn(batch, *in_shape, generator=g).to(dev).contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        thresholds = fit_thresholds_for_budget(policy_scores([z.cpu() for z in fast(x_val).logits]),
                                               costs.cumulative, budget * costs.full)
        policy = ThresholdPolicy(thresholds.tolist())
        sim = simulated_exit(fast, x, policy)
        dyn = dynamic_exit(fast, x, policy)
        mismatches = int((sim.logits.argmax(-1) != dyn.logits.argmax(-1)).sum())
        exit_mismatches = int((sim.exit_idx != dyn.exit_idx).sum())
        plain = net.to(dev)
        x_plain = x.contiguous()
        mb = micro_batch
        times = time_interleaved({
            "full": lambda: micro_batched(fast.forward_final, x, mb),
            "simulated": lambda: micro_batched(lambda c: simulated_exit(fast, c, policy), x, mb),
            "dynamic": lambda: dynamic_exit(fast, x, policy, micro_batch=mb),
            # the same, on the network as trained (no BatchNorm folding, default layout, one batch)
            "plain_full": lambda: plain.forward_final(x_plain),
            "plain_dynamic": lambda: dynamic_exit(plain, x_plain, policy),
        }, dev, repeats=repeats or (3 if quick else 7))

    flop_speedup = costs.full / expected_cost(dyn.exit_idx.cpu(), costs.cumulative)
    realized = times["full"] / times["dynamic"]
    counts = torch.bincount(dyn.exit_idx.cpu(), minlength=net.num_exits)
    return {
        "benchmark": "inference",
        "model": f"{model}" + ("-56, exits after blocks 9/18/27" if model == "resnet" else ""),
        "batch": batch,
        "micro_batch": micro_batch,
        "flop_speedup": flop_speedup,
        "realized_speedup": realized,
        "simulated_speedup": times["full"] / times["simulated"],
        "ratio": realized / flop_speedup,
        "mismatches": mismatches,
        "exit_mismatches": exit_mismatches,
        "plain_ratio": times["plain_full"] / times["plain_dynamic"] / flop_speedup,
        "exit_fractions": (counts.double() / counts.sum()).tolist(),
        "median_ms": {k: 1e3 * v for k, v in times.items()},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
