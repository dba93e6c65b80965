"""Task kind ``anytime``: train a multi-exit network, calibrate it, fit exit thresholds and evaluate.

Protocol (leak-free): the network is trained on ``train``; per-exit temperatures are fitted on ``calib``;
exit thresholds (MSDNet's budgeted batch classification, Huang et al., ICLR 2018) are fitted on ``val`` on
raw scores — per-exit quantiles that a temperature barely reorders, while a small temperature can saturate
the softmax into ties; every reported number is measured on ``test``, which is used for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metadyn.config import TaskConfig
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind
from metadyn.runner.evaluate import budget_sweep, evaluate_exits, operating_point, reliability_of
from metadyn.runner.report import (
    FLOPS_NOTE,
    budget_table,
    exit_table,
    markdown_table,
    plot_bars,
    plot_groups,
    plot_reliability,
    settings_line,
)
from metadyn.runner.specs import DataSpec, EvalSpec, ModelSpec, TrainSpec, build_method, build_model, load_data, train


@dataclass
class AnytimeConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


@TASK_KINDS.register("anytime")
class Anytime(TaskKind):
    config = AnytimeConfig

    def build(self, cfg, device):
        data = load_data(cfg.data, cfg.seed)
        model = build_model(cfg.model, data.in_shape, data.num_classes)
        return data, model, build_method(cfg.train.method, cfg.train.method_options, model, data.in_shape)

    def execute(self, cfg, built, ctx: Context) -> Results:
        data, model, loss = built
        state = train(model, loss, data.train, cfg.train, cfg.seed, ctx.device, ctx.out / "checkpoint.pt",
                      ctx.progress)
        e = evaluate_exits(model, data, cfg.eval)
        curve, budgets = budget_sweep(e, data.test.y, cfg.eval.policy, "model")
        cum = e.costs.cumulative
        op = operating_point(model, e.val, e.test, data.test.x, data.test.y, cum, max(0.5 * e.costs.full, cum[0]),
                             cfg.eval.policy, ctx.device)
        extra = {"full_mflops": e.costs.full / 1e6, "operating_point": {"budget_fraction": 0.5, **op},
                 "splits": {n: len(data.split(n)) for n in ("train", "val", "calib", "test")},
                 "history": state.history, "reliability": reliability_of(e, data.test.y, cfg.eval.ece_bins)}
        return Results(cfg.data.name, e.rows, curve, budgets, extra=extra)

    def plots(self, cfg, res, out):
        plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test)")
        plot_bars(out / "exit_histogram.png", res.extra["operating_point"]["exit_fractions"], "exit",
                  "samples leaving (%)", "exits at 50% of the static network's FLOPs (test)")
        plot_reliability(out / "reliability.png", res.extra["reliability"]["before"], res.extra["reliability"]["after"])

    def report(self, cfg, res, m):
        e, op = res.extra, res.extra["operating_point"]
        calib = markdown_table([{**r, "acc": 100 * r["accuracy"]} for r in res.rows],
                               [("exit", "exit", ""), ("acc", "test acc. (%)", ".2f"), ("ece", "ECE", ".3f"),
                                ("ece_calibrated", "ECE (T-scaled)", ".3f"), ("temperature", "T", ".2f")])
        return f"""# {cfg.task}

Backbone `{cfg.model.backbone}` {cfg.model.options or ''} trained with `{cfg.train.method}` for {cfg.train.epochs}
epochs on `{cfg.data.name}` (splits: {e['splits']}). {settings_line(m)}
Temperatures are fitted on `calib`, exit thresholds on `val` (raw {cfg.eval.policy} scores, as in MSDNet); every
number below is on `test`. {FLOPS_NOTE} The static network (no early heads) costs {e['full_mflops']:.3f} MFLOPs.

## Exits (anytime prediction): test accuracy % (cumulative MFLOPs)

{exit_table(res.rows)}

## Calibration

{calib}

## Budgeted batch classification: test accuracy % (test MFLOPs) at a share of the static FLOPs

{budget_table(res.budgets, e['full_mflops'])}

At 50% of the static network's FLOPs, dynamic inference with batch compaction reached
{100 * op['accuracy']:.2f}% test accuracy at {op['mflops']:.3f} MFLOPs; it disagreed with picking from the full
forward on {op['mismatches']} samples (predictions or exits).

![accuracy vs MFLOPs](accuracy_vs_mflops.png)
![exit histogram](exit_histogram.png)
![reliability](reliability.png)
"""
