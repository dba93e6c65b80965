"""learn2learn ``Taskset`` and torchmeta batch-dict adapters.

- :class:`TasksetEpisodes` wraps a learn2learn ``TaskDataset`` (anything whose ``taskset[i]`` returns
  ``(x, y)`` holding ``k_shot + n_query`` samples of each of ``n_way`` labels) as an
  :class:`~metadyn.data.EpisodeSampler`-like source of :class:`~metadyn.data.Episode`\\ s and
  torchmeta-format batches, so :class:`~metadyn.meta.MetaLearner` trains on it unchanged.
- :func:`from_torchmeta_batch` / :func:`to_torchmeta_batch` convert torchmeta's
  ``{"train": (x, y), "test": (x, y)}`` with ``(T, N*K, C, H, W)`` tensors to and from metadyn's
  ``(support_x, support_y, query_x, query_y)`` tuple (torchmeta itself no longer imports).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from metadyn.data.episodes import ClassPool, Episode
from metadyn.errors import InputError


def import_peer(name: str):
    """Import a peer library, or fail with a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InputError(f"{name} is not installed ({e}); install metadyn's peers: pip install 'metadyn[peers]' "
                         "or scripts/install_peers.sh VENV_PYTHON") from None


def split_task(x: Tensor, y: Tensor, k_shot: int) -> Episode:
    """One task's samples -> an :class:`Episode`: per label (sorted, relabelled ``0..N-1``) the first
    ``k_shot`` samples are the support, the rest the query; both class-major."""
    y = torch.as_tensor(y)
    labels = torch.unique(y)
    per = [torch.nonzero(y == c).flatten() for c in labels]
    counts = {len(i) for i in per}
    if len(counts) != 1 or min(counts) <= k_shot:
        raise InputError(f"a task needs the same number (> k_shot={k_shot}) of samples per label, got "
                         f"{sorted(len(i) for i in per)}")
    q = min(counts) - k_shot
    sup = torch.cat([i[:k_shot] for i in per])
    qry = torch.cat([i[k_shot:] for i in per])
    new = torch.arange(len(labels))
    return Episode(x[sup], new.repeat_interleave(k_shot), x[qry], new.repeat_interleave(q))


class TasksetEpisodes:
    """Episodes from a learn2learn taskset: ``episode(i)`` splits ``taskset[i]`` with :func:`split_task`.

    Example::

        tasks = l2l.data.TaskDataset(meta_dataset, task_transforms=[NWays(ds, 5), KShots(ds, 1 + 15),
                                     LoadData(ds), RemapLabels(ds)], num_tasks=1000)
        source = TasksetEpisodes(tasks, k_shot=1)
        learner(source.batch(0, 8)).backward()
    """

    def __init__(self, taskset, k_shot: int):
        if not hasattr(taskset, "__getitem__"):
            raise InputError(f"expected a learn2learn TaskDataset (indexable), got {type(taskset).__name__}")
        self.taskset = taskset
        self.k_shot = int(k_shot)

    def episode(self, i: int) -> Episode:
        x, y = self.taskset[i][:2]
        return split_task(torch.as_tensor(x), torch.as_tensor(y), self.k_shot)

    def batch(self, start: int, meta_batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        eps = [self.episode(start + t) for t in range(meta_batch)]
        return tuple(torch.stack([getattr(e, a) for e in eps])  # (T, ...)
                     for a in ("support_x", "support_y", "query_x", "query_y"))


def to_learn2learn_taskset(pool: ClassPool, n_way: int, k_shot: int, n_query: int, num_tasks: int = -1):
    """A learn2learn ``TaskDataset`` of N-way (K+Q)-shot tasks over a metadyn :class:`ClassPool`."""
    l2l = import_peer("learn2learn")
    from torch.utils.data import TensorDataset

    dataset = l2l.data.MetaDataset(TensorDataset(pool.x, pool.y))
    transforms = [l2l.data.transforms.NWays(dataset, n_way), l2l.data.transforms.KShots(dataset, k_shot + n_query),
                  l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset)]
    return l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=num_tasks)


def from_torchmeta_batch(batch: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchmeta's ``{"train": (x, y), "test": (x, y)}`` -> ``(support_x, support_y, query_x, query_y)``."""
    if not isinstance(batch, dict) or "train" not in batch or "test" not in batch:
        raise InputError("a torchmeta batch is a dict with 'train' and 'test' entries of (inputs, targets)")
    (sx, sy), (qx, qy) = batch["train"][:2], batch["test"][:2]
    for name, x, y in (("train", sx, sy), ("test", qx, qy)):
        if x.dim() < 3 or y.shape != x.shape[:2]:
            raise InputError(f"torchmeta batch {name!r}: inputs (T, N*K, ...) and targets (T, N*K) expected, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    if len(sx) != len(qx):
        raise InputError(f"torchmeta batch: {len(sx)} support tasks but {len(qx)} query tasks")
    return sx, sy.long(), qx, qy.long()


def to_torchmeta_batch(batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> dict:
    """metadyn's ``(support_x, support_y, query_x, query_y)`` -> torchmeta's batch dict."""
    sx, sy, qx, qy = batch
    return {"train": (sx, sy), "test": (qx, qy)}
