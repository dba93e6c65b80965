"""Task kind ``datafree``: convert a trained static network into an early-exit one without its data.

Per seed: a static CNN teacher is trained on ``train``; exits are attached after ``exits.at`` (the
teacher frozen, its output bit-identical) and trained by distillation from the teacher's final output on
one transfer set per condition:

* ``real`` — the real training images (labels unused): the upper bound;
* ``impressions`` — ZSKD data impressions synthesised from the teacher alone;
* ``impressions_bn`` — the same, plus DeepInversion's BatchNorm-statistics prior;
* ``noise`` — uniform noise in the data range, as many samples as impressions: the control;
* ``untrained`` — the heads as initialised;
* ``student`` (when ``student.backbone`` is set) — a separate small multi-exit network distilled from
  the teacher on the impressions.

Within a seed every condition starts from the same head initialisation. Exit thresholds are fitted on
``val``; every number in the tables is on ``test``, used for nothing else; the ``val`` accuracies in
``metrics.json`` are what hyper-parameters (e.g. the synthesis temperature) are chosen on.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from metadyn.config import TaskConfig, checked_call
from metadyn.core.backbones import attach_exits
from metadyn.core.calibration import ece
from metadyn.core.flops import exit_costs
from metadyn.core.heads import ExitHead
from metadyn.core.inference import collect_logits
from metadyn.core.losses import labeled_ce
from metadyn.core.policies import SCORES, accuracy_at_budgets, anytime_accuracy, budgeted_curve
from metadyn.core.train import fit, load_checkpoint, pick_device, save_checkpoint, seed_everything
from metadyn.datafree import (
    Impressions,
    SynthesisSettings,
    distill_student,
    static_cnn,
    synthesize_impressions,
    teacher_logits,
    train_exits,
)
from metadyn.errors import InputError
from metadyn.registry import BACKBONES, TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.anytime import BUDGET_FRACTIONS, DataSpec
from metadyn.runner.anytime import FitSpec as BaseFitSpec
from metadyn.runner.report import finish_curve_plot, markdown_table, pyplot

CONDITIONS = ("real", "impressions", "impressions_bn", "noise", "untrained")
DESCRIPTIONS = {
    "real": "real training images (upper bound)",
    "impressions": "data impressions (ZSKD)",
    "impressions_bn": "data impressions + BatchNorm prior",
    "noise": "uniform noise (control)",
    "untrained": "untrained exits",
    "student": "small multi-exit student distilled on impressions",
}


@dataclass
class FitSpec(BaseFitSpec):
    """Arguments of the core ``fit`` for one training stage (Adam defaults)."""

    lr: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0


@dataclass
class TeacherSpec:
    """The static teacher (:class:`~metadyn.datafree.teacher.StaticCNN`) and how it is trained."""

    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    convs: int = 2
    train: FitSpec = field(default_factory=lambda: FitSpec(epochs=15, lr=0.05, optimizer="sgd",
                                                           weight_decay=5e-4, augment="shift"))


@dataclass
class ExitSpec:
    """Where exits go, their heads, and how they are distilled from the teacher's final output."""

    at: list[str] = field(default_factory=lambda: ["stages.0", "stages.1"])
    head_conv: int = 0  # channels of a conv3x3 before each head's pooling (0: pooling + linear)
    tau: float = 1.0  # distillation temperature
    train: FitSpec = field(default_factory=FitSpec)


@dataclass
class ImpressionSpec:
    num: int = 1280  # impressions per seed (the noise control has as many samples)
    bn_weight: float = 0.5  # BatchNorm-prior weight of the impressions_bn condition (chosen on digits val)
    synth: SynthesisSettings = field(default_factory=SynthesisSettings)


@dataclass
class StudentSpec:
    backbone: str | None = None  # a BACKBONES name; None: no student condition
    options: dict = field(default_factory=dict)


@dataclass
class EvalSpec:
    policy: str = "confidence"  # exit score for the budgeted curve: confidence or entropy
    ece_bins: int = 15
    batch_size: int = 256


@dataclass
class DatafreeConfig(TaskConfig):
    repeats: int = 3  # seeds seed, seed + 1, ...
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    exits: ExitSpec = field(default_factory=ExitSpec)
    impressions: ImpressionSpec = field(default_factory=ImpressionSpec)
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    student: StudentSpec = field(default_factory=StudentSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


# --------------------------------------------------------------------------- building and checking


def _conditions(cfg: DatafreeConfig) -> list[str]:
    names = list(cfg.conditions)
    for c in names:
        if c not in CONDITIONS:
            raise InputError(f"unknown condition {c!r} in 'conditions'; choose from: {', '.join(CONDITIONS)}")
    if len(set(names)) != len(names) or not names:
        raise InputError(f"'conditions' must list distinct conditions, got {names}")
    if cfg.student.backbone is not None:
        names.append("student")
    return names


def _load_data(cfg: DatafreeConfig, seed: int):
    from metadyn.data import load_classification

    d = cfg.data
    return load_classification(d.name, root=d.root, seed=seed, val_fraction=d.val_fraction,
                               calib_fraction=d.calib_fraction, test_fraction=d.test_fraction, **d.options)


def _head(cfg: DatafreeConfig):
    return lambda c, k: ExitHead(c, k, conv_channels=cfg.exits.head_conv)


def _student(cfg: DatafreeConfig, data):
    return checked_call(BACKBONES.get(cfg.student.backbone), cfg.student.options, "student.options",
                        in_shape=data.in_shape, num_classes=data.num_classes)


def build(cfg: DatafreeConfig) -> list[str]:
    """Validate everything a run needs before its folder is touched; returns the conditions to run."""
    if cfg.repeats < 1:
        raise InputError(f"repeats must be at least 1, got {cfg.repeats}")
    conditions = _conditions(cfg)
    cfg.teacher.train.check("teacher.train")
    cfg.exits.train.check("exits.train")
    if not (cfg.exits.tau > 0 and math.isfinite(cfg.exits.tau)):
        raise InputError(f"exits.tau must be a positive number, got {cfg.exits.tau}")
    if cfg.exits.head_conv < 0:
        raise InputError(f"exits.head_conv must be non-negative, got {cfg.exits.head_conv}")
    if not cfg.exits.at:
        raise InputError("exits.at must name at least one module of the teacher")
    if cfg.impressions.num < 1:
        raise InputError(f"impressions.num must be at least 1, got {cfg.impressions.num}")
    cfg.impressions.synth.check("impressions.synth.")
    if not (cfg.impressions.bn_weight >= 0 and math.isfinite(cfg.impressions.bn_weight)):
        raise InputError(f"impressions.bn_weight must be a non-negative number, got {cfg.impressions.bn_weight}")
    if cfg.eval.policy not in SCORES:
        raise InputError(f"unknown eval.policy {cfg.eval.policy!r}; choose from: {', '.join(SCORES)}")
    data = _load_data(cfg, cfg.seed)
    teacher = static_cnn(data.in_shape, data.num_classes, cfg.teacher.widths, cfg.teacher.convs)
    attach_exits(teacher, cfg.exits.at, example_input=torch.zeros(1, *data.in_shape), head=_head(cfg))
    if "student" in conditions:
        _student(cfg, data)
    return conditions


# --------------------------------------------------------------------------- one seed


def _cached_impressions(path: Path, make) -> Impressions:
    """Impressions from ``path`` if a previous (identical) run wrote them, else ``make()`` and save."""
    if path.exists():
        return Impressions(**load_checkpoint(path))
    imps = make()
    save_checkpoint(vars(imps), path)
    return imps


def _evaluate(net, data, cfg: DatafreeConfig) -> dict:
    bs = cfg.eval.batch_size
    val, test = collect_logits(net, data.val.x, bs), collect_logits(net, data.test.x, bs)
    costs = exit_costs(net, data.in_shape)
    cum = costs.cumulative
    score = cfg.eval.policy
    budgets = accuracy_at_budgets(val, test, data.test.y, cum, [f * costs.full for f in BUDGET_FRACTIONS], score)
    return {
        "test": anytime_accuracy(test, data.test.y),
        "val": anytime_accuracy(val, data.val.y),
        "ece": [ece(lg, data.test.y, cfg.eval.ece_bins) for lg in test],
        "mflops": [c / 1e6 for c in cum],
        "full_mflops": costs.full / 1e6,
        "curve": [{"p": c["p"], "mflops": c["mflops"], "accuracy": c["accuracy"]}
                  for c in budgeted_curve(val, test, data.test.y, cum, score)],
        "budgets": [b["accuracy"] for b in budgets],
    }


def _run_seed(cfg: DatafreeConfig, seed: int, conditions: list[str], out: Path, device,
              progress: bool) -> tuple[dict, Impressions | None]:
    """Train the teacher, build the transfer sets, train and evaluate every condition for one seed."""
    seed_everything(seed)
    data = _load_data(cfg, seed)
    ck = out / "checkpoints"
    teacher = static_cnn(data.in_shape, data.num_classes, cfg.teacher.widths, cfg.teacher.convs)
    fit(teacher, data.train, loss=labeled_ce, seed=seed, device=device, checkpoint=ck / f"seed{seed}_teacher.pt",
        progress=progress, **cfg.teacher.train.fit_kwargs())
    teacher.eval()
    teacher_test = float((teacher_logits(teacher, data.test.x).argmax(-1) == data.test.y).double().mean())

    imp = cfg.impressions
    lo, hi = imp.synth.bounds
    settings = {"impressions": imp.synth, "impressions_bn": replace(imp.synth, bn_weight=imp.bn_weight)}
    impressions: dict[str, Impressions] = {}
    for name in settings:
        if name in conditions or (name == "impressions" and "student" in conditions):
            impressions[name] = _cached_impressions(ck / f"seed{seed}_{name}_data.pt", lambda s=settings[name]: (
                synthesize_impressions(teacher, imp.num, in_shape=data.in_shape, settings=s, seed=seed,
                                       device=device, progress=progress)))
    transfer = {name: x.x for name, x in impressions.items()}
    transfer["real"] = data.train.x
    transfer["noise"] = torch.rand((imp.num, *data.in_shape), generator=torch.Generator().manual_seed(seed)) \
        * (hi - lo) + lo
    transfer["student"] = transfer.get("impressions")

    results = {}
    for name in conditions:
        torch.manual_seed(seed * 1009 + 1)  # the same head initialisation for every condition of a seed
        fit_kw = {"seed": seed, "device": device, "checkpoint": ck / f"seed{seed}_{name}_exits.pt",
                  "progress": progress, **cfg.exits.train.fit_kwargs()}
        if name == "student":  # the teacher's outputs are precomputed: no augmentation
            net = _student(cfg, data)
            distill_student(net, teacher, transfer[name], tau=cfg.exits.tau, **{**fit_kw, "augment": None})
        else:
            net = attach_exits(teacher, cfg.exits.at, example_input=data.train.x[:1].to(device), head=_head(cfg))
            if name != "untrained":
                train_exits(net, transfer[name], tau=cfg.exits.tau, **fit_kw)
        net.eval()
        results[name] = _evaluate(net, data, cfg)
    summary = {"seed": seed, "teacher_test_accuracy": teacher_test,
               "impressions": {n: i.summary() for n, i in impressions.items() if n in conditions},
               "conditions": results, "splits": {n: len(getattr(data, n)) for n in ("train", "val", "calib", "test")}}
    return summary, impressions.get("impressions")


# --------------------------------------------------------------------------- aggregation and report


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _aggregate(per_seed: list[dict], conditions: list[str]) -> dict:
    agg = {}
    for name in conditions:
        rs = [s["conditions"][name] for s in per_seed]
        k = len(rs[0]["test"])
        exits = []
        for i in range(k):
            m, sd = _mean_std([r["test"][i] for r in rs])
            vm, vsd = _mean_std([r["val"][i] for r in rs])
            exits.append({"exit": i, "accuracy": m, "accuracy_std": sd, "val_accuracy": vm, "val_accuracy_std": vsd,
                          "mflops": statistics.fmean(r["mflops"][i] for r in rs),
                          "ece": statistics.fmean(r["ece"][i] for r in rs)})
        curve = [{"p": c["p"], "mflops": statistics.fmean(r["curve"][j]["mflops"] for r in rs),
                  "accuracy": statistics.fmean(r["curve"][j]["accuracy"] for r in rs)}
                 for j, c in enumerate(rs[0]["curve"])]
        budgets = []
        for j, f in enumerate(BUDGET_FRACTIONS):
            m, sd = _mean_std([r["budgets"][j] for r in rs])
            budgets.append({"budget_fraction": f, "accuracy": m, "accuracy_std": sd})
        agg[name] = {"exits": exits, "curve": curve, "budgets": budgets,
                     "full_mflops": statistics.fmean(r["full_mflops"] for r in rs)}
    return agg


def _pm(m: float | None, sd: float | None) -> str | None:
    return None if m is None else f"{100 * m:.1f} ± {100 * sd:.1f}"


def _verdict(per_seed: list[dict], conditions: list[str]) -> list[str]:
    """Plain statements comparing the impressions with the noise control and with real data, paired by seed."""
    lines = []
    if "noise" not in conditions:
        return lines
    k = len(per_seed[0]["conditions"]["noise"]["test"])
    n = len(per_seed)
    for name in ("impressions", "impressions_bn"):
        if name not in conditions:
            continue
        for i in range(k - 1):
            d = [s["conditions"][name]["test"][i] - s["conditions"]["noise"]["test"][i] for s in per_seed]
            m, sd = _mean_std(d)
            wins = sum(v > 0 for v in d)
            line = (f"- exit {i}, {DESCRIPTIONS[name]}: above the noise control on {wins} of {n} seeds "
                    f"({100 * m:+.1f} ± {100 * sd:.1f} points)")
            if "real" in conditions:
                g = [s["conditions"]["real"]["test"][i] - s["conditions"][name]["test"][i] for s in per_seed]
                gm, gsd = _mean_std(g)
                line += f"; real data is ahead by {100 * gm:+.1f} ± {100 * gsd:.1f} points"
            lines.append(line + ".")
    return lines


def report(cfg: DatafreeConfig, m: dict) -> str:
    e = m["extra"]
    agg, conditions = e["conditions"], e["condition_names"]
    attached = [n for n in conditions if n != "student"]

    def acc_tables(key: str) -> str:
        tables = []
        for names, note in ((attached, ""), (["student"] if "student" in conditions else [], "Student (its own exits "
                                                                                            "and MFLOPs):\n\n")):
            if not names:
                continue
            ex0 = agg[names[0]]["exits"]
            cols = [("cond", "transfer set", "")] + [(f"e{i}", f"exit {i} ({x['mflops']:.3f} MFLOPs)", "")
                                                     for i, x in enumerate(ex0)]
            rows = [{"cond": DESCRIPTIONS[n], **{f"e{i}": _pm(x[key], x[f"{key}_std"])
                                                 for i, x in enumerate(agg[n]["exits"])}} for n in names]
            tables.append(note + markdown_table(rows, cols))
        return "\n\n".join(tables)

    full = agg[conditions[0]]["full_mflops"]
    budget_rows = [{"cond": DESCRIPTIONS[n], **{f"b{j}": _pm(b["accuracy"], b["accuracy_std"])
                                                for j, b in enumerate(agg[n]["budgets"])}} for n in conditions]
    bcols = [("cond", "transfer set", "")] + [(f"b{j}", f"{100 * f:.0f}% of static", "")
                                              for j, f in enumerate(BUDGET_FRACTIONS)]
    imp_rows = []
    for s in e["per_seed"]:
        for name, summ in s["impressions"].items():
            row = {"seed": s["seed"], "cond": name, "kl": summ["median_kl"], "mkl": summ["mean_kl"],
                   "agree": 100 * summ["argmax_agreement"]}
            for b, v in summ["per_beta"].items():
                row[f"kl{b}"] = v["median_kl"]
            imp_rows.append(row)
    betas = [f"{b:g}" for b in cfg.impressions.synth.betas]
    imp_table = markdown_table(imp_rows, [("seed", "seed", ""), ("cond", "impressions", ""),
                                          ("kl", "median KL", ".4f"), ("mkl", "mean KL", ".4f"),
                                          ("agree", "argmax agreement (%)", ".1f")]
                               + [(f"kl{b}", f"median KL (beta={b})", ".4f") for b in betas])
    tm, tsd = e["teacher_test_accuracy"]
    verdict = "\n".join(_verdict(e["per_seed"], conditions)) or "(no noise control in this run)"
    s = cfg.impressions.synth
    return f"""# {cfg.task}

Data-free conversion on `{cfg.data.name}` {cfg.data.options or ''} — seeds {e['seeds']}, device `{m['device']}`,
splits {e['per_seed'][0]['splits']}. Teacher: static CNN, widths {cfg.teacher.widths}, {cfg.teacher.convs} convs per
stage, trained for {cfg.teacher.train.epochs} epochs on `train`: test accuracy {100 * tm:.2f} ± {100 * tsd:.2f}%.
Exits after {cfg.exits.at} (head conv channels {cfg.exits.head_conv}) are trained with the teacher frozen, by
distillation from its final output (tau = {cfg.exits.tau}) for {cfg.exits.train.epochs} epochs on each transfer set;
the final exit is the teacher itself (bit-identical). Impressions: {cfg.impressions.num} per seed, tau = {s.tau},
{s.steps} Adam steps (lr {s.lr}) per batch of {s.batch_size}, betas {s.betas}, inputs clamped to {s.bounds},
BatchNorm prior weight {cfg.impressions.bn_weight} for the `impressions_bn` condition. Noise: {cfg.impressions.num}
uniform samples in {s.bounds}. Mean ± standard deviation over the seeds; the static network costs {full:.3f} MFLOPs.

## Test accuracy per exit (%)

{acc_tables("accuracy")}

## What the numbers show

{verdict}

## Budgeted test accuracy (%): {cfg.eval.policy} thresholds fitted on `val` for a share of the static FLOPs

The thresholds are fitted on the real `val` split for every condition (a deployment without any data would
have to fit them on impressions; not done here). "—": the budget is below the first exit's cost.

{markdown_table(budget_rows, bcols)}

## Validation accuracy per exit (%) — what hyper-parameters are chosen on

{acc_tables("val_accuracy")}

## Achieved match of the impressions: KL(target || softmax(teacher / tau))

{imp_table}

![accuracy vs MFLOPs](accuracy_vs_mflops.png)
{"![impressions](impressions.png)" if "impressions" in conditions else ""}
"""


# --------------------------------------------------------------------------- plots


def plot_conditions(path: Path, agg: dict, conditions: list[str], title: str) -> None:
    """Budgeted curves (mean over seeds) of every condition, with each exit's anytime accuracy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in conditions:
        pts = sorted(agg[name]["curve"], key=lambda c: c["mflops"])
        line, = ax.plot([c["mflops"] for c in pts], [100 * c["accuracy"] for c in pts], "-", label=DESCRIPTIONS[name])
        ex = agg[name]["exits"]
        ax.plot([x["mflops"] for x in ex], [100 * x["accuracy"] for x in ex], "o", color=line.get_color(), ms=4)
    finish_curve_plot(fig, ax, path, title, legend_size=7)


def plot_impressions(path: Path, imps: Impressions, per_class: int = 6) -> None:
    """A grid of impressions: one row per class (at most 20), ``per_class`` columns, first channel."""
    plt = pyplot()
    k = int(imps.classes.max()) + 1
    rows = list(range(min(k, 20)))
    fig, axes = plt.subplots(len(rows), per_class, figsize=(per_class * 0.7, len(rows) * 0.75), squeeze=False)
    for r, c in enumerate(rows):
        idx = torch.nonzero(imps.classes == c).flatten()[:per_class]
        for j in range(per_class):
            ax = axes[r][j]
            ax.axis("off")
            if j < len(idx):
                n = int(idx[j])
                ax.imshow(imps.x[n, 0].numpy(), cmap="gray", vmin=float(imps.x.min()), vmax=float(imps.x.max()))
                ax.set_title(f"{c} b={float(imps.betas[n]):g}", fontsize=5)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- run


def run(cfg: DatafreeConfig, out: Path, prepare, progress: bool = True) -> dict:
    device = pick_device(cfg.device)
    conditions = build(cfg)
    prepare()

    seeds = [cfg.seed + r for r in range(cfg.repeats)]
    runs = [_run_seed(cfg, s, conditions, out, device, progress) for s in seeds]
    per_seed, example = [r[0] for r in runs], runs[0][1]
    agg = _aggregate(per_seed, conditions)
    main = "impressions" if "impressions" in conditions else conditions[0]
    plot_conditions(out / "accuracy_vs_mflops.png", agg, conditions, f"{cfg.task} (test, mean of {len(seeds)} seeds)")
    if example is not None:
        plot_impressions(out / "impressions.png", example)
    tm = _mean_std([s["teacher_test_accuracy"] for s in per_seed])
    extra = {"main_condition": main, "condition_names": conditions, "conditions": agg, "seeds": seeds,
             "teacher_test_accuracy": list(tm), "full_mflops": agg[main]["full_mflops"], "per_seed": per_seed,
             "verdict": _verdict(per_seed, conditions)}
    metrics = {"dataset": cfg.data.name, "seed": cfg.seed, "device": str(device), "exits": agg[main]["exits"],
               "curve": agg[main]["curve"], "extra": extra}
    atomic_write_text(out / "report.md", report(cfg, metrics))
    return metrics


TASK_KINDS.register("datafree", TaskKind(DatafreeConfig, run))
