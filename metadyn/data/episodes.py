"""N-way K-shot episodes for few-shot learning, deterministic per ``(seed, episode index)``.

An episode draws ``n_way`` classes, relabels them with a random permutation of ``0..n_way-1``, and
draws ``k_shot`` support and ``n_query`` disjoint query samples per class. Support and query are
class-major (sorted by label), as learn2learn's and torchmeta's samplers produce them, and
:meth:`EpisodeSampler.batch` stacks a meta-batch in torchmeta's ``(T, N*K, C, H, W)`` format.

References:
    Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016 (the episode protocol).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from metadyn.data.base import Split, check_finite
from metadyn.errors import InputError


class ClassPool:
    """Samples grouped by class, the source of episodes.

    Args:
        x: ``(N, C, H, W)`` images.
        y: ``(N,)`` integer labels (any ids, not necessarily contiguous).
    """

    def __init__(self, x: Tensor, y: Tensor):
        y = torch.as_tensor(y)
        if x.dim() != 4:
            raise InputError(f"class pool images must be (N, C, H, W), got shape {tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x):
            raise InputError(f"class pool labels must be ({len(x)},), got shape {tuple(y.shape)}")
        if len(y) == 0:
            raise InputError("class pool is empty")
        check_finite(x, "class pool")
        self.x = x
        self.y = y.long()
        self.classes: list[int] = torch.unique(self.y).tolist()  # sorted
        self._index = {c: torch.nonzero(self.y == c).flatten() for c in self.classes}

    @classmethod
    def from_data(cls, split: Split) -> ClassPool:
        """A pool over a classification split."""
        return cls(split.x, split.y)

    @classmethod
    def from_glyphs(cls, split: str, samples_per_class: int = 20, seed: int = 0, size: int = 28) -> ClassPool:
        """A pool over the glyph classes of a meta-learning split (train 400, val 100, test 100 classes)."""
        from metadyn.data.glyphs import glyph_class_ids, render_glyphs

        x, y = render_glyphs(glyph_class_ids(split), samples_per_class, seed=seed, size=size)
        return cls(x, y)

    def with_rotations(self) -> ClassPool:
        """A pool with four classes per class: its images rotated by 0, 90, 180 and 270 degrees.

        Class ``c`` rotated by ``r * 90`` degrees becomes class ``4 c + r``. This is the Omniglot
        augmentation of Santoro et al. (ICML 2016, Sec. 4.1) and Vinyals et al. (NeurIPS 2016, Sec. 4.1.1),
        used by MAML (Finn et al., ICML 2017, Sec. 5.1): a rotated character is treated as a new character.
        """
        h, w = self.x.shape[-2:]
        if h != w:
            raise InputError(f"rotations need square images, got {h}x{w}; set size")
        xs = [torch.rot90(self.x, r, dims=(2, 3)) for r in range(4)]
        ys = [4 * self.y + r for r in range(4)]
        return ClassPool(torch.cat(xs), torch.cat(ys))

    def count(self, c: int) -> int:
        """How many samples class ``c`` holds (0 for a class the pool does not have)."""
        idx = self._index.get(int(c))
        return 0 if idx is None else len(idx)

    def indices(self, c: int) -> Tensor:
        """The sample indices of class ``c``."""
        if int(c) not in self._index:
            raise InputError(f"class {c} is not in the pool")
        return self._index[int(c)]

    def __len__(self) -> int:
        return len(self.y)

    def __repr__(self) -> str:
        return f"ClassPool({len(self.classes)} classes, {len(self)} samples, shape {tuple(self.x.shape[1:])})"


@dataclass
class Episode:
    """One few-shot episode.

    Attributes:
        support_x: ``(N*K, C, H, W)``; support_y: ``(N*K,)`` in ``0..N-1``, class-major.
        query_x: ``(N*Q, C, H, W)``; query_y: ``(N*Q,)`` in ``0..N-1``, class-major.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str) -> Episode:
        return Episode(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


def _check_positive(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{name} must be a positive integer, got {v!r}")
    return v


class EpisodeSampler:
    """Deterministic N-way K-shot episodes from a :class:`ClassPool`.

    ``episode(i)`` depends only on ``(pool, n_way, k_shot, n_query, seed, i)``; iterating yields
    episodes ``0, 1, 2, ...`` without end.

    Example::

        sampler = EpisodeSampler(ClassPool.from_glyphs("train"), n_way=5, k_shot=1, n_query=15)
        ep = sampler.episode(0)          # ep.support_x: (5, 1, 28, 28), ep.query_x: (75, 1, 28, 28)
        sx, sy, qx, qy = sampler.batch(0, meta_batch=4)   # sx: (4, 5, 1, 28, 28)
    """

    def __init__(self, pool: ClassPool, n_way: int, k_shot: int, n_query: int, seed: int = 0):
        self.pool = pool
        self.n_way = _check_positive("n_way", n_way)
        if n_way < 2:
            raise InputError("n_way must be at least 2: a 1-way episode has nothing to tell apart")
        self.k_shot = _check_positive("k_shot", k_shot)
        self.n_query = _check_positive("n_query", n_query)
        self.seed = int(seed)
        if n_way > len(pool.classes):
            raise InputError(f"n_way={n_way} is larger than the {len(pool.classes)} classes available")
        smallest = min(pool.classes, key=pool.count)
        if k_shot + n_query > pool.count(smallest):
            raise InputError(
                f"k_shot + n_query = {k_shot + n_query} is larger than the {pool.count(smallest)} samples "
                f"of class {smallest}"
            )

    def _generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(i)) % (2**63))

    def episode_indices(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Episode ``i`` as pool indices: ``(chosen classes (N,), support (N, K), query (N, Q))``.

        Row ``l`` holds the samples of the class that gets label ``l``.
        """
        if int(i) < 0:
            raise InputError(f"episode index must be non-negative, got {i}")
        g = self._generator(i)
        classes = torch.tensor(self.pool.classes)
        chosen = classes[torch.randperm(len(classes), generator=g)[: self.n_way]]  # label l -> chosen[l]
        k = self.k_shot
        rows = []
        for c in chosen.tolist():
            idx = self.pool.indices(c)
            rows.append(idx[torch.randperm(len(idx), generator=g)[: k + self.n_query]])
        picks = torch.stack(rows)  # (N, K+Q)
        return chosen, picks[:, :k], picks[:, k:]

    def episode(self, i: int) -> Episode:
        """Episode ``i``: support and query class-major, labels a random permutation over the classes."""
        _, sup, qry = self.episode_indices(i)
        labels = torch.arange(self.n_way)
        x = self.pool.x
        return Episode(
            support_x=x[sup.flatten()],  # (N*K, C, H, W)
            support_y=labels.repeat_interleave(self.k_shot),  # (N*K,)
            query_x=x[qry.flatten()],  # (N*Q, C, H, W)
            query_y=labels.repeat_interleave(self.n_query),  # (N*Q,)
        )

    def __iter__(self) -> Iterator[Episode]:
        return (self.episode(i) for i in itertools.count())

    def batch(self, start: int, meta_batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Episodes ``start .. start+meta_batch-1`` stacked (torchmeta's batch format).

        Returns:
            ``support_x (T, N*K, C, H, W), support_y (T, N*K), query_x (T, N*Q, C, H, W), query_y (T, N*Q)``.
        """
        _check_positive("meta_batch", meta_batch)
        eps = [self.episode(start + t) for t in range(meta_batch)]
        return (
            torch.stack([e.support_x for e in eps]),  # (T, N*K, C, H, W)
            torch.stack([e.support_y for e in eps]),  # (T, N*K)
            torch.stack([e.query_x for e in eps]),  # (T, N*Q, C, H, W)
            torch.stack([e.query_y for e in eps]),  # (T, N*Q)
        )

    def __repr__(self) -> str:
        shots = f"{self.n_way}-way {self.k_shot}-shot, {self.n_query} queries"
        return f"EpisodeSampler({shots}, seed={self.seed}, {self.pool})"
