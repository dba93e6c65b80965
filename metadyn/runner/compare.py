"""Task kind ``compare``: train several early-exit methods on the same data and seeds, one table side by side.

Each entry of ``methods`` (name -> ``{method, method_options, model}``) is trained with the task's shared
``train`` schedule from the same seed (same initialisation stream, same batch order), then evaluated with
the ``anytime`` kind's building blocks under the same leak-free protocol: temperatures fitted on
``calib``, exit thresholds on ``val`` — MSDNet's geometric family and a genetic-algorithm search (SCAN),
both for the same FLOPs budgets — and every reported number measured on ``test``.

Budgets are fractions of the *first* method's static network (the reference, normally exit-wise CE), so
every method gets the same absolute FLOPs.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metadyn.config import TaskConfig, from_dict
from metadyn.core.policies import (
    ThresholdPolicy,
    accuracy_at_budgets,
    budgeted_curve,
    evaluate_policy,
    ga_thresholds,
    pick_exits,
    policy_scores,
)
from metadyn.core.train import pick_device, seed_everything
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.anytime import (
    BUDGET_FRACTIONS,
    DataSpec,
    EvalSpec,
    ModelSpec,
    TrainSpec,
    build_method,
    build_model,
    check_specs,
    evaluate,
    load_data,
    train,
)
from metadyn.runner.report import finish_curve_plot, markdown_table, pyplot

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class MethodSpec:
    """One contender: a training method (METHODS) and, optionally, its own model (default: the task's)."""

    method: str = "ce"
    method_options: dict = field(default_factory=dict)
    model: ModelSpec | None = None


@dataclass
class GASpec:
    """The genetic-algorithm threshold search (:func:`metadyn.core.policies.ga_thresholds`)."""

    population: int = 64
    generations: int = 100
    mutation: float = 0.15
    curve_points: int = 8  # budgets between each method's first and last exit for the GA-vs-geometric curve


@dataclass
class CompareConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    ga: GASpec = field(default_factory=GASpec)
    methods: dict = field(default_factory=lambda: {"ce": {"method": "ce"}})


def method_specs(cfg: CompareConfig) -> dict[str, MethodSpec]:
    """The validated ``methods`` mapping (InputError naming the key of a bad entry)."""
    if not cfg.methods:
        raise InputError("'methods' must name at least one method to train")
    if cfg.train.method != "ce" or cfg.train.method_options:
        raise InputError("compare: set each entry's method in 'methods', not train.method / train.method_options")
    specs = {}
    for name, entry in cfg.methods.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise InputError(f"'methods' key {name!r} must be a folder-safe name (letters, digits, _ . -)")
        if not isinstance(entry, dict):
            raise InputError(f"'methods.{name}' must be a mapping, got {type(entry).__name__} {entry!r}")
        specs[name] = from_dict(MethodSpec, entry, prefix=f"methods.{name}.")
    g = cfg.ga
    if g.population < 4 or g.generations < 0 or g.curve_points < 1 or not g.mutation > 0:
        raise InputError(f"ga needs population >= 4, generations >= 0, curve_points >= 1 and mutation > 0, got {g}")
    return specs


def _ga_point(val, val_y, test, test_y, cum, budget: float, score: str, g: GASpec, seed: int) -> dict:
    """GA thresholds fitted on ``val`` for ``budget`` FLOPs; accuracy/cost on val and test."""
    scores = policy_scores(val, score)
    correct = torch.stack([lg.argmax(-1) for lg in val]) == val_y[None]  # (K, N)
    t = ga_thresholds(scores, correct, cum, budget, population=g.population, generations=g.generations,
                      mutation=g.mutation, seed=seed)
    policy = ThresholdPolicy(t.tolist(), score)
    on_val = evaluate_policy(val, val_y, policy, cum)
    return {**evaluate_policy(test, test_y, policy, cum), "val_accuracy": on_val["accuracy"],
            "val_mflops": on_val["mflops"], "thresholds": t.tolist()}


def compare_method(name: str, ev, data, budgets: list[float], cfg: CompareConfig) -> dict:
    """Budgeted accuracy of one trained method: geometric (MSDNet) and GA (SCAN) thresholds, both on val."""
    score, cum = cfg.eval.policy, ev.costs.cumulative
    vy, ty = data.val.y, data.test.y
    geo = accuracy_at_budgets(ev.val, ev.test, ty, cum, budgets, score)
    rows = []
    for frac, b, gr in zip(BUDGET_FRACTIONS, budgets, geo):
        row = {"budget_fraction": frac, "budget_mflops": b / 1e6, "geometric": gr, "ga": None}
        if gr["accuracy"] is not None:
            on_val = evaluate_policy(ev.val, vy, ThresholdPolicy(gr["thresholds"], score), cum)
            gr["val_accuracy"], gr["val_mflops"] = on_val["accuracy"], on_val["mflops"]
            row["ga"] = _ga_point(ev.val, vy, ev.test, ty, cum, b, score, cfg.ga, cfg.seed)
        rows.append(row)
    geo_curve = budgeted_curve(ev.val, ev.test, ty, cum, score)
    n = cfg.ga.curve_points
    grid = [cum[0] + (cum[-1] - cum[0]) * i / max(n - 1, 1) for i in range(n)]
    ga_curve = [{"budget_mflops": b / 1e6, **_ga_point(ev.val, vy, ev.test, ty, cum, b, score, cfg.ga, cfg.seed)}
                for b in grid]
    return {"budgets": rows, "geometric_curve": geo_curve, "ga_curve": ga_curve}


def paired_difference(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """``accuracy(other) - accuracy(ref)`` on the same test samples (bool ``(N,)`` correctness) and its
    standard error from the per-sample differences in {-1, 0, 1} (only discordant samples contribute)."""
    n = len(ref)
    gained, lost = int((other & ~ref).sum()), int((ref & ~other).sum())
    d = (gained - lost) / n
    return {"difference": d, "se": max((gained + lost) / n - d * d, 0.0) ** 0.5 / n ** 0.5,
            "gained": gained, "lost": lost}


def _test_correct(ev, y, budget_rows: list[dict], score: str) -> dict[str, torch.Tensor]:
    """Per-sample test correctness of the final exit and of each budget's geometric thresholds."""
    out = {"final exit": ev.test[-1].argmax(-1) == y}
    for b in budget_rows:
        t = b["geometric"]["thresholds"]
        if t is not None:
            chosen = pick_exits(ev.test, ThresholdPolicy(t, score))[1]
            out[f"{100 * b['budget_fraction']:.0f}% budget"] = chosen.argmax(-1) == y
    return out


def run(cfg: CompareConfig, out: Path, prepare, progress: bool = True) -> dict:
    from metadyn.data.augment import AUGMENTS

    device = pick_device(cfg.device)
    specs = method_specs(cfg)
    check_specs(cfg.train, cfg.eval)
    data = load_data(cfg.data, cfg.seed)
    built = {}
    for name, spec in specs.items():  # build everything (and fail on bad input) before touching `out`
        seed_everything(cfg.seed)  # every method starts from the same random stream
        where = f"methods.{name}.model.options" if spec.model is not None else "model.options"
        model = build_model(spec.model or cfg.model, data, where)
        loss = build_method(spec.method, spec.method_options, model, data.in_shape)
        built[name] = (model, loss)
    augment = AUGMENTS[cfg.train.augment]
    prepare()

    results, exits, curve, correct = {}, [], [], {}
    ref_full = None
    for name, (model, loss) in built.items():
        spec = specs[name]
        (out / name).mkdir(exist_ok=True)
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        state = train(model, loss, data, cfg.train, augment, cfg.seed, device, out / name / "checkpoint.pt",
                      progress)
        seconds = time.perf_counter() - t0
        model.eval()
        ev = evaluate(model, data, cfg.eval)
        if ref_full is None:
            ref_full = ev.costs.full
        budgets = [f * ref_full for f in BUDGET_FRACTIONS]
        res = compare_method(name, ev, data, budgets, cfg)
        m = spec.model or cfg.model
        results[name] = {"method": spec.method, "method_options": spec.method_options, "backbone": m.backbone,
                         "model_options": m.options, "full_mflops": ev.costs.full / 1e6,
                         "params": sum(p.numel() for p in model.parameters()), "train_seconds": seconds,
                         "final_train_loss": state.history[-1]["loss"], **res}
        correct[name] = _test_correct(ev, data.test.y, res["budgets"], cfg.eval.policy)
        exits += [{"method": name, **e} for e in ev.exits]
        curve += [{"method": name, "thresholds": "geometric", "mflops": c["mflops"], "accuracy": c["accuracy"],
                   "p": c["p"]} for c in res["geometric_curve"]]
        curve += [{"method": name, "thresholds": "ga", "mflops": c["mflops"], "accuracy": c["accuracy"],
                   "budget_mflops": c["budget_mflops"]} for c in res["ga_curve"]]

    reference = next(iter(results))
    for name in results:
        if name != reference:
            results[name]["vs_reference"] = {key: paired_difference(correct[reference][key], c)
                                             for key, c in correct[name].items() if key in correct[reference]}
    plot_comparison(out / "accuracy_vs_mflops.png", results, exits, f"{cfg.task} (test)")
    extra = {"reference": reference, "reference_full_mflops": ref_full / 1e6, "budget_fractions": BUDGET_FRACTIONS,
             "methods": results, "splits": {n: len(getattr(data, n)) for n in ("train", "val", "calib", "test")}}
    metrics = {"dataset": cfg.data.name, "seed": cfg.seed, "device": str(device), "exits": exits, "curve": curve,
               "extra": extra}
    atomic_write_text(out / "report.md", report(cfg, metrics))
    return metrics


def _pct(v) -> float | None:
    return None if v is None else 100 * v


def report(cfg: CompareConfig, m: dict) -> str:
    e = m["extra"]
    res, ref = e["methods"], e["reference"]
    k_max = max(len([x for x in m["exits"] if x["method"] == n]) for n in res)
    by = {n: [x for x in m["exits"] if x["method"] == n] for n in res}

    cols = [("name", "method", ""), ("what", "loss / backbone", "")]
    arow, crow = [], []
    for n, r in res.items():
        a = {"name": n, "what": f"{r['method']} / {r['backbone']}"}
        c = {"name": n}
        for x in by[n]:
            a[f"e{x['exit']}"] = f"{100 * x['accuracy']:.2f} ({x['mflops']:.2f})"
            c[f"e{x['exit']}"] = f"{x['ece']:.3f} → {x['ece_calibrated']:.3f}"
        arow.append(a)
        crow.append(c)
    exit_cols = [(f"e{i}", f"exit {i}", "") for i in range(k_max)]
    anytime_table = markdown_table(arow, cols + exit_cols)
    ece_table = markdown_table(crow, cols[:1] + exit_cols)

    brow = []
    for n, r in res.items():
        row = {"name": n}
        for b in r["budgets"]:
            f = f"{100 * b['budget_fraction']:.0f}"
            for kind in ("geometric", "ga"):
                p = b[kind]
                row[f"{kind}{f}"] = (None if p is None or p["accuracy"] is None else
                                     f"{100 * p['accuracy']:.2f} ({100 * p['val_accuracy']:.2f}) {p['mflops']:.2f}")
        brow.append(row)
    bcols = [("name", "method", "")]
    for frac in BUDGET_FRACTIONS:
        f = f"{100 * frac:.0f}"
        mf = frac * e["reference_full_mflops"]
        bcols += [(f"geometric{f}", f"{f}% ({mf:.2f}) geometric", ""), (f"ga{f}", f"{f}% GA", "")]
    budget_table = markdown_table(brow, bcols)

    trow = [{"name": n, "what": f"{r['method']} {r['method_options'] or ''}".strip(), "backbone": r["backbone"],
             "full": r["full_mflops"], "params": r["params"], "s": r["train_seconds"]} for n, r in res.items()]
    train_table = markdown_table(trow, [("name", "method", ""), ("what", "loss", ""), ("backbone", "backbone", ""),
                                        ("full", "static MFLOPs", ".3f"), ("params", "parameters", "d"),
                                        ("s", "train s (this run)", ".0f")])

    # What the numbers say against the reference, computed from the paired test differences.
    lines = []
    for n, r in res.items():
        if n == ref:
            continue
        vs = r["vs_reference"]
        up = [k for k, v in vs.items() if v["difference"] > 2 * v["se"]]
        down = [k for k, v in vs.items() if v["difference"] < -2 * v["se"]]
        verdict = ("better than" if up and not down else "worse than" if down and not up else
                   "mixed against" if up else "not significantly different from")
        parts = ", ".join(f"{k} {100 * v['difference']:+.2f} ± {100 * v['se']:.2f}" for k, v in vs.items())
        lines.append(f"- `{n}` is {verdict} `{ref}` (beyond 2 s.e.): {parts} points.")
    n_test = e["splits"]["test"]
    ga_lines = []
    for n, r in res.items():
        pairs = [(b["ga"], b["geometric"]) for b in r["budgets"] if b["ga"] is not None]
        if pairs:
            dv = 100 * sum(a["val_accuracy"] - g["val_accuracy"] for a, g in pairs) / len(pairs)
            dt = 100 * sum(a["accuracy"] - g["accuracy"] for a, g in pairs) / len(pairs)
            ga_lines.append(f"- `{n}`: GA minus geometric, mean over budgets: val {dv:+.2f}, test {dt:+.2f} points.")

    return f"""# {cfg.task}

Every method is trained on `{cfg.data.name}` with the same seed ({cfg.seed}), schedule ({cfg.train.epochs} epochs,
{cfg.train.optimizer}, lr {cfg.train.lr}, batch {cfg.train.batch_size}, augment `{cfg.train.augment}`) and batch order
on device `{m['device']}`; splits {e['splits']}. Temperatures are fitted on `calib`, exit thresholds on `val` (raw
{cfg.eval.policy} scores); every number is on `test` unless marked val. MFLOPs: `torch.utils.flop_counter`
(2 per multiply-add); an exit's cost includes every earlier exit's classifier.

## Anytime prediction: test accuracy % of every exit (its cumulative MFLOPs)

{anytime_table}

## Budgeted batch classification: test accuracy % (val accuracy %) and test MFLOPs

Budgets are 25/50/75% of the reference `{ref}`'s static network ({e['reference_full_mflops']:.3f} MFLOPs): the same
absolute MFLOPs (in parentheses) for every method. Thresholds are fitted on `val` to spend at most the budget there,
by MSDNet's geometric exit distributions (bisection on p) and by a genetic algorithm (SCAN; population
{cfg.ga.population}, {cfg.ga.generations} generations, seed {cfg.seed}). "—": the budget is below the method's first
exit. A search that reaches its best val accuracy below the budget stops spending there (the GA prefers the
cheaper of equally accurate thresholds), so its test MFLOPs can sit well under the budget.

{budget_table}

{chr(10).join(ga_lines)}

## Calibration: ECE of every exit, raw → temperature-scaled (T fitted on calib)

{ece_table}

## Against the reference

Test accuracy differences to `{ref}` on the same {n_test} test samples (one sample = {100 / n_test:.2f} points), ± the
paired standard error; budgets use the geometric thresholds.

{chr(10).join(lines) or '(one method only)'}

## Training

{train_table}

![accuracy vs MFLOPs](accuracy_vs_mflops.png)
"""


def plot_comparison(path: Path, results: dict, exits: list[dict], title: str = "") -> None:
    """Per method: the geometric-threshold curve (line), the GA curve (dashed, x) and each exit (dots)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        geo = sorted(r["geometric_curve"], key=lambda c: c["mflops"])
        ax.plot([c["mflops"] for c in geo], [100 * c["accuracy"] for c in geo], "-", color=color, label=name)
        ga = sorted(r["ga_curve"], key=lambda c: c["mflops"])
        ax.plot([c["mflops"] for c in ga], [100 * c["accuracy"] for c in ga], "x--", color=color, alpha=0.7)
        pts = [x for x in exits if x["method"] == name]
        ax.plot([x["mflops"] for x in pts], [100 * x["accuracy"] for x in pts], ".", color=color, ms=6)
    ax.plot([], [], "k-", label="geometric thresholds (MSDNet)")
    ax.plot([], [], "kx--", label="GA thresholds (SCAN)")
    ax.plot([], [], "k.", label="single exit")
    finish_curve_plot(fig, ax, path, title or "early-exit methods", legend_size=7)


TASK_KINDS.register("compare", TaskKind(CompareConfig, run))
