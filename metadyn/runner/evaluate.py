"""Seeds x variants: run every training, record a diverged one instead of dropping it, and aggregate per seed
(:mod:`metadyn.core.stats`; a trained network is measured by :mod:`metadyn.core.evaluation`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from metadyn.core.stats import aggregate, compare, holm
from metadyn.errors import NonFiniteLossError


def sweep(variants: Sequence[str], seeds: Sequence[int], train_one: Callable[[str, int], dict]) -> dict:
    """Run ``train_one(variant, seed)`` for every seed and variant (seed-major); a training whose loss became
    NaN and that ``train_one`` did not score itself (:func:`~metadyn.core.evaluation.diverged_rows`) is recorded
    as ``None`` (diverged, unmeasured) and the sweep goes on. Returns ``{(variant, seed): result}``."""
    out = {}
    for seed in seeds:
        for v in variants:
            try:
                out[v, seed] = train_one(v, seed)
            except NonFiniteLossError:
                out[v, seed] = None
    return out


def seed_rows(runs: dict, variants: Sequence, seeds: Sequence[int], part: str = "rows",
              keys: Sequence[str] = ("accuracy",), label: Callable = str) -> list[dict]:
    """Every variant's per-seed ``part`` (a list of rows: exits, curve points, budgets) of a :func:`sweep`,
    aggregated over seeds; ``label(variant)`` names the group of a variant whose every run diverged."""
    out = []
    for v in variants:
        got = [(runs[v, s] or {}).get(part) or None for s in seeds]
        if part == "rows" or any(got):
            out += aggregate(got, keys, label(v))
    return out


def seed_pairs(runs: dict, pairs: Sequence[tuple], seeds: Sequence[int], exits: Sequence[int],
               label: Callable = str) -> list[dict]:
    """Paired-by-seed differences of exit accuracies for every ``(variant, against)`` pair (seeds where both
    finished), Holm-adjusted together."""
    comps = []
    for a, b in pairs:
        ok = [s for s in seeds if runs[a, s] and runs[b, s]]
        comps += [compare(label(a), label(b), f"exit {i}", [runs[a, s]["rows"][i]["accuracy"] for s in ok],
                          [runs[b, s]["rows"][i]["accuracy"] for s in ok]) for i in exits]
    return holm(comps)
