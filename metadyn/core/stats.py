"""Means over seeds and the project's one significance rule.

**The significance rule.** A difference between two groups is a paired mean over units that both saw —
test samples when there is one training run, seeds when there are several, episodes in few-shot — with a
two-sided paired t-test on the per-unit differences (the exact sign-flip test where every difference is the
same, which leaves the t statistic undefined: see :func:`paired`). The p-values of every comparison a report makes are
adjusted together by Holm's step-down method (Holm, Scand. J. Statist. 1979), which controls the
family-wise error rate; a difference is "better"/"worse" when its adjusted p < :data:`ALPHA`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from metadyn.errors import InputError

ALPHA = 0.05


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not None (NaN or inf among them: the float mean
    and a NaN spread)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    if not all(math.isfinite(v) for v in vals):  # statistics.stdev raises on NaN and inf; they spread as floats do
        return sum(vals) / len(vals), (math.nan if len(vals) > 1 else 0.0)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: Sequence[Sequence[dict] | None], keys: Sequence[str] = ("accuracy",),
              group: str = "") -> list[dict]:
    """Per-exit rows of several seeds -> one row per exit with the mean of each key over every run that has rows,
    ``<key>_std``, ``n`` (runs that finished normally) and ``diverged`` (runs whose training diverged); other
    keys from the first run that finished normally.

    A diverged run is either ``None`` (nothing could be measured: it is left out of the mean) or a list of rows
    marked ``diverged: True`` (scored as it stands, :func:`metadyn.core.evaluation.diverged_rows`: it counts in
    the mean with what it scored, and ``diverged_in_mean`` says how many such runs the mean holds). So
    ``n + diverged`` is the number of runs, and nothing is dropped silently. When no run has rows, one row of
    ``group`` with no accuracy says so."""
    done = [r for r in runs if r is not None]
    layouts = {tuple((row.get("group"), row.get("exit")) for row in r) for r in done}
    if len(layouts) > 1:  # rows are averaged by position: every run must list the same (group, exit) rows in order
        raise InputError(f"aggregate: the runs' rows differ in (group, exit) or order: {sorted(layouts)[:2]}")
    missing = sorted({k for r in done for row in r for k in keys if k not in row})
    if missing:
        raise InputError(f"aggregate: rows without the key(s) {missing}")
    if not done:
        return [{"group": group, "exit": 0, "accuracy": None, "mflops": None, "n": 0, "diverged": len(runs)}]
    scored = sum(1 for r in done if r and r[0].get("diverged"))
    model_run = next((r for r in done if not (r and r[0].get("diverged"))), done[0])  # other keys: a finished run's
    out = []
    for i, first in enumerate(model_run):
        row = {k: v for k, v in first.items() if k != "diverged"}
        for k in keys:
            row[k], row[f"{k}_std"] = mean_std([r[i][k] for r in done])
        row["n"], row["diverged"] = len(done) - scored, len(runs) - len(done) + scored
        if scored:
            row["diverged_in_mean"] = scored
        out.append(row)
    return out


def paired(diffs: Sequence[float]) -> dict:
    """Mean of paired differences, its standard error and the two-sided paired t-test p-value
    (``None`` with fewer than two pairs).

    When every difference is the same non-zero number the t statistic is undefined (no spread: se = 0), and
    calling that p = 0 would make "one test image worse on each of 3 seeds" a certain effect. There the p-value
    is the exact two-sided sign-flip (randomization) test's: of the 2**n equally likely sign patterns under the
    null of a symmetric difference, only the two with every sign equal reach the observed mean, so
    p = 2 / 2**n (0.25 with 3 units, 0.002 with 10). Identical zero differences give p = 1. "The same" allows
    float rounding (accuracy differences like 0.7701 - 0.7702 and 0.7654 - 0.7655 differ in the last bits),
    where the t-test would report a spread of 1e-17 and p ~ 0."""
    n = len(diffs)
    if not all(math.isfinite(d) for d in diffs):
        raise InputError("paired: the differences must be finite numbers (a NaN or inf accuracy or loss?)")
    m = statistics.fmean(diffs) if n else 0.0
    if n < 2:
        return {"difference": m, "se": None, "n": n, "p": None}
    sd = statistics.stdev(diffs)
    if sd <= 1e-9 * max(abs(d) for d in diffs):  # the same difference on every unit, up to float rounding
        se = 0.0
        p = 1.0 if m == 0 else min(1.0, 2.0 ** (1 - n))
    else:
        se = sd / math.sqrt(n)
        from scipy.stats import t as student_t

        p = float(2 * student_t.sf(abs(m / se), n - 1))
    return {"difference": m, "se": se, "n": n, "p": p}


def compare(group: str, against: str, at: str, a: Sequence[float], b: Sequence[float]) -> dict:
    """The paired difference ``a - b`` of two groups on the same units (samples, seeds or episodes)."""
    return {"group": group, "against": against, "at": at, **paired([x - y for x, y in zip(a, b)])}


def holm(comparisons: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Adjust every comparison's p-value together (Holm) and add ``p_holm`` and ``verdict``; returns the list."""
    bad = [c["p"] for c in comparisons if c["p"] is not None and not 0.0 <= c["p"] <= 1.0]  # NaN included
    if bad:
        raise InputError(f"holm: p-values must lie in [0, 1] (or be None for no test), got {bad[:3]}")
    tested = sorted((c for c in comparisons if c["p"] is not None), key=lambda c: c["p"])
    m, running = len(tested), 0.0
    for j, c in enumerate(tested):
        running = max(running, min(1.0, (m - j) * c["p"]))
        c["p_holm"] = running
    for c in comparisons:
        if c["p"] is None:
            c["p_holm"], c["verdict"] = None, "one unit: no test"
        elif c["p_holm"] < alpha:
            c["verdict"] = "better" if c["difference"] > 0 else "worse"
        else:
            c["verdict"] = "no significant difference"
    return comparisons
