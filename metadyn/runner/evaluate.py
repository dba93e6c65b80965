"""Evaluation shared by every task kind: per-exit metrics, the budgeted sweep, a real early-exit operating
point checked against picking from the full forward, aggregation over seeds, and paired differences with
one significance rule.

**The significance rule.** A difference between two groups is a paired mean over units that both saw —
test samples when there is one training run, seeds when there are several, episodes in few-shot — with a
two-sided paired t-test on the per-unit differences. The p-values of every comparison a report makes are
adjusted together by Holm's step-down method (Holm, Scand. J. Statist. 1979), which controls the
family-wise error rate; a difference is "better"/"worse" when its adjusted p < :data:`ALPHA`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from metadyn.core.calibration import ece, fit_temperatures, reliability
from metadyn.core.flops import ExitCosts, exit_costs, expected_cost
from metadyn.core.inference import collect_logits, dynamic_exit
from metadyn.core.policies import accuracy_at_budgets, anytime_accuracy, budgeted_curve, pick_exits, policy_for_budget
from metadyn.errors import InputError, NonFiniteLossError

BUDGET_FRACTIONS = (0.25, 0.5, 0.75)
ALPHA = 0.05


# --------------------------------------------------------------------------- one trained network


@dataclass
class ExitEval:
    """A trained network's exit logits on val/calib/test, its calib temperatures, FLOPs and per-exit test rows."""

    val: list[torch.Tensor]
    calib: list[torch.Tensor] | None
    test: list[torch.Tensor]
    temperatures: list[float]
    costs: ExitCosts
    rows: list[dict]


def evaluate_exits(model, data, ev, group: str = "model") -> ExitEval:
    """Collect every exit's logits (eval mode), fit temperatures on ``calib`` (``ev.calibrate``) and measure
    each exit on ``test``: accuracy, cumulative MFLOPs, ECE before and after temperature scaling, T, and
    the val accuracy (what a choice between variants may look at). A network whose logits are not all finite
    on a split (it trained to a finite loss but overflows on some inputs) is an :class:`InputError` naming the
    split and exit: its accuracy would otherwise depend on how ``argmax`` treats NaN."""
    bs = ev.batch_size
    model.eval()
    val, test = (collect_logits(model, s.x, bs) for s in (data.val, data.test))
    calib = collect_logits(model, data.calib.x, bs) if ev.calibrate else None
    for split, logits in (("val", val), ("test", test), ("calib", calib or [])):
        for i, lg in enumerate(logits):
            if not bool(torch.isfinite(lg).all()):
                raise InputError(f"{group}: exit {i} gives non-finite (NaN or inf) logits on {split} "
                                 f"({int((~torch.isfinite(lg).all(-1)).sum())} of {len(lg)} samples)")
    temps = fit_temperatures(calib, data.calib.y) if ev.calibrate else [1.0] * len(test)
    costs = exit_costs(model, data.in_shape)
    acc, val_acc = anytime_accuracy(test, data.test.y), anytime_accuracy(val, data.val.y)
    rows = [{"group": group, "exit": i, "accuracy": acc[i], "mflops": costs.cumulative[i] / 1e6,
             "ece": ece(test[i], data.test.y, ev.ece_bins),
             "ece_calibrated": ece(test[i] / temps[i], data.test.y, ev.ece_bins), "temperature": temps[i],
             "val_accuracy": val_acc[i]} for i in range(len(test))]
    return ExitEval(val, calib, test, temps, costs, rows)


def scored_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy where a sample whose logits are not all finite (a diverged network's NaN output) is wrong."""
    ok = torch.isfinite(logits).all(-1) & (torch.nan_to_num(logits).argmax(-1) == y)
    return float(ok.double().mean())


def diverged_rows(model, data, ev, group: str = "model") -> list[dict]:
    """Per-exit rows of a network whose training diverged (its loss became NaN), scored as it stands: test and
    val accuracy with non-finite outputs counted as misclassified (:func:`scored_accuracy`), cumulative MFLOPs,
    no ECE. Every row has ``diverged: True``; :func:`aggregate` counts such a run in the mean with what it
    scored and marks it."""
    model.eval()
    val, test = (collect_logits(model, s.x, ev.batch_size) for s in (data.val, data.test))
    costs = exit_costs(model, data.in_shape)
    return [{"group": group, "exit": i, "accuracy": scored_accuracy(test[i], data.test.y),
             "mflops": costs.cumulative[i] / 1e6, "ece": None, "ece_calibrated": None, "temperature": None,
             "val_accuracy": scored_accuracy(val[i], data.val.y), "diverged": True} for i in range(len(test))]


def reliability_of(e: ExitEval, y: torch.Tensor, bins: int) -> dict:
    """Reliability diagrams of every exit before and after temperature scaling."""
    return {"before": [reliability(lg, y, bins) for lg in e.test],
            "after": [reliability(lg / t, y, bins) for lg, t in zip(e.test, e.temperatures)]}


def budget_sweep(e: ExitEval, y: torch.Tensor, score: str, group: str, full: float | None = None,
                 fractions: Sequence[float] = BUDGET_FRACTIONS) -> tuple[list[dict], list[dict]]:
    """MSDNet's budgeted curve (thresholds fitted on val, p = i/20) and the accuracy at ``fractions`` of
    ``full`` FLOPs (default: this network's static cost). Returns ``(curve, budgets)`` rows."""
    cum = e.costs.cumulative
    full = e.costs.full if full is None else full
    curve = [{"group": group, "mflops": c["mflops"], "accuracy": c["accuracy"], "p": c["p"],
              "exit_fractions": c["exit_fractions"], "thresholds": c["thresholds"]}
             for c in budgeted_curve(e.val, e.test, y, cum, score)]
    budgets = accuracy_at_budgets(e.val, e.test, y, cum, [f * full for f in fractions], score)
    budgets = [{"group": group, "budget_fraction": f, **b} for f, b in zip(fractions, budgets)]
    return curve, budgets


def operating_point(model, val: list[torch.Tensor], test: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    cum: Sequence[float], budget: float, score: str = "confidence", device=None,
                    micro_batch: int | None = None) -> dict | None:
    """Thresholds fitted on ``val`` for ``budget`` FLOPs, run for real with :func:`dynamic_exit` (batch
    compaction) on ``x``, and checked against picking from the full forward: ``mismatches`` counts samples
    whose prediction or exit differ. ``None`` when the budget is below the cheapest exit."""
    if budget < cum[0]:
        return None
    policy = policy_for_budget(val, cum, budget, score)
    picked_idx, picked = pick_exits(test, policy)
    dyn = dynamic_exit(model, x.to(device) if device is not None else x, policy, micro_batch=micro_batch)
    idx, logits = dyn.exit_idx.cpu(), dyn.logits.float().cpu()
    fractions = (torch.bincount(idx, minlength=len(test)).double() / len(idx)).tolist()
    return {"budget_mflops": budget / 1e6, "thresholds": list(policy.thresholds), "exit_fractions": fractions,
            "accuracy": float((logits.argmax(-1) == y).double().mean()), "mflops": expected_cost(idx, cum) / 1e6,
            "mismatches": int((logits.argmax(-1) != picked.argmax(-1)).sum() + (idx != picked_idx).sum())}


# --------------------------------------------------------------------------- seeds x variants


def sweep(variants: Sequence[str], seeds: Sequence[int], train_one: Callable[[str, int], dict]) -> dict:
    """Run ``train_one(variant, seed)`` for every seed and variant (seed-major); a training whose loss became
    NaN and that ``train_one`` did not score itself (:func:`diverged_rows`) is recorded as ``None`` (diverged,
    unmeasured) and the sweep goes on. Returns ``{(variant, seed): result}``."""
    out = {}
    for seed in seeds:
        for v in variants:
            try:
                out[v, seed] = train_one(v, seed)
            except NonFiniteLossError:
                out[v, seed] = None
    return out


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values that are not None."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(runs: Sequence[Sequence[dict] | None], keys: Sequence[str] = ("accuracy",),
              group: str = "") -> list[dict]:
    """Per-exit rows of several seeds -> one row per exit with the mean of each key over every run that has rows,
    ``<key>_std``, ``n`` (runs that finished normally) and ``diverged`` (runs whose training diverged); other
    keys from the first run that finished normally.

    A diverged run is either ``None`` (nothing could be measured: it is left out of the mean) or a list of rows
    marked ``diverged: True`` (scored as it stands, :func:`diverged_rows`: it counts in the mean with what it
    scored, and ``diverged_in_mean`` says how many such runs the mean holds). So ``n + diverged`` is the number
    of runs, and nothing is dropped silently. When no run has rows, one row of ``group`` with no accuracy says
    so."""
    done = [r for r in runs if r is not None]
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


# --------------------------------------------------------------------------- paired differences


def paired(diffs: Sequence[float]) -> dict:
    """Mean of paired differences, its standard error and the two-sided paired t-test p-value
    (``None`` with fewer than two pairs)."""
    n = len(diffs)
    m = statistics.fmean(diffs) if n else 0.0
    if n < 2:
        return {"difference": m, "se": None, "n": n, "p": None}
    se = statistics.stdev(diffs) / math.sqrt(n)
    if se == 0:
        p = 1.0 if m == 0 else 0.0
    else:
        from scipy.stats import t as student_t

        p = float(2 * student_t.sf(abs(m / se), n - 1))
    return {"difference": m, "se": se, "n": n, "p": p}


def compare(group: str, against: str, at: str, a: Sequence[float], b: Sequence[float]) -> dict:
    """The paired difference ``a - b`` of two groups on the same units (samples, seeds or episodes)."""
    return {"group": group, "against": against, "at": at, **paired([x - y for x, y in zip(a, b)])}


def holm(comparisons: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Adjust every comparison's p-value together (Holm) and add ``p_holm`` and ``verdict``; returns the list."""
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


def correct(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-sample correctness (1.0 / 0.0), the unit of a single run's paired comparison."""
    return (logits.argmax(-1) == y).double().tolist()
