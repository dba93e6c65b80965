"""Exit policies as pure tensor functions, and MSDNet's threshold fitting.

A policy decides, exit by exit, which samples may leave. Its step is a pure function

    ``mask, carry = policy(i, logits, carry)``

of exit ``i``'s logits ``(B, C)`` and a per-sample carry (``None`` for memory-less policies; a tuple
of ``(B,)`` tensors for patience), returning a bool mask ``(B,)``. Because every quantity is
per-sample, the same step runs on the full batch (:func:`pick_exits`, the "compute every exit, then
pick" reference) and on the shrinking batch of dynamic inference (:mod:`metadyn.core.inference`).

Thresholds are fitted on a validation split that is never the test split (:func:`fit_thresholds`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metadyn.core.outputs import check_labels
from metadyn.errors import InputError
from metadyn.registry import POLICIES

# --------------------------------------------------------------------------- scores (pure)


def max_softmax(logits: Tensor) -> Tensor:
    """Max-softmax confidence ``max_c softmax(z)_c`` of ``(B, C)`` logits -> ``(B,)``."""
    return logits.softmax(-1).amax(-1)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of ``softmax(z)``, ``(B, C)`` -> ``(B,)``."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def neg_entropy(logits: Tensor) -> Tensor:
    """``-entropy``: a confidence score (higher = more confident)."""
    return -entropy(logits)


SCORES = {"confidence": max_softmax, "entropy": neg_entropy}


def confidence_exit(logits: Tensor, threshold: float | Tensor) -> Tensor:
    """Samples whose max-softmax confidence reaches ``threshold`` may exit."""
    return max_softmax(logits) >= threshold


def entropy_exit(logits: Tensor, max_entropy: float | Tensor) -> Tensor:
    """Samples whose predictive entropy is at most ``max_entropy`` nats may exit."""
    return entropy(logits) <= max_entropy


def patience_step(pred: Tensor, prev_pred: Tensor | None, count: Tensor | None, patience: int):
    """One step of patience-based exiting: exit once the prediction is unchanged ``patience`` times in a row.

    Returns ``(mask, count)`` where ``count`` is the number of consecutive earlier exits agreeing with ``pred``.

    References:
        Zhou et al., "BERT Loses Patience: Fast and Robust Inference with Early Exit", NeurIPS 2020 (PABEE).
    """
    if prev_pred is None:
        count = torch.zeros_like(pred)
    else:
        count = torch.where(pred == prev_pred, count + 1, torch.zeros_like(count))
    return count >= patience, count


# --------------------------------------------------------------------------- policies (thin modules)


def _numbers(values, name: str, owner: str = "ThresholdPolicy") -> tuple[float, ...]:
    """``values`` (a list, tuple or 1-d tensor of real numbers, none NaN) as a tuple of floats; a string (whose
    characters would read as one threshold each) or anything else is an InputError."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().flatten().tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise InputError(f"{owner} {name} must be a list of numbers, got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise InputError(f"{owner} {name} must be numbers, got {type(v).__name__} {str(v)[:40]!r}")
        if math.isnan(v):  # e.g. thresholds fitted on the scores of NaN logits
            raise InputError(f"{owner} {name} must not be NaN (fitted on scores of non-finite logits?)")
        out.append(float(v))
    return tuple(out)


def check_policy(policy, num_exits: int) -> None:
    """Refuse a policy built for another number of exits (through its ``check_exits``, when it has one)."""
    check = getattr(policy, "check_exits", None)
    if check is not None:
        check(num_exits)


def _check_thresholds(policy) -> None:
    """Validate (and normalise to tuples of floats) a policy's ``thresholds`` and optional ``temperatures``."""
    owner = type(policy).__name__
    policy.thresholds = _numbers(policy.thresholds, "thresholds", owner)  # +-inf allowed: nobody / everybody leaves
    if not policy.thresholds:
        raise InputError(f"{owner} needs one threshold per exit, got none")
    if policy.temperatures is not None:
        policy.temperatures = _numbers(policy.temperatures, "temperatures", owner)
        bad = [t for t in policy.temperatures if not (0 < t < math.inf)]
        if bad:
            raise InputError(f"{owner} temperatures must be positive and finite, got {bad[0]}")


def _check_index(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"{owner} {name} must be a whole number >= 0, got {str(value)[:40]!r}")
    return int(value)


@dataclass
class ThresholdPolicy:
    """Exit at exit ``i`` when ``score(logits_i / T_i) >= thresholds[i]``.

    Args:
        thresholds: one per exit (the last is ignored: every sample leaves at the final exit).
        score: ``"confidence"`` (max softmax) or ``"entropy"`` (scored as negative entropy, so a
            threshold ``t`` means "entropy <= -t").
        temperatures: optional per-exit temperatures applied before scoring (calibrated confidence).
    """

    thresholds: Sequence[float]
    score: str = "confidence"
    temperatures: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise InputError(f"unknown policy score {str(self.score)[:40]!r}; choose from: {', '.join(SCORES)}")
        _check_thresholds(self)

    def check_exits(self, num_exits: int) -> None:
        """Refuse to run on a network with another number of exits than the policy has thresholds for."""
        owner = type(self).__name__
        for name, values in (("thresholds", self.thresholds), ("temperatures", self.temperatures)):
            if values is not None and len(values) != num_exits:
                raise InputError(f"{owner} has {len(values)} {name} for a network with {num_exits} exits; "
                                 "give one per exit")

    def scores(self, i: int, logits: Tensor) -> Tensor:
        if self.temperatures is not None:
            logits = logits / float(self.temperatures[i])
        return SCORES[self.score](logits)

    def __call__(self, i: int, logits: Tensor, carry=None):
        return self.scores(i, logits) >= float(self.thresholds[i]), carry


@dataclass
class PatiencePolicy:
    """Exit once the predicted class has stayed the same for ``patience`` consecutive exits (PABEE)."""

    patience: int = 1

    def __post_init__(self) -> None:
        self.patience = _check_index(self.patience, "patience", "PatiencePolicy")

    def __call__(self, i: int, logits: Tensor, carry=None):
        pred = logits.argmax(-1)
        prev, count = carry if carry is not None else (None, None)
        mask, count = patience_step(pred, prev, count, self.patience)
        return mask, (pred, count)


@dataclass
class BudgetPolicy:
    """Every sample leaves at one fixed exit: the deepest whose cost fits a per-sample budget."""

    exit_index: int

    def __post_init__(self) -> None:
        self.exit_index = _check_index(self.exit_index, "exit_index", "BudgetPolicy")

    def check_exits(self, num_exits: int) -> None:
        """Refuse an exit the network does not have (every sample would silently reach the last one)."""
        if self.exit_index >= num_exits:
            raise InputError(f"BudgetPolicy exit_index {self.exit_index} is beyond the network's {num_exits} exits")

    @classmethod
    def from_budget(cls, costs: Sequence[float], budget: float) -> BudgetPolicy:
        """The deepest exit whose cumulative cost (same unit as ``costs``) is at most ``budget``."""
        if len(costs) == 0:
            raise InputError("BudgetPolicy.from_budget needs the exits' costs; got none")
        fits = [k for k, c in enumerate(costs) if c <= budget]
        if not fits:
            raise InputError(f"budget {budget:g} is below the cheapest exit's cost {min(costs):g}")
        return cls(fits[-1])

    def __call__(self, i: int, logits: Tensor, carry=None):
        return torch.full((logits.shape[0],), i >= self.exit_index, dtype=torch.bool, device=logits.device), carry


POLICIES.register("confidence", lambda thresholds, temperatures=None: ThresholdPolicy(thresholds, "confidence",
                                                                                      temperatures))
POLICIES.register("entropy", lambda thresholds, temperatures=None: ThresholdPolicy(thresholds, "entropy",
                                                                                   temperatures))
POLICIES.register("patience", PatiencePolicy)
POLICIES.register("budget", BudgetPolicy)


@dataclass
class EnsembleFallbackPolicy:
    """SCAN's inference: exit at the first exit ``i`` whose max-softmax confidence reaches ``thresholds[i]``
    — the final exit included; a sample that meets no threshold gets the ensemble of all exits, the mean of
    their logits.

    The step (``mask, carry = policy(i, logits, carry)``) decides the early exits and carries the running
    sum of the logits seen; :meth:`finish` gives the final output of the samples that reach the last exit:
    its own logits where ``thresholds[-1]`` is met, else the ensemble. :func:`pick_exits` (every exit computed,
    as in the released code) and :func:`~metadyn.core.inference.dynamic_exit` (only the samples still in the
    batch reach a later exit) both apply it; the exit index of an ensemble sample is the last exit (it has
    computed every exit).

    Args:
        thresholds: one per exit, the last one included (``-inf`` there: never the ensemble).
        temperatures: optional per-exit temperatures applied before scoring (not to the ensemble).

    References:
        Zhang et al., "SCAN: A Scalable Neural Networks Framework Towards Compact and Efficient Models",
        NeurIPS 2019, Sec. 3.3; code ``ArchipLab-LinfengZhang/pytorch-scalable-neural-networks``,
        ``inference.py`` (``judge`` per classifier, shallow to deep, then ``ensemble = sum(outputs) / len``).
    """

    thresholds: Sequence[float]
    temperatures: Sequence[float] | None = None

    def __post_init__(self) -> None:
        _check_thresholds(self)

    check_exits = ThresholdPolicy.check_exits

    def _confident(self, i: int, logits: Tensor) -> Tensor:
        t = 1.0 if self.temperatures is None else float(self.temperatures[i])
        return max_softmax(logits / t) >= float(self.thresholds[i])

    def __call__(self, i: int, logits: Tensor, carry=None):
        return self._confident(i, logits), (logits if carry is None else carry + logits)

    def finish(self, i: int, logits: Tensor, carry) -> Tensor:
        """The output of the samples that reach the last exit ``i`` (``carry``: their sum of earlier logits)."""
        ensemble = (logits if carry is None else carry + logits) / (i + 1)
        return torch.where(self._confident(i, logits)[:, None], logits, ensemble)


POLICIES.register("ensemble_fallback", EnsembleFallbackPolicy)


# --------------------------------------------------------------------------- apply on all exits


def pick_exits(logits: Sequence[Tensor], policy) -> tuple[Tensor, Tensor]:
    """Apply ``policy`` to every exit's logits (all computed) and pick each sample's first allowed exit.

    This is how MSDNet/SDN reference code evaluates early exit: every exit is computed, then one is
    picked. The final exit takes every sample still left; a policy with a ``finish(i, logits, carry)``
    method (:class:`EnsembleFallbackPolicy`) gives their output instead of the final exit's logits.

    Returns:
        ``(exit_idx (B,), logits (B, C))``: the chosen exit of each sample and its logits.
    """
    k = len(logits)
    check_policy(policy, k)
    b = logits[0].shape[0]
    exit_idx = torch.full((b,), k - 1, dtype=torch.long, device=logits[0].device)
    done = torch.zeros(b, dtype=torch.bool, device=logits[0].device)
    carry = None
    for i in range(k - 1):
        mask, carry = policy(i, logits[i], carry)
        new = mask & ~done
        exit_idx = torch.where(new, torch.full_like(exit_idx, i), exit_idx)
        done |= mask
    finish = getattr(policy, "finish", None)
    final = logits[-1] if finish is None else finish(k - 1, logits[-1], carry)
    stacked = torch.stack([*logits[:-1], final])  # (K, B, C)
    chosen = stacked[exit_idx, torch.arange(b, device=exit_idx.device)]
    return exit_idx, chosen


def anytime_accuracy(logits: Sequence[Tensor], y: Tensor) -> list[float]:
    """Accuracy of every exit on its own (anytime prediction)."""
    for lg in logits:
        check_labels(lg, y, "anytime_accuracy")
    return [float((lg.argmax(-1) == y).float().mean()) for lg in logits]


# --------------------------------------------------------------------------- threshold fitting (MSDNet)


def geometric_fractions(p: float, num_exits: int) -> Tensor:
    """MSDNet's exit distribution for budgeted batch classification: ``q_k ∝ p^k``, k = 1..K.

    References:
        Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image Classification",
        ICLR 2018, Sec. 5.2 (and ``dynamic_evaluate`` of the released code: ``p`` in ``{i/20}``).
    """
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (math.isfinite(p) and p > 0):
        raise InputError(f"the geometric exit distribution needs a finite p > 0, got {p!r}")
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    q = torch.exp(math.log(p) * k)
    return q / q.sum()


def fit_thresholds(scores: Tensor, fractions: Tensor) -> Tensor:
    """Per-exit thresholds so that a fraction ``fractions[k]`` of the (validation) samples exits at k.

    MSDNet's procedure (``dynamic_eval_find_threshold`` of the released code): exit by exit, among the
    samples that have not yet left, the threshold is the score of the ``floor(N * q_k)``-th most confident
    one, and every remaining sample scoring at least that leaves (with tied scores, more than the quota can
    leave). When fewer samples remain than the quota, or the quota is 0, the threshold stays unreachable
    (``+inf``): nobody leaves there and the remaining samples go on, as in the reference. The final exit's
    threshold is ``-inf`` (everything left exits there).

    Args:
        scores: ``(K, N)`` exit scores (higher = more confident), computed on a validation split.
        fractions: ``(K,)`` target fraction of samples per exit.

    Returns:
        ``(K,)`` float64 thresholds on the CPU, to be used with ``score >= threshold``. The fit runs on a float64
        CPU copy of ``scores``, wherever they were computed (a sequence of small sorts, each followed by a host
        decision), so the thresholds do not depend on the device.

    References:
        Huang et al., MSDNet, ICLR 2018, Sec. 5.2; code ``kalviny/MSDNet-PyTorch``, ``adaptive_inference.py``,
        ``Tester.dynamic_eval_find_threshold`` (its ``T = 1e8`` when the count never reaches the quota).
    """
    scores = scores.detach().double().cpu()
    fractions = torch.as_tensor(fractions).detach().double().cpu()
    k, n = scores.shape
    thresholds = torch.full((k,), float("inf"), dtype=torch.float64)
    thresholds[-1] = float("-inf")
    left = torch.ones(n, dtype=torch.bool)
    for e in range(k - 1):
        out_n = math.floor(n * float(fractions[e]))
        s = scores[e].double()
        avail = s[left]
        if 0 < out_n <= avail.numel():
            thresholds[e] = avail.sort(descending=True).values[out_n - 1]
        left &= ~(s >= thresholds[e])
    return thresholds


def budget_exit_counts(scores: Tensor, thresholds: Tensor) -> Tensor:
    """How many samples leave at each exit under ``score >= threshold`` (first allowed exit)."""
    k, n = scores.shape
    allowed = scores.double() >= thresholds.to(scores.device)[:, None]
    allowed[-1] = True
    first = allowed.float().argmax(0)
    return torch.bincount(first, minlength=k)


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget):
        raise InputError(f"the FLOP budget must be a finite number, got {budget!r}")


def _check_fit_inputs(fn: str, scores: Tensor, costs_t: Tensor) -> None:
    """``(K, N)`` fitting scores with N > 0, all finite (NaN or inf logits — a diverged network — would give
    thresholds that send everyone to one exit), and K finite, non-decreasing cumulative costs."""
    if costs_t.shape != (scores.shape[0],) or not bool(torch.isfinite(costs_t).all()) \
            or bool((costs_t.diff() < 0).any()):
        raise InputError(f"{fn}: costs must be {scores.shape[0]} finite cumulative costs, one per exit and "
                         f"non-decreasing, got {costs_t.tolist()}")
    if scores.shape[1] == 0:
        raise InputError(f"{fn}: thresholds need validation samples; the validation logits are empty")
    if not bool(torch.isfinite(scores).all()):
        raise InputError(f"{fn}: the validation scores are not all finite (NaN or inf logits: a diverged "
                         "network?); fit thresholds on finite logits")


def fit_thresholds_for_budget(scores: Tensor, costs: Sequence[float], budget: float, iters: int = 60) -> Tensor:
    """Thresholds of MSDNet's geometric family whose expected cost on ``scores`` is at most ``budget``.

    Bisection on ``log p``: small ``p`` sends samples to the first exit, large ``p`` to the last. The limit
    ``p -> 0`` (every sample at the first exit) belongs to the family, so any ``budget`` of at least the first
    exit's cost is met, however few the samples; a smaller one is an :class:`InputError`.

    The search runs on a float64 copy of ``scores`` on the CPU, wherever they were computed: it is a
    sequence of small sorts, each followed by a host decision.
    """
    scores = scores.detach().double().cpu()
    costs_t = torch.as_tensor(costs, dtype=torch.float64)
    n = scores.shape[1]
    _check_budget(budget)
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise InputError(f"fit_thresholds_for_budget needs iters >= 1 bisection steps, got {iters!r}")
    _check_fit_inputs("fit_thresholds_for_budget", scores, costs_t)

    def cost(logp: float) -> tuple[float, Tensor]:
        t = fit_thresholds(scores, geometric_fractions(math.exp(logp), scores.shape[0]))
        return float((budget_exit_counts(scores, t).double() * costs_t).sum() / n), t

    lo, hi = math.log(1e-4), math.log(1e4)
    c_lo, t_lo = cost(lo)
    if c_lo > budget:
        # The family's limit p -> 0 sends every sample to the first exit, but rounding the quotas down
        # (floor(N q_k)) keeps a few samples from it at any p > 0 when N is small: take the limit itself.
        if float(costs_t[0]) <= budget:
            everyone_first = torch.full((scores.shape[0],), float("inf"), dtype=torch.float64)
            everyone_first[0] = everyone_first[-1] = float("-inf")
            return everyone_first
        raise InputError(f"budget {budget:g} is below the cheapest exit's cost {float(costs_t[0]):g}")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        c, t = cost(mid)
        if c <= budget:
            lo, t_lo = mid, t
        else:
            hi = mid
    return t_lo


# --------------------------------------------------------------------------- budgeted evaluation


def policy_for_budget(val_logits: Sequence[Tensor], costs: Sequence[float], budget: float,
                      score: str = "confidence", temperatures: Sequence[float] | None = None) -> ThresholdPolicy:
    """The :class:`ThresholdPolicy` whose thresholds, fitted on validation logits, spend at most ``budget``
    FLOPs per sample there (MSDNet's budgeted batch classification, Huang et al., ICLR 2018, Sec. 3:
    geometric exit distributions, bisection on ``p``). ``costs``: cumulative FLOPs of leaving at each exit.

    Example::

        policy = policy_for_budget(collect_logits(net, val_x), exit_costs(net, in_shape).cumulative, budget)
        result = dynamic_exit(net, test_x, policy)
    """
    t = fit_thresholds_for_budget(policy_scores(val_logits, score, temperatures), costs, budget)
    return ThresholdPolicy(t.tolist(), score, temperatures)


def policy_scores(logits: Sequence[Tensor], score: str = "confidence",
                  temperatures: Sequence[float] | None = None) -> Tensor:
    """``(K, N)`` exit scores of every exit (after optional per-exit temperatures)."""
    probe = ThresholdPolicy([0.0] * len(logits), score, temperatures)
    probe.check_exits(len(logits))
    return torch.stack([probe.scores(i, lg) for i, lg in enumerate(logits)])


def evaluate_policy(logits: Sequence[Tensor], y: Tensor, policy, costs: Sequence[float]) -> dict:
    """Accuracy, expected MFLOPs and per-exit fractions of ``policy`` on all-exit ``logits``."""
    from metadyn.core.flops import expected_cost

    exit_idx, chosen = pick_exits(logits, policy)
    check_labels(chosen, y, "evaluate_policy")
    if len(costs) != len(logits):
        raise InputError(f"evaluate_policy: {len(costs)} costs for {len(logits)} exits")
    counts = torch.bincount(exit_idx, minlength=len(logits)).double()
    return {
        "mflops": expected_cost(exit_idx, costs) / 1e6,
        "accuracy": float((chosen.argmax(-1) == y).double().mean()),
        "exit_fractions": (counts / counts.sum()).tolist(),
    }


def budgeted_curve(val_logits: Sequence[Tensor], test_logits: Sequence[Tensor], test_y: Tensor,
                   costs: Sequence[float], score: str = "confidence", temperatures: Sequence[float] | None = None,
                   ps: Sequence[float] | None = None) -> list[dict]:
    """MSDNet's budgeted batch classification curve: for each ``p`` of the geometric exit distribution,
    thresholds are fitted on the validation logits and the policy is evaluated on the test logits.

    Returns one dict per ``p``: ``p``, ``mflops``, ``accuracy``, ``exit_fractions``, ``thresholds``.
    """
    ps = list(ps) if ps is not None else [i / 20 for i in range(1, 40)]
    val_scores = policy_scores(val_logits, score, temperatures).double().cpu()  # thresholds are fitted on the host
    _check_fit_inputs("budgeted_curve", val_scores, torch.as_tensor(costs, dtype=torch.float64))
    rows = []
    for p in ps:
        t = fit_thresholds(val_scores, geometric_fractions(p, len(val_logits)))
        policy = ThresholdPolicy(t.tolist(), score, temperatures)
        rows.append({"p": p, **evaluate_policy(test_logits, test_y, policy, costs), "thresholds": t.tolist()})
    return rows


def accuracy_at_budgets(val_logits: Sequence[Tensor], test_logits: Sequence[Tensor], test_y: Tensor,
                        costs: Sequence[float], budgets: Sequence[float], score: str = "confidence",
                        temperatures: Sequence[float] | None = None) -> list[dict]:
    """Test accuracy under thresholds fitted on validation to spend at most ``budget`` FLOPs per sample
    (validation cost; the test cost is reported as measured). A budget below the first exit's cost
    gives a row with ``accuracy`` and ``mflops`` set to ``None``."""
    val_scores = policy_scores(val_logits, score, temperatures)
    rows = []
    for b in budgets:
        if b < costs[0]:
            rows.append({"budget_mflops": b / 1e6, "mflops": None, "accuracy": None, "exit_fractions": None,
                         "thresholds": None})
            continue
        t = fit_thresholds_for_budget(val_scores, costs, b)
        policy = ThresholdPolicy(t.tolist(), score, temperatures)
        rows.append({"budget_mflops": b / 1e6, **evaluate_policy(test_logits, test_y, policy, costs),
                     "thresholds": t.tolist()})
    return rows


# --------------------------------------------------------------------------- genetic threshold search (SCAN)


def _population_outcome(scores: Tensor, correct: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Exit counts ``(P, K)`` and accuracy ``(P,)`` of ``P`` threshold vectors ``(P, K)`` on ``(K, N)`` scores."""
    k, n = scores.shape
    allowed = scores[None] >= thresholds[:, :, None]  # (P, K, N)
    allowed[:, -1] = True
    first = allowed.to(torch.uint8).argmax(1)  # (P, N) first allowed exit
    counts = torch.nn.functional.one_hot(first, k).sum(1)  # (P, K)
    return counts, correct[first, torch.arange(n)].double().mean(1)


def within_budget(counts: Sequence[int], costs: Sequence[float], budget: float) -> bool:
    """Exactly (in rational arithmetic) whether ``sum_k counts_k costs_k / sum_k counts_k <= budget``."""
    from fractions import Fraction

    total = sum(Fraction(int(c)) * Fraction(float(v)) for c, v in zip(counts, costs))
    return total <= Fraction(float(budget)) * sum(int(c) for c in counts)


def ga_thresholds(scores: Tensor, correct: Tensor, costs: Sequence[float], budget: float, *, population: int = 64,
                  generations: int = 100, mutation: float = 0.15, seed: int = 0) -> Tensor:
    """Per-exit thresholds that maximise accuracy on the fitting split under a mean-cost budget, found by a
    genetic algorithm.

    Each individual holds one gene ``g_k in [0, 1]`` per early exit: the threshold is the
    ``floor(g_k (N + 1))``-th smallest fitting score of exit ``k`` (``+inf`` past the largest: nobody leaves
    there). Fitness is the accuracy when the mean cost is within ``budget``, else minus the cost (so
    every feasible individual beats every infeasible one). Each generation keeps the two best, fills the
    rest with uniform crossovers of tournament winners (size 3), and mutates each gene with probability
    ``1 / (K - 1)`` by Gaussian noise of std ``mutation``. The initial population is uniform at random plus
    one individual that sends everyone to the first exit, which fits any budget of at least its cost.
    The result is the most accurate feasible individual seen (ties: the cheaper), so its mean cost on
    the fitting scores never exceeds ``budget`` (checked exactly, :func:`within_budget`, where rounding
    could decide). Seeded: the same inputs give the same thresholds.

    Args:
        scores: ``(K, N)`` exit scores on the fitting (validation) split, higher = more confident.
        correct: ``(K, N)`` bool: exit ``k`` classifies sample ``n`` correctly.
        costs: ``(K,)`` cost of leaving at each exit (cumulative, as :class:`~metadyn.core.flops.ExitCosts`).
        budget: the largest mean cost per sample allowed (same unit as ``costs``).

    Returns:
        ``(K,)`` float64 thresholds for ``score >= threshold`` (the last is ``-inf``).

    References:
        Zhang et al., "SCAN: A Scalable Neural Networks Framework Towards Compact and Efficient Models",
        NeurIPS 2019, Sec. 3.3 (per-exit thresholds searched by a genetic algorithm for an accuracy /
        acceleration trade-off; the search code was not released, so operators here are standard ones).
    """
    k, n = scores.shape
    costs_t = torch.as_tensor(costs, dtype=torch.float64)
    _check_budget(budget)
    if correct.shape != scores.shape or len(costs_t) != k:
        raise InputError(f"ga_thresholds: scores {tuple(scores.shape)}, correct {tuple(correct.shape)} and "
                         f"{len(costs_t)} costs do not match")
    _check_fit_inputs("ga_thresholds", scores, costs_t)
    if costs_t[0] > budget:
        raise InputError(f"budget {budget:g} is below the cheapest achievable expected cost {float(costs_t[0]):g}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (population, generations)) \
            or population < 4 or generations < 0:
        raise InputError(f"ga_thresholds needs population >= 4 and generations >= 0, got {population}, {generations}")
    if k == 1:
        return torch.tensor([float("-inf")], dtype=torch.float64)
    scores = scores.double().cpu()
    correct = correct.bool().cpu()
    ladder = torch.cat([scores[:-1].sort(1).values, torch.full((k - 1, 1), float("inf"), dtype=torch.float64)], 1)

    def thresholds(genes: Tensor) -> Tensor:  # (P, K-1) in [0, 1] -> (P, K)
        idx = (genes * (n + 1)).long().clamp(max=n)  # (P, K-1)
        t = ladder.gather(1, idx.T).T  # (P, K-1)
        return torch.cat([t, torch.full((len(genes), 1), float("-inf"), dtype=torch.float64)], 1)

    g = torch.Generator().manual_seed(seed)
    pop = torch.rand(population, k - 1, generator=g, dtype=torch.float64)
    pop[0] = 0.0  # everyone leaves at the first exit
    best_genes, best_key = None, None
    n_elite = 2
    for gen in range(generations + 1):
        counts, acc = _population_outcome(scores, correct, thresholds(pop))
        cost = counts.double() @ costs_t / n
        feasible = cost <= budget
        for i in torch.nonzero((cost - budget).abs() <= 1e-9 * abs(budget)).flatten().tolist():
            feasible[i] = within_budget(counts[i].tolist(), costs_t.tolist(), budget)  # no rounding at the edge
        fitness = torch.where(feasible, acc, -cost)
        for i in torch.nonzero(feasible).flatten().tolist():
            key = (float(acc[i]), -float(cost[i]))
            if best_key is None or key > best_key:
                best_genes, best_key = pop[i].clone(), key
        if gen == generations:
            break
        elite = pop[fitness.argsort(descending=True)[:n_elite]]
        m = population - n_elite
        entrants = torch.randint(population, (2 * m, 3), generator=g)  # tournaments of 3
        winners = entrants[torch.arange(2 * m), fitness[entrants].argmax(1)]
        a, b = pop[winners[:m]], pop[winners[m:]]
        child = torch.where(torch.rand(m, k - 1, generator=g) < 0.5, a, b)
        hit = torch.rand(m, k - 1, generator=g) < 1.0 / (k - 1)
        child = (child + hit * mutation * torch.randn(m, k - 1, generator=g, dtype=torch.float64)).clamp(0.0, 1.0)
        pop = torch.cat([elite, child])
    return thresholds(best_genes[None])[0]
