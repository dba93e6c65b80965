"""Data-parallel training on the CPU with gloo: two processes take the step one process takes on the same global
batch, an interrupted two-process run resumes from rank 0's checkpoint on every rank, and ``metadyn run`` works
under ``torchrun``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metadyn.core import distributed
from metadyn.core.backbones.mlp import mlp_exits
from metadyn.core.losses import AdaptiveTemperature
from metadyn.core.train import fit

N, IN_SHAPE, CLASSES = 40, (1, 4, 4), 3
SETTINGS = dict(batch_size=10, lr=0.1, momentum=0.9, weight_decay=1e-3, schedule="constant", progress=False)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, *IN_SHAPE, generator=g, dtype=torch.float64), torch.arange(N) % CLASSES


def _model():
    torch.manual_seed(0)
    return mlp_exits(IN_SHAPE, CLASSES, hidden=[8, 8]).double()


def _train(epochs: int, checkpoint=None) -> dict:
    model = _model()
    fit(model, _data(), epochs=epochs, device="cpu", checkpoint=checkpoint, **SETTINGS)
    return model.state_dict()


def _ranks(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        whole = _train(3)
        _train(1, f"{folder}/ck.pt")  # "killed" after its first epoch's checkpoint
        resumed = _train(3, f"{folder}/ck.pt")  # a new process would start here: every rank reads rank 0's file
        ts = [torch.full((5,), float(rank + 1)), torch.full((2, 3), 10.0 * (rank + 1)),
              torch.tensor([rank], dtype=torch.float64)]
        distributed.all_reduce_coalesced(ts, bucket_bytes=24)  # several buckets, two dtypes
        # IMTA's adaptive temperature: rank 0's teacher is confident (max prob ~0.9), rank 1's is not (~0.33);
        # the global mean (~0.62 > 0.5) raises tau on both ranks, though rank 1 alone would not.
        temp = AdaptiveTemperature()
        temp.update(torch.tensor([[4.0, 0.0, 0.0]]) if rank == 0 else torch.zeros(1, 3))
        torch.save({"whole": whole, "resumed": resumed, "reduced": ts, "tau": float(temp.tau)},
                   f"{folder}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while another is still talking to it (SIGABRT otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_train_as_one_resume_and_reduce_in_buckets(tmp_path):
    mp.spawn(_ranks, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2, join=True)
    single = _train(3)
    start = _model().state_dict()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert any(not torch.equal(single[k], start[k]) for k in single)  # training moved the weights
    for k in single:
        torch.testing.assert_close(r0["whole"][k], single[k], rtol=1e-10, atol=1e-12)  # the same global batches
        assert torch.equal(r0["whole"][k], r1["whole"][k])  # every rank holds the same model
        assert torch.equal(r0["resumed"][k], r0["whole"][k]), k  # an interrupted run ends as the whole one
        assert torch.equal(r1["resumed"][k], r0["whole"][k]), k
    a, b, c = r1["reduced"]  # summed over the ranks, bucket by bucket
    assert torch.equal(a, torch.full((5,), 3.0)) and torch.equal(b, torch.full((2, 3), 30.0))
    assert torch.equal(c, torch.tensor([1.0], dtype=torch.float64))
    assert r0["tau"] == r1["tau"] == 1.05  # one schedule on every rank, from the global batch's confidence


def test_shares_of_a_global_batch():
    from metadyn.core.train import _Batches

    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    one = _Batches((x, y), 10, 0, torch.device("cpu"))
    assert one.steps() == 3 and [len(b[0]) for b in one.epoch(0)] == [10, 10, 3]
    two = _Batches((x, y), 10, 0, torch.device("cpu"))
    two.rank, two.world = 1, 2
    parts = list(two.epoch(0))
    assert two.steps() == 3 and [len(b[0]) for b in parts] == [5, 5, 1] and [b[2] for b in parts] == [0.5, 0.5, 1 / 3]
    whole = [b[0] for b in one.epoch(0)]
    assert torch.equal(parts[0][0], whole[0][5:]) and torch.equal(parts[2][0], whole[2][2:])  # rank 1's share
    two.world = 4
    assert two.steps() == 2  # a last batch of 3 samples cannot give 4 ranks one each: dropped


def test_bucketed_all_reduce_is_a_noop_alone():
    t = torch.ones(3)
    distributed.all_reduce_coalesced([t])
    assert torch.equal(t, torch.ones(3)) and distributed.world_size() == 1 and distributed.is_rank0()


@pytest.mark.slow
def test_metadyn_run_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "metadyn.cli",
           "run", "digits_anytime", "--quick", "--out", str(out), "--no-progress", "--device", "cpu",
           "--set", "train.epochs=2", "--set", "model.options={depth: 8, exits: [1, 2], width: 4}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["world_size"] == 2 and m["rows"]
    assert r.stdout.count("wrote ") == 1  # rank 0 reports, once
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
