"""Meta-training over several processes with torch.distributed (``torchrun``).

Every rank builds the same network (same seed) and draws the same meta-batches; inside
:meth:`MetaLearner.meta_gradient` rank ``r`` adapts only the episodes ``r, r + world, ...`` of each
meta-batch and the meta-gradients are all-reduced, so every rank takes the same optimizer step and
the parameters stay identical to a single-process run on the same episodes (up to float summation
order). Rank 0 writes the checkpoint.

    torchrun --nproc_per_node 2 -m metadyn.meta.distributed --out runs/dist_maml.pt --epochs 2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist


def meta_train(out: str | Path | None, *, dataset: str = "glyphs", n_way: int = 5, k_shot: int = 1,
               n_query: int = 15, width: int = 32, algorithm: str = "maml", inner_lr: float = 0.4,
               inner_steps: int = 1, epochs: int = 1, iterations: int = 10, meta_batch: int = 8,
               lr: float = 1e-3, optimizer: str = "adam", seed: int = 0, samples_per_class: int = 20,
               device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Meta-train Conv-4 with every exit as a task with :func:`~metadyn.core.train.fit`; under an
    initialised process group the episodes are sharded over the ranks. Returns the final state dict."""
    from metadyn.core.backbones.conv4 import conv4_exits
    from metadyn.core.train import fit, seed_everything
    from metadyn.data import EpisodeSampler
    from metadyn.meta.data import fewshot_pool
    from metadyn.meta.learner import MetaLearner
    from metadyn.meta.train import episode_stream

    seed_everything(seed)
    options = {"samples_per_class": samples_per_class} if dataset == "glyphs" else {}
    sampler = EpisodeSampler(fewshot_pool(dataset, "train", **options), n_way, k_shot, n_query, seed=seed)
    net = conv4_exits(tuple(sampler.pool.x.shape[1:]), n_way, width=width, norm="batch_episodic").to(dtype)
    learner = MetaLearner(net, algorithm, inner_lr=inner_lr, inner_steps=inner_steps)
    dev = torch.device(device)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    fit(learner, episode_stream(sampler, iterations, meta_batch, dev, dtype), loss=lambda value, _: value,
        epochs=epochs, lr=lr, optimizer=optimizer, momentum=0.0, weight_decay=0.0, schedule="constant", seed=seed,
        device=dev, progress=False, checkpoint=Path(out) if out is not None and rank0 else None)
    return learner.state_dict()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Distributed meta-training (run under torchrun).")
    p.add_argument("--out", required=True, help="checkpoint written by rank 0")
    for name, kind, default in (("dataset", str, "glyphs"), ("n-way", int, 5), ("k-shot", int, 1),
                                ("n-query", int, 15), ("width", int, 32), ("algorithm", str, "maml"),
                                ("inner-lr", float, 0.4), ("inner-steps", int, 1), ("epochs", int, 1),
                                ("iterations", int, 10), ("meta-batch", int, 8), ("lr", float, 1e-3),
                                ("optimizer", str, "adam"),
                                ("seed", int, 0)):
        p.add_argument(f"--{name}", type=kind, default=default)
    args = vars(p.parse_args(argv))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    try:
        meta_train(args.pop("out"), device=device, **args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
