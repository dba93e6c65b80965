"""Two gloo processes on the CPU end with the parameters of a single-process run on the same episodes."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metadyn.meta.distributed import meta_train

SETTINGS = dict(dataset="digits", n_way=3, k_shot=1, n_query=2, width=4, inner_steps=1, epochs=2, iterations=2,
                meta_batch=4, lr=0.1, optimizer="sgd", dtype=torch.float64)  # Adam would blow up the float noise of
# the zero-mean gradients of conv biases before BatchNorm into full-size steps


def _rank(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state = meta_train(None, **SETTINGS)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = meta_train(None, **SETTINGS)
    finally:
        torch.set_num_threads(old)
    both = torch.load(out, weights_only=True)
    assert single.keys() == both.keys()
    start = meta_train(None, **{**SETTINGS, "epochs": 0})
    moved = [k for k in single if not torch.equal(single[k], start[k])]
    assert moved  # training changed the weights, so the comparison means something
    for k in single:
        assert torch.allclose(single[k], both[k], atol=1e-10, rtol=1e-9), k
