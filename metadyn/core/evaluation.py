"""Measuring a trained multi-exit network: per-exit test metrics with calibration, the budgeted sweep, and a
real early-exit operating point checked against picking from the full forward.

::

    e = md.evaluate_exits(net, data)                       # logits on val/calib/test, temperatures, per-exit rows
    curve, budgets = md.budget_sweep(e, data.test.y)       # MSDNet's budgeted curve, accuracy at 25/50/75% FLOPs
    op = md.operating_point(net, e.val, e.test, data.test.x, data.test.y, e.costs.cumulative, 0.5 * e.costs.full)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metadyn.core.calibration import ece, fit_temperatures, reliability
from metadyn.core.flops import ExitCosts, exit_costs, expected_cost
from metadyn.core.inference import collect_logits, dynamic_exit
from metadyn.core.outputs import check_labels
from metadyn.core.policies import accuracy_at_budgets, anytime_accuracy, budgeted_curve, pick_exits, policy_for_budget
from metadyn.errors import InputError

BUDGET_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class ExitEval:
    """A trained network's exit logits on val/calib/test, its calib temperatures, FLOPs and per-exit test rows."""

    val: list[torch.Tensor]
    calib: list[torch.Tensor] | None
    test: list[torch.Tensor]
    temperatures: list[float]
    costs: ExitCosts
    rows: list[dict]


def evaluate_exits(model, data, group: str = "model", *, batch_size: int = 256, calibrate: bool = True,
                   ece_bins: int = 15) -> ExitEval:
    """Collect every exit's logits (eval mode) on ``data``'s val/calib/test splits, fit temperatures on ``calib``
    (Guo et al., ICML 2017; with ``calibrate``) and measure each exit on ``test``: accuracy, cumulative MFLOPs,
    ECE before and after temperature scaling, T, and the val accuracy (what a choice between variants may look
    at). A network whose logits are not all finite on a split (it trained to a finite loss but overflows on some
    inputs) is an :class:`InputError` naming the split and exit: its accuracy would otherwise depend on how
    ``argmax`` treats NaN."""
    model.eval()
    val, test = (collect_logits(model, s.x, batch_size) for s in (data.val, data.test))
    calib = collect_logits(model, data.calib.x, batch_size) if calibrate else None
    for split, logits in (("val", val), ("test", test), ("calib", calib or [])):
        for i, lg in enumerate(logits):
            if not bool(torch.isfinite(lg).all()):
                raise InputError(f"{group}: exit {i} gives non-finite (NaN or inf) logits on {split} "
                                 f"({int((~torch.isfinite(lg).all(-1)).sum())} of {len(lg)} samples)")
    temps = fit_temperatures(calib, data.calib.y) if calibrate else [1.0] * len(test)
    costs = exit_costs(model, data.in_shape)
    acc, val_acc = anytime_accuracy(test, data.test.y), anytime_accuracy(val, data.val.y)
    rows = [{"group": group, "exit": i, "accuracy": acc[i], "mflops": costs.cumulative[i] / 1e6,
             "ece": ece(test[i], data.test.y, ece_bins),
             "ece_calibrated": ece(test[i] / temps[i], data.test.y, ece_bins), "temperature": temps[i],
             "val_accuracy": val_acc[i]} for i in range(len(test))]
    return ExitEval(val, calib, test, temps, costs, rows)


def scored_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy where a sample whose logits are not all finite (a diverged network's NaN output) is wrong."""
    ok = torch.isfinite(logits).all(-1) & (torch.nan_to_num(logits).argmax(-1) == y)
    return float(ok.double().mean())


def diverged_rows(model, data, group: str = "model", *, batch_size: int = 256) -> list[dict]:
    """Per-exit rows of a network whose training diverged (its loss became NaN), scored as it stands: test and
    val accuracy with non-finite outputs counted as misclassified (:func:`scored_accuracy`), cumulative MFLOPs,
    no ECE. Every row has ``diverged: True``; :func:`metadyn.core.stats.aggregate` counts such a run in the mean
    with what it scored and marks it."""
    model.eval()
    val, test = (collect_logits(model, s.x, batch_size) for s in (data.val, data.test))
    costs = exit_costs(model, data.in_shape)
    return [{"group": group, "exit": i, "accuracy": scored_accuracy(test[i], data.test.y),
             "mflops": costs.cumulative[i] / 1e6, "ece": None, "ece_calibrated": None, "temperature": None,
             "val_accuracy": scored_accuracy(val[i], data.val.y), "diverged": True} for i in range(len(test))]


def reliability_of(e: ExitEval, y: torch.Tensor, bins: int = 15) -> dict:
    """Reliability diagrams of every exit before and after temperature scaling."""
    return {"before": [reliability(lg, y, bins) for lg in e.test],
            "after": [reliability(lg / t, y, bins) for lg, t in zip(e.test, e.temperatures)]}


def budget_sweep(e: ExitEval, y: torch.Tensor, score: str = "confidence", group: str = "model",
                 full: float | None = None,
                 fractions: Sequence[float] = BUDGET_FRACTIONS) -> tuple[list[dict], list[dict]]:
    """MSDNet's budgeted curve (Huang et al., ICLR 2018: thresholds fitted on val, p = i/20) and the accuracy at
    ``fractions`` of ``full`` FLOPs (default: this network's static cost). Returns ``(curve, budgets)`` rows."""
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
    if len(x) != len(test[0]):
        raise InputError(f"operating_point: {len(x)} samples in x but {len(test[0])} rows of test logits; pass the "
                         "logits of the same test samples")
    check_labels(test[0], y, "operating_point")
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


def correct(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-sample correctness (1.0 / 0.0), the unit of a single run's paired comparison."""
    return (logits.argmax(-1) == y).double().tolist()
