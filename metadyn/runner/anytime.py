"""Task kind ``anytime``: train a multi-exit network, calibrate it, fit exit thresholds and evaluate.

Protocol (leak-free): the network is trained on ``train``; per-exit temperatures are fitted on
``calib``; exit thresholds (MSDNet's budgeted batch classification) are fitted on ``val``; every
number in the report is measured on ``test``, which is used for nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metadyn.config import TaskConfig, checked_call
from metadyn.core.calibration import ece, fit_temperatures, reliability
from metadyn.core.flops import ExitCosts, exit_costs
from metadyn.core.inference import collect_logits, dynamic_exit
from metadyn.core.policies import (
    SCORES,
    ThresholdPolicy,
    accuracy_at_budgets,
    anytime_accuracy,
    budgeted_curve,
    fit_thresholds_for_budget,
    pick_exits,
    policy_scores,
)
from metadyn.core.train import fit, pick_device, seed_everything
from metadyn.errors import InputError
from metadyn.registry import BACKBONES, METHODS, TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.report import markdown_table, plot_accuracy_vs_mflops, plot_exit_histogram, plot_reliability

BUDGET_FRACTIONS = (0.25, 0.5, 0.75)
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


@dataclass
class DataSpec:
    name: str = "digits"
    root: str | None = None
    val_fraction: float = 0.1
    calib_fraction: float = 0.1
    test_fraction: float = 0.2
    options: dict = field(default_factory=dict)


@dataclass
class ModelSpec:
    backbone: str = "resnet"
    options: dict = field(default_factory=dict)


@dataclass
class FitSpec:
    """Arguments of the core ``fit`` for one training stage (task kinds subclass it to change defaults)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "none"

    def check(self, where: str = "train", min_epochs: int = 1) -> None:
        """InputError naming ``where.<key>`` for a value ``fit`` cannot take."""
        from metadyn.data.augment import AUGMENTS

        if self.epochs < min_epochs:
            raise InputError(f"{where}.epochs must be at least {min_epochs}, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"{where}.batch_size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"{where}.lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise InputError(f"{where}.weight_decay must be a non-negative number, got {self.weight_decay}")
        for key, value, choices in (("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES),
                                    ("augment", self.augment, tuple(AUGMENTS))):
            if value not in choices:
                raise InputError(f"unknown {where}.{key} {value!r}; choose from: {', '.join(choices)}")

    def fit_kwargs(self) -> dict:
        """These settings as keyword arguments of :func:`metadyn.core.train.fit`."""
        from metadyn.data.augment import AUGMENTS

        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
                "momentum": self.momentum, "weight_decay": self.weight_decay, "schedule": self.schedule,
                "augment": AUGMENTS[self.augment]}


@dataclass
class TrainSpec(FitSpec):
    """A fit stage with the method (a METHODS loss and its options) it trains."""

    method: str = "ce"
    method_options: dict = field(default_factory=dict)


@dataclass
class EvalSpec:
    policy: str = "confidence"  # exit score: confidence (max softmax) or entropy
    calibrate: bool = True  # per-exit temperature scaling on the calib split
    ece_bins: int = 15
    batch_size: int = 256


@dataclass
class AnytimeConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


def build_method(name: str, options: dict, model, in_shape):
    """The loss of METHODS ``name``; a factory taking ``model`` / ``in_shape`` receives them (methods
    whose loss has parameters sized by the network, e.g. projection heads per exit)."""
    import inspect

    factory = METHODS.get(name)
    params = inspect.signature(factory).parameters
    fixed = {k: v for k, v in (("model", model), ("in_shape", in_shape)) if k in params}
    return checked_call(factory, options, "train.method_options", **fixed)


def check_specs(train: TrainSpec, ev: EvalSpec) -> None:
    """Reject a bad training or evaluation spec (InputError naming the key) before anything is built."""
    if ev.policy not in SCORES:
        raise InputError(f"unknown eval.policy {ev.policy!r}; choose from: {', '.join(SCORES)}")
    train.check("train")


def load_data(spec: DataSpec, seed: int):
    """The task's dataset with its seeded train/val/calib/test splits."""
    from metadyn.data import load_classification

    return load_classification(spec.name, root=spec.root, seed=seed, val_fraction=spec.val_fraction,
                               calib_fraction=spec.calib_fraction, test_fraction=spec.test_fraction, **spec.options)


def build_model(spec: ModelSpec, data, where: str = "model.options"):
    """The registered backbone ``spec.backbone`` for ``data``'s input shape and classes."""
    return checked_call(BACKBONES.get(spec.backbone), spec.options, where, in_shape=data.in_shape,
                        num_classes=data.num_classes)


def build(cfg: AnytimeConfig):
    """Validate and build everything a run needs (data, model, loss, augmentation) without side effects."""
    from metadyn.data.augment import AUGMENTS

    check_specs(cfg.train, cfg.eval)
    data = load_data(cfg.data, cfg.seed)
    model = build_model(cfg.model, data)
    loss = build_method(cfg.train.method, cfg.train.method_options, model, data.in_shape)
    return data, model, loss, AUGMENTS[cfg.train.augment]


def method_callbacks(loss, model) -> list:
    """The training callbacks a method brings: a loss may carry ``callbacks(model) -> list[Callback]``
    (e.g. IMTA's gradient equilibrium); most bring none."""
    make = getattr(loss, "callbacks", None)
    return list(make(model)) if make is not None else []


def train(model, loss, data, t: TrainSpec, augment, seed: int, device, checkpoint: Path, progress: bool = True):
    """Train ``model`` on ``data.train`` with ``loss`` (and the callbacks its method brings); resumable."""
    return fit(model, data.train, loss=loss, **{**t.fit_kwargs(), "augment": augment}, seed=seed, device=device,
               callbacks=method_callbacks(loss, model), checkpoint=checkpoint, progress=progress)


@dataclass
class Evaluation:
    """A trained network's exit logits on val/calib/test, its calib temperatures, FLOPs and per-exit
    test metrics (``exits``: accuracy, cumulative MFLOPs, ECE before/after temperature scaling, T)."""

    val: list[torch.Tensor]
    calib: list[torch.Tensor]
    test: list[torch.Tensor]
    temperatures: list[float]
    costs: ExitCosts
    exits: list[dict]


def evaluate(model, data, ev: EvalSpec) -> Evaluation:
    """Collect every exit's logits (eval mode), fit temperatures on ``calib`` and measure each exit on ``test``."""
    bs = ev.batch_size
    val, calib, test = (collect_logits(model, s.x, bs) for s in (data.val, data.calib, data.test))
    k = len(test)
    temps = fit_temperatures(calib, data.calib.y) if ev.calibrate else [1.0] * k
    costs = exit_costs(model, data.in_shape)
    cum = costs.cumulative
    acc = anytime_accuracy(test, data.test.y)
    exits = []
    for i in range(k):
        scaled = test[i] / temps[i]
        exits.append({"exit": i, "accuracy": acc[i], "mflops": cum[i] / 1e6, "ece": ece(test[i], data.test.y,
                      ev.ece_bins), "ece_calibrated": ece(scaled, data.test.y, ev.ece_bins),
                      "temperature": temps[i]})
    return Evaluation(val, calib, test, temps, costs, exits)


def run(cfg: AnytimeConfig, out: Path, prepare, progress: bool = True) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data, model, loss, augment = build(cfg)
    prepare()

    state = train(model, loss, data, cfg.train, augment, cfg.seed, device, out / "checkpoint.pt", progress)
    model.eval()

    ev = evaluate(model, data, cfg.eval)
    val, test, temps, costs, exits = ev.val, ev.test, ev.temperatures, ev.costs, ev.exits
    k = len(test)
    cum = costs.cumulative
    score = cfg.eval.policy

    # Thresholds are fitted on raw scores, as in MSDNet: they are per-exit quantiles of the validation
    # scores, which a per-exit temperature barely reorders, while a small temperature can saturate the
    # softmax and turn many scores into ties at 1.0.
    curve = budgeted_curve(val, test, data.test.y, cum, score)
    budgets = accuracy_at_budgets(val, test, data.test.y, cum, [f * costs.full for f in BUDGET_FRACTIONS], score)
    for b, f in zip(budgets, BUDGET_FRACTIONS):
        b["budget_fraction"] = f

    # Operating point at half the static network's FLOPs, run for real with batch compaction.
    half = fit_thresholds_for_budget(policy_scores(val, score), cum, max(0.5 * costs.full, cum[0]))
    policy = ThresholdPolicy(half.tolist(), score)
    picked_idx, picked = pick_exits(test, policy)
    dyn = dynamic_exit(model, data.test.x.to(device), policy)
    dyn.logits, dyn.exit_idx = dyn.logits.float().cpu(), dyn.exit_idx.cpu()
    mismatches = int((dyn.logits.argmax(-1) != picked.argmax(-1)).sum() + (dyn.exit_idx != picked_idx).sum())
    fractions = (torch.bincount(dyn.exit_idx, minlength=k).double() / len(dyn.exit_idx)).tolist()

    rel_before = [reliability(test[i], data.test.y, cfg.eval.ece_bins) for i in range(k)]
    rel_after = [reliability(test[i] / temps[i], data.test.y, cfg.eval.ece_bins) for i in range(k)]
    plot_accuracy_vs_mflops(out / "accuracy_vs_mflops.png", curve, exits, f"{cfg.task} (test)")
    plot_exit_histogram(out / "exit_histogram.png", fractions, "exits at 50% of the static network's FLOPs (test)")
    plot_reliability(out / "reliability.png", rel_before, rel_after)

    extra = {
        "full_mflops": costs.full / 1e6,
        "budgets": budgets,
        "operating_point": {"budget_fraction": 0.5, "thresholds": half.tolist(), "exit_fractions": fractions,
                            "accuracy": float((dyn.logits.argmax(-1) == data.test.y).double().mean()),
                            "dynamic_vs_picked_mismatches": mismatches},
        "splits": {n: len(getattr(data, n)) for n in ("train", "val", "calib", "test")},
        "history": state.history,
        "reliability": {"before": rel_before, "after": rel_after},
    }
    metrics = {"dataset": cfg.data.name, "seed": cfg.seed, "device": str(device), "exits": exits,
               "curve": [{"mflops": c["mflops"], "accuracy": c["accuracy"], "p": c["p"],
                          "exit_fractions": c["exit_fractions"]} for c in curve],
               "extra": extra}
    atomic_write_text(out / "report.md", report(cfg, metrics))
    return metrics


def report(cfg: AnytimeConfig, m: dict) -> str:
    e = m["extra"]
    full = e["full_mflops"]
    rows = [{**r, "pct": 100 * r["mflops"] / full, "acc": 100 * r["accuracy"]} for r in m["exits"]]
    exit_table = markdown_table(rows, [("exit", "exit", ""), ("mflops", "MFLOPs", ".3f"), ("pct", "% of static", ".0f"),
                                       ("acc", "test acc. (%)", ".2f"), ("ece", "ECE", ".3f"),
                                       ("ece_calibrated", "ECE (T-scaled)", ".3f"), ("temperature", "T", ".2f")])
    brow = [{"budget": f"{100 * b['budget_fraction']:.0f}% ({b['budget_mflops']:.3f})", "mflops": b["mflops"],
             "acc": None if b["accuracy"] is None else 100 * b["accuracy"],
             "fr": "below the first exit's cost" if b["exit_fractions"] is None else
             " / ".join(f"{100 * f:.0f}" for f in b["exit_fractions"])} for b in e["budgets"]]
    budget_table = markdown_table(brow, [("budget", "budget (val MFLOPs)", ""), ("mflops", "test MFLOPs", ".3f"),
                                         ("acc", "test acc. (%)", ".2f"), ("fr", "% leaving at each exit", "")])
    seen, crow = set(), []
    for c in sorted(m["curve"], key=lambda c: c["mflops"]):
        key = round(c["mflops"], 4)
        if key not in seen:
            seen.add(key)
            crow.append({"p": c["p"], "mflops": c["mflops"], "acc": 100 * c["accuracy"]})
    curve_table = markdown_table(crow, [("p", "p", ".2f"), ("mflops", "MFLOPs", ".3f"),
                                        ("acc", "test acc. (%)", ".2f")])
    op = e["operating_point"]
    return f"""# {cfg.task}

Backbone `{cfg.model.backbone}` {cfg.model.options or ''} trained with `{cfg.train.method}` for {cfg.train.epochs}
epochs on `{cfg.data.name}` (splits: {e['splits']}), seed {cfg.seed}, device `{m['device']}`.
Temperatures are fitted on `calib` (they give the ECE after scaling), exit thresholds on `val` (on raw
{cfg.eval.policy} scores, as in MSDNet); every number below is on `test`.
MFLOPs are counted by `torch.utils.flop_counter` (2 FLOPs per multiply-add); an exit's cost includes
every earlier exit's head. The static network (no early heads) costs {full:.3f} MFLOPs.

## Exits (anytime prediction)

{exit_table}

## Budgeted batch classification ({cfg.eval.policy} thresholds fitted on val for a FLOPs budget)

{budget_table}

At 50% of the static network's FLOPs, dynamic inference with batch compaction reached
{100 * op['accuracy']:.2f}% test accuracy; it disagreed with picking from the full forward on
{op['dynamic_vs_picked_mismatches']} samples (predictions or exits).

## Accuracy vs MFLOPs (MSDNet's geometric exit distributions, p = i/20)

{curve_table}

![accuracy vs MFLOPs](accuracy_vs_mflops.png)
![exit histogram](exit_histogram.png)
![reliability](reliability.png)
"""


TASK_KINDS.register("anytime", TaskKind(AnytimeConfig, run))
