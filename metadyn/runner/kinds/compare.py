"""Task kind ``compare``: several early-exit methods on one harness — same data, seed, schedule and batch order.

Each entry of ``methods`` is a METHODS loss with options and optionally its own model (e.g. MSDNet, or the
SCAN wrapper). Every method is measured like ``anytime`` (exits, ECE before/after temperature scaling on
``calib``), then budgeted: thresholds fitted on ``val`` for 25/50/75% of the *reference's* static FLOPs (the
first method), by MSDNet's geometric exit distributions and by SCAN's genetic algorithm (Zhang et al.,
NeurIPS 2019). Every method is compared with the reference on the same test samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from metadyn.config import TaskConfig, spec
from metadyn.core import evaluation, stats
from metadyn.core.policies import ThresholdPolicy, evaluate_policy, ga_thresholds, pick_exits, policy_scores
from metadyn.core.train import seed_everything, training_seconds
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, report, specs

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class GASpec:
    """The genetic-algorithm threshold search (:func:`metadyn.core.policies.ga_thresholds`)."""

    population: int = spec(64, ge=4)
    generations: int = spec(100, ge=0)
    mutation: float = spec(0.15, gt=0)
    curve_points: int = spec(8, ge=1)  # budgets between each method's first and last exit for the GA curve


@dataclass
class CompareConfig(TaskConfig):
    data: specs.DataSpec = field(default_factory=specs.DataSpec)
    model: specs.ModelSpec = field(default_factory=specs.ModelSpec)
    train: specs.FitSpec = field(default_factory=specs.FitSpec)
    eval: specs.EvalSpec = field(default_factory=specs.EvalSpec)
    ga: GASpec = field(default_factory=GASpec)
    methods: dict[str, specs.MethodSpec] = spec(factory=lambda: {"ce": specs.MethodSpec()}, nonempty=True)


def _ga_point(e, data, budget: float, score: str, g: GASpec, seed: int) -> dict:
    """GA thresholds fitted on ``val`` for ``budget`` FLOPs; accuracy/cost on test (and val)."""
    cum = e.costs.cumulative
    hits = torch.stack([lg.argmax(-1) for lg in e.val]) == data.val.y[None]  # (K, N)
    t = ga_thresholds(policy_scores(e.val, score), hits, cum, budget, population=g.population,
                      generations=g.generations, mutation=g.mutation, seed=seed)
    policy = ThresholdPolicy(t.tolist(), score)
    on_val = evaluate_policy(e.val, data.val.y, policy, cum)
    return {**evaluate_policy(e.test, data.test.y, policy, cum), "val_accuracy": on_val["accuracy"],
            "val_mflops": on_val["mflops"], "thresholds": t.tolist()}


@TASK_KINDS.register("compare")
class Compare(TaskKind):
    config = CompareConfig

    def build(self, cfg, device):
        for name in cfg.methods:
            if not _NAME.match(name) or not name.strip("."):  # "." and ".." would name the run folder or its parent
                raise InputError(f"'methods' key {name!r} must be a folder-safe name (letters, digits, _ . -, not only "
                                 "dots)")
        data = specs.load_data(cfg.data, cfg.seed)
        built = {}
        for name, s in cfg.methods.items():
            seed_everything(cfg.seed)  # every method starts from the same random stream
            where = f"methods.{name}.model.options" if s.model is not None else "model.options"
            model = specs.build_model(s.model or cfg.model, data.in_shape, data.num_classes, where)
            built[name] = model, specs.build_method(s.method, s.method_options, model, data.in_shape,
                                              f"methods.{name}.method_options")
        return data, built

    def execute(self, cfg, built, ctx: Context) -> Results:
        data, built = built
        score, y = cfg.eval.policy, data.test.y
        rows, curves, budgets, hits, info = [], [], [], {}, {}
        ref_full = None
        for name, (model, loss) in built.items():
            seed_everything(cfg.seed)
            state = specs.train(model, loss, data.train, cfg.train, cfg.seed, ctx.device,
                                ctx.out / name / "checkpoint.pt", ctx.progress)
            e = evaluation.evaluate_exits(model, data, name, **cfg.eval.options())
            ref_full = ref_full or e.costs.full
            curve, geo = evaluation.budget_sweep(e, y, score, name, full=ref_full)
            cum = e.costs.cumulative
            n = cfg.ga.curve_points
            grid = [cum[0] + (cum[-1] - cum[0]) * i / max(n - 1, 1) for i in range(n)]
            ga = [{"group": f"{name} (GA)", "budget_fraction": b["budget_fraction"],
                   **_ga_point(e, data, b["budget_mflops"] * 1e6, score, cfg.ga, cfg.seed)}
                  for b in geo if b["accuracy"] is not None]
            curves += curve + [{"group": f"{name} (GA)", "budget_mflops": b / 1e6,
                                **_ga_point(e, data, b, score, cfg.ga, cfg.seed)} for b in grid]
            rows += e.rows
            budgets += geo + ga
            hits[name] = {"final exit": evaluation.correct(e.test[-1], y)} | {
                f"{100 * b['budget_fraction']:.0f}% budget": evaluation.correct(pick_exits(e.test, ThresholdPolicy(
                    b["thresholds"], score))[1], y) for b in geo if b["thresholds"] is not None}
            m = cfg.methods[name].model or cfg.model
            info[name] = {"method": cfg.methods[name].method, "method_options": cfg.methods[name].method_options,
                          "backbone": m.backbone, "full_mflops": e.costs.full / 1e6,
                          "train_seconds": training_seconds(state.history),
                          "params": sum(p.numel() for p in model.parameters()),
                          "final_train_loss": state.history[-1]["loss"] if state.history else None}
        ref = next(iter(built))
        comps = stats.holm([stats.compare(n, ref, at, h, hits[ref][at]) for n, hs in hits.items() if n != ref
                               for at, h in hs.items() if at in hits[ref]])
        extra = {"reference": ref, "reference_full_mflops": ref_full / 1e6, "methods": info,
                 "splits": {n: len(data.split(n)) for n in ("train", "val", "calib", "test")}}
        return Results(cfg.data.name, rows, curves, budgets, comps, extra)

    def sections(self, cfg, res):
        e = res.extra
        table = report.markdown_table([{"name": f"`{n}`", **r, "what": f"{r['method']} {r['method_options'] or ''}"}
                                for n, r in e["methods"].items()],
                               [("name", "method", ""), ("what", "loss", ""), ("backbone", "backbone", ""),
                                ("full_mflops", "static MFLOPs", ".3f"), ("params", "parameters", "d"),
                                ("train_seconds", "train s", ".0f")])
        return [("Anytime prediction: test accuracy % of every exit (cumulative MFLOPs)",
                 f"{report.exit_table(res.rows)}\n\n![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("Budgeted batch classification: test accuracy % (test MFLOPs)",
                 f"Budgets are shares of the reference `{e['reference']}`'s static network "
                 f"({e['reference_full_mflops']:.3f} MFLOPs). Thresholds fitted on `val`: MSDNet's geometric family, "
                 "or SCAN's genetic algorithm in the `(GA)` lines (it stops spending once val accuracy plateaus). "
                 f"\"—\": below the first exit.\n\n{report.budget_table(res.budgets, e['reference_full_mflops'])}"),
                ("Calibration: test ECE % of every exit after temperature scaling",
                 report.exit_table(res.rows, "ece_calibrated", digits=1)),
                (f"Against the reference `{e['reference']}` (budgets with geometric thresholds)",
                 report.comparison_lines(res.comparisons, f"the {e['splits']['test']} test samples")),
                ("Training", table)]
