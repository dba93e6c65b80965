"""Meta-training over several processes with torch.distributed (``torchrun``).

Every rank builds the same network (same seed) and draws the same meta-batches; inside
:meth:`MetaLearner.meta_gradient` rank ``r`` adapts only the episodes ``r, r + world, ...`` of each
meta-batch and the meta-gradients are all-reduced (in buckets), so every rank takes the same optimizer step and
the parameters stay identical to a single-process run on the same episodes (up to float summation order).
Checkpoints follow :mod:`metadyn.core.distributed`'s protocol through :func:`~metadyn.core.train.fit`: every rank
resumes from the same checkpoint, rank 0 writes it, and every rank waits until it is written.

    torchrun --nproc_per_node 2 -m metadyn.meta.distributed --out runs/dist_maml.pt --epochs 2

On GPUs each rank takes ``cuda:LOCAL_RANK`` and the group uses NCCL; on CPUs, gloo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist


def meta_train(out: str | Path | None, *, dataset: str = "glyphs", n_way: int = 5, k_shot: int = 1,
               n_query: int = 15, width: int = 32, algorithm: str = "maml", inner_lr: float = 0.4,
               inner_steps: int = 1, epochs: int = 1, iterations: int = 10, meta_batch: int = 8,
               lr: float = 1e-3, optimizer: str = "adam", seed: int = 0, samples_per_class: int = 20,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               batched: bool | None = None) -> dict:
    """Meta-train Conv-4 with every exit as a task with :func:`~metadyn.core.train.fit`, checkpointing to ``out``
    (resumed from it when it exists); under an initialised process group the episodes are sharded over the
    ranks. Returns the final state dict."""
    from metadyn.core.backbones.conv4 import conv4_exits
    from metadyn.core.train import fit, pick_device, seed_everything
    from metadyn.data import EpisodeSampler
    from metadyn.meta.data import fewshot_pool
    from metadyn.meta.learner import MetaLearner
    from metadyn.meta.train import episode_stream

    seed_everything(seed)
    options = {"samples_per_class": samples_per_class} if dataset == "glyphs" else {}
    sampler = EpisodeSampler(fewshot_pool(dataset, "train", **options), n_way, k_shot, n_query, seed=seed)
    net = conv4_exits(tuple(sampler.pool.x.shape[1:]), n_way, width=width, norm="batch_episodic").to(dtype)
    learner = MetaLearner(net, algorithm, inner_lr=inner_lr, inner_steps=inner_steps, batched=batched)
    dev = pick_device(device)
    fit(learner, episode_stream(sampler, iterations, meta_batch, dev, dtype), loss=lambda value, _: value,
        epochs=epochs, lr=lr, optimizer=optimizer, momentum=0.0, weight_decay=0.0, schedule="constant", seed=seed,
        device=dev, progress=False, checkpoint=Path(out) if out is not None else None)
    return learner.state_dict()


def main(argv: list[str] | None = None) -> None:
    from metadyn.core.distributed import init_from_env
    from metadyn.core.train import pick_device

    p = argparse.ArgumentParser(description="Distributed meta-training (run under torchrun).")
    p.add_argument("--out", required=True, help="the checkpoint: rank 0 writes it, every rank resumes from it")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    for name, kind, default in (("dataset", str, "glyphs"), ("n-way", int, 5), ("k-shot", int, 1),
                                ("n-query", int, 15), ("width", int, 32), ("algorithm", str, "maml"),
                                ("inner-lr", float, 0.4), ("inner-steps", int, 1), ("epochs", int, 1),
                                ("iterations", int, 10), ("meta-batch", int, 8), ("lr", float, 1e-3),
                                ("optimizer", str, "adam"),
                                ("seed", int, 0)):
        p.add_argument(f"--{name}", type=kind, default=default)
    args = vars(p.parse_args(argv))
    device = init_from_env(pick_device(args.pop("device")))
    try:
        meta_train(args.pop("out"), device=device, **args)
        dist.barrier()  # every rank done before any tears the process group down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
