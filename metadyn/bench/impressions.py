"""Cost of crafting data impressions, relative to the teacher's own forward+backward.

On a batch of ``batch`` (256) impressions covering every class, it times

  (a) one synthesis step (:class:`metadyn.datafree.ImpressionBatch.step`: teacher forward on the
      inputs, the KL to the sampled targets, the gradient with respect to the inputs only, an Adam
      step on the inputs and the clamp to the data range),
  (b) one forward+backward of the teacher on a batch of the same size (cross-entropy, gradients with
      respect to its parameters, as in one training step without the optimiser),

and reports ``step_over_fwd_bwd`` = a / b (target <= 1.3), ``impressions_per_s`` (finished impressions
per second at the default number of steps: ``batch / (steps * a)``), the same ratio with the
BatchNorm-statistics prior on (``step_over_fwd_bwd_bn_prior``), the times, and ``device``. The teacher
runs in eval mode in both; its weights are random (BatchNorm statistics set on random inputs): the
cost of a step does not depend on what the teacher has learnt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metadyn.bench._timing import Batch, Repeats, Seed, Threads, time_interleaved
from metadyn.core.runtime import set_threads
from metadyn.core.train import pick_device
from metadyn.datafree import (
    ImpressionBatch,
    SynthesisSettings,
    class_similarity,
    dirichlet_concentration,
    final_layer_weight,
    sample_targets,
    static_cnn,
)
from metadyn.errors import InputError
from metadyn.registry import BENCHMARKS

MODELS = {  # the teachers of tasks/datafree_*.yaml: (in_shape, classes, widths)
    "digits": ((1, 8, 8), 10, (16, 32, 64)),
    "glyphs": ((1, 16, 16), 20, (8, 16, 32)),
}


@BENCHMARKS.register("impressions")
def run(quick: bool = False, model: str = "digits", batch: Batch = 256, repeats: Repeats = None,
        device: str = "auto", seed: Seed = 0, threads: Threads = None) -> dict:
    set_threads(threads)  # None: torch's default; 0: one per core other processes leave idle
    if model not in MODELS:
        raise InputError(f"unknown model {model!r} for the impressions benchmark; choose from: {', '.join(MODELS)}")
    if batch < 1:
        raise InputError(f"batch must be at least 1, got {batch}")
    dev = pick_device(device)
    torch.manual_seed(seed)
    in_shape, k, widths = MODELS[model]
    teacher = static_cnn(in_shape, k, widths).to(dev)
    teacher.train()
    with torch.no_grad():  # realistic BatchNorm running statistics
        for _ in range(3):
            teacher(torch.rand(64, *in_shape, device=dev))
    teacher.eval()

    classes = torch.arange(batch) % k
    betas = torch.where(torch.arange(batch) // k % 2 == 0, 1.0, 0.1)
    targets = sample_targets(dirichlet_concentration(class_similarity(final_layer_weight(teacher)).cpu(), classes,
                                                     betas)).to(dev)
    settings = SynthesisSettings()
    plain = ImpressionBatch(teacher, targets, in_shape, settings)
    with_bn = ImpressionBatch(teacher, targets, in_shape, SynthesisSettings(bn_weight=0.05))
    x = torch.rand(batch, *in_shape, device=dev)
    y = classes.to(dev)

    def fwd_bwd() -> None:
        teacher.zero_grad(set_to_none=True)
        F.cross_entropy(teacher(x), y).backward()

    with with_bn:
        times = time_interleaved({"step": plain.step, "step_bn": with_bn.step, "fwd_bwd": fwd_bwd}, dev,
                                 repeats=repeats or (7 if quick else 21), warmup=3)
    teacher.zero_grad(set_to_none=True)
    return {
        "model": model,
        "batch": batch,
        "steps_per_impression": settings.steps,
        "step_s": times["step"],
        "fwd_bwd_s": times["fwd_bwd"],
        "step_over_fwd_bwd": times["step"] / times["fwd_bwd"],
        "step_over_fwd_bwd_bn_prior": times["step_bn"] / times["fwd_bwd"],
        "impressions_per_s": batch / (settings.steps * times["step"]),
        "device": str(dev),
    }
