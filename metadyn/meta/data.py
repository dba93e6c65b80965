"""Few-shot class pools by name: one :class:`~metadyn.data.ClassPool` per meta-split, classes disjoint.

``glyphs`` (procedural, 400 / 100 / 100 classes), ``digits`` (scikit-learn's, classes 0-3 / 4-6 /
7-9: at most 3-way episodes outside training) and the local folders of
:mod:`metadyn.data.fewshot_folders` (``omniglot``, ``miniimagenet``, ``cifar_fs``).

For Omniglot's one-shot protocol (Lake et al.), :func:`oneshot_samplers` gives meta-train episodes from
background characters (optionally within one alphabet, :class:`AlphabetEpisodes`) and meta-val episodes from
held-out background alphabets.
"""

from __future__ import annotations

import torch

from metadyn.config import checked_call
from metadyn.data import fewshot_folders
from metadyn.data.episodes import ClassPool
from metadyn.errors import InputError

DIGIT_SPLITS = {"train": range(0, 4), "val": range(4, 7), "test": range(7, 10)}


def _glyphs(split: str, samples_per_class: int = 20, size: int = 28, glyph_seed: int = 0) -> ClassPool:
    return ClassPool.from_glyphs(split, samples_per_class=samples_per_class, seed=glyph_seed, size=size)


def _digits(split: str) -> ClassPool:
    from metadyn.data.digits import _raw_digits

    if split not in DIGIT_SPLITS:
        raise InputError(f"unknown split {split!r} of 'digits'; choose from: train, val, test")
    x, y = _raw_digits()
    x, y = torch.from_numpy(x).reshape(-1, 1, 8, 8) / 16.0, torch.from_numpy(y)
    keep = (y >= DIGIT_SPLITS[split].start) & (y < DIGIT_SPLITS[split].stop)
    return ClassPool(x[keep], y[keep])


FEWSHOT_SETS = {"glyphs": _glyphs, "digits": _digits, "omniglot": fewshot_folders.omniglot,
                "miniimagenet": fewshot_folders.miniimagenet, "cifar_fs": fewshot_folders.cifar_fs}
_NEEDS_ROOT = ("omniglot", "miniimagenet", "cifar_fs")


def fewshot_pool(name: str, split: str, root: str | None = None, **options) -> ClassPool:
    """The pool of meta-split ``split`` (train / val / test) of few-shot set ``name``.

    Example::

        pool = fewshot_pool("glyphs", "test", samples_per_class=20)
        pool = fewshot_pool("omniglot", "train", root="~/data/omniglot", size=28)
    """
    if name not in FEWSHOT_SETS:
        raise InputError(f"unknown few-shot dataset {name!r}; choose from: {', '.join(FEWSHOT_SETS)}")
    if name in _NEEDS_ROOT:
        return checked_call(FEWSHOT_SETS[name], options, "data.options", root=root, split=split)
    if root is not None:
        raise InputError(f"few-shot dataset {name!r} takes no root (got root={root!r})")
    return checked_call(FEWSHOT_SETS[name], options, "data.options", split=split)


class AlphabetEpisodes:
    """N-way K-shot episodes whose classes all come from one alphabet, as in Lake et al.'s one-shot test (each
    run is 20-way within one alphabet). Episode ``i`` draws an alphabet uniformly among those with at least
    ``n_way`` classes, then an episode of that alphabet's :class:`~metadyn.data.EpisodeSampler`; it depends only
    on ``(pools, n_way, k_shot, n_query, seed, i)``. Same interface as ``EpisodeSampler`` (``episode``, ``batch``).
    """

    def __init__(self, pools: dict, n_way: int, k_shot: int, n_query: int, seed: int = 0):
        from metadyn.data.episodes import EpisodeSampler

        self.names = [a for a in sorted(pools) if len(pools[a].classes) >= n_way]
        if not self.names:
            sizes = ", ".join(f"{a}: {len(p.classes)}" for a, p in sorted(pools.items()))
            raise InputError(f"no alphabet has n_way={n_way} classes for within-alphabet episodes ({sizes})")
        self.samplers = [EpisodeSampler(pools[a], n_way, k_shot, n_query, seed=seed * 1009 + j)
                         for j, a in enumerate(self.names)]
        self.n_way, self.k_shot, self.n_query, self.seed = n_way, k_shot, n_query, int(seed)

    def alphabet(self, i: int) -> str:
        """The alphabet episode ``i`` is drawn from."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(i) + 7) % (2**63))
        return self.names[int(torch.randint(len(self.names), (1,), generator=g))]

    def episode(self, i: int):
        return self.samplers[self.names.index(self.alphabet(i))].episode(i)

    def batch(self, start: int, meta_batch: int):
        """Episodes ``start .. start + meta_batch - 1`` stacked, as :meth:`EpisodeSampler.batch`."""
        eps = [self.episode(start + t) for t in range(meta_batch)]
        return tuple(torch.stack([getattr(e, a) for e in eps]) for a in ("support_x", "support_y", "query_x",
                                                                          "query_y"))

    def __repr__(self) -> str:
        return (f"AlphabetEpisodes({self.n_way}-way {self.k_shot}-shot, {self.n_query} queries, seed={self.seed}, "
                f"alphabets: {', '.join(self.names)})")


def oneshot_samplers(chars, val_alphabets, n_way: int, k_shot: int, n_query: int, *, within_alphabet: bool = True,
                     rotations: bool = False, seed: int = 0, val_seed: int = 0) -> dict:
    """Meta-train and meta-val episodes for Omniglot's one-shot protocol, from background characters only.

    Args:
        chars: :class:`~metadyn.data.fewshot_folders.OmniglotCharacters` of the background sets.
        val_alphabets: alphabets held out for model selection; the others are meta-trained on.
        within_alphabet: training episodes drawn within one alphabet (as the test runs are); otherwise from
            every training character at once.
        rotations: training characters' 90/180/270-degree rotations are new classes (never in meta-val, whose
            episodes are within-alphabet, unrotated, like the test runs).
        seed: the training episodes' seed; val_seed: the meta-val episodes' (fixed across training seeds).

    Returns:
        ``{"train": sampler, "val": AlphabetEpisodes}``.
    """
    from metadyn.data.episodes import EpisodeSampler

    alphabets = sorted(set(chars.alphabets))
    unknown = [a for a in val_alphabets if a not in alphabets]
    if unknown:
        raise InputError(f"val alphabet(s) {', '.join(map(repr, unknown))} not in the background sets; choose "
                         f"from: {', '.join(alphabets)}")
    train = [a for a in alphabets if a not in val_alphabets]
    if not train:
        raise InputError("every background alphabet is held out for validation; nothing is left to meta-train on")
    if within_alphabet:
        sampler = AlphabetEpisodes({a: chars.pool([a], rotations) for a in train}, n_way, k_shot, n_query, seed)
    else:
        sampler = EpisodeSampler(chars.pool(train, rotations), n_way, k_shot, n_query, seed=seed)
    val = AlphabetEpisodes({a: chars.pool([a]) for a in val_alphabets}, n_way, k_shot, n_query, val_seed)
    return {"train": sampler, "val": val}
