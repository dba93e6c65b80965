"""Distributed meta-training resumes on every rank: two gloo processes stopped after their first epoch's checkpoint
and started again end with the weights of an uninterrupted run (before, only rank 0 read the checkpoint: rank 1
started again from epoch 0 and the all-reduces went out of step)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metadyn.meta.distributed import meta_train

SETTINGS = dict(dataset="digits", n_way=3, k_shot=1, n_query=2, width=4, inner_steps=1, iterations=2, meta_batch=4,
                lr=0.1, optimizer="sgd", dtype=torch.float64)


def _ranks(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        whole = meta_train(None, epochs=2, **SETTINGS)
        meta_train(f"{folder}/meta.pt", epochs=1, **SETTINGS)  # stopped after its first checkpoint
        resumed = meta_train(f"{folder}/meta.pt", epochs=2, **SETTINGS)  # every rank reads it, rank 0 wrote it
        torch.save({"whole": whole, "resumed": resumed}, f"{folder}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another is still talking to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_meta_training_resumes_on_every_rank(tmp_path):
    mp.spawn(_ranks, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.load(tmp_path / "meta.pt", weights_only=True)["epoch"] == 2
    for k in r0["whole"]:
        assert torch.equal(r0["resumed"][k], r0["whole"][k]), k
        assert torch.equal(r1["resumed"][k], r0["whole"][k]), k
