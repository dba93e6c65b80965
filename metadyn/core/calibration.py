"""Per-exit temperature scaling, expected calibration error and reliability-diagram data.

References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling, Sec. 4.2;
    ECE, Eq. 3; reliability diagrams, Sec. 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metadyn.core.outputs import check_labels
from metadyn.errors import InputError


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100, bounds: tuple[float, float] = (0.02, 50.0)
                    ) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (LBFGS on ``log T``).

    Fit on a calibration split of its own, never the test split. When that split holds no error, the
    NLL keeps falling as ``T -> 0``; the result is clipped to ``bounds``.
    """
    check_labels(logits, labels, "fit_temperature")
    if logits.shape[0] == 0:
        raise InputError("fit_temperature: the calibration split is empty")
    if not bool(torch.isfinite(logits).all()):
        raise InputError("fit_temperature: the calibration logits are not all finite (NaN or inf: a diverged "
                         "network?); a temperature fitted on them would be meaningless")
    logits = logits.detach().double().cpu()
    labels = labels.detach().cpu().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if t != t:  # NaN from a degenerate split
        return 1.0
    return min(max(t, bounds[0]), bounds[1])


def fit_temperatures(logits: Sequence[Tensor], labels: Tensor) -> list[float]:
    """One temperature per exit."""
    return [fit_temperature(lg, labels) for lg in logits]


def reliability(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, list[float]]:
    """Reliability-diagram data: per equal-width confidence bin, mean confidence, accuracy and count."""
    check_labels(logits, labels, "reliability")
    if logits.shape[0] == 0:
        raise InputError("reliability / ece: no samples")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise InputError(f"reliability / ece: n_bins must be a positive integer, got {n_bins!r}")
    probs = logits.detach().float().softmax(-1)
    if not bool(torch.isfinite(probs).all()):
        raise InputError("reliability / ece: the logits give non-finite probabilities (NaN or +inf logits)")
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, device=conf.device)
    b = torch.bucketize(conf, edges[1:-1], right=False)  # (N,) in 0..n_bins-1; bins are (lo, hi]
    count = torch.bincount(b, minlength=n_bins).float()
    conf_sum = torch.bincount(b, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(b, weights=correct, minlength=n_bins)
    denom = count.clamp(min=1)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (acc_sum / denom).tolist(),
        "count": count.tolist(),
    }


def ece(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` over equal-width bins."""
    r = reliability(logits, labels, n_bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"])))
