"""Task kind ``anytime``: train a multi-exit network, calibrate it, fit exit thresholds and evaluate.

Protocol (leak-free): the network is trained on ``train``; per-exit temperatures are fitted on ``calib``;
exit thresholds (MSDNet's budgeted batch classification, Huang et al., ICLR 2018) are fitted on ``val`` on
raw scores — per-exit quantiles that a temperature barely reorders, while a small temperature can saturate
the softmax into ties; every reported number is measured on ``test``, which is used for nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metadyn.config import TaskConfig
from metadyn.core import evaluation, plots
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, report, specs


@dataclass
class AnytimeConfig(TaskConfig):
    data: specs.DataSpec = field(default_factory=specs.DataSpec)
    model: specs.ModelSpec = field(default_factory=specs.ModelSpec)
    train: specs.TrainSpec = field(default_factory=specs.TrainSpec)
    eval: specs.EvalSpec = field(default_factory=specs.EvalSpec)


@TASK_KINDS.register("anytime")
class Anytime(TaskKind):
    config = AnytimeConfig

    def build(self, cfg, device):
        data = specs.load_data(cfg.data, cfg.seed)
        model = specs.build_model(cfg.model, data.in_shape, data.num_classes)
        return data, model, specs.build_method(cfg.train.method, cfg.train.method_options, model, data.in_shape)

    def execute(self, cfg, built, ctx: Context) -> Results:
        data, model, loss = built
        state = specs.train(model, loss, data.train, cfg.train, cfg.seed, ctx.device, ctx.out / "checkpoint.pt",
                      ctx.progress)
        e = evaluation.evaluate_exits(model, data, **cfg.eval.options())
        curve, budgets = evaluation.budget_sweep(e, data.test.y, cfg.eval.policy, "model")
        cum = e.costs.cumulative
        op = evaluation.operating_point(model, e.val, e.test, data.test.x, data.test.y, cum,
                                      max(0.5 * e.costs.full, cum[0]), cfg.eval.policy, ctx.device)
        extra = {"full_mflops": e.costs.full / 1e6, "operating_point": {"budget_fraction": 0.5, **op},
                 "splits": {n: len(data.split(n)) for n in ("train", "val", "calib", "test")},
                 "history": state.history, "reliability": evaluation.reliability_of(e, data.test.y, cfg.eval.ece_bins)}
        return Results(cfg.data.name, e.rows, curve, budgets, extra=extra)

    def plots(self, cfg, res, out):
        plots.plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test)")
        plots.plot_bars(out / "exit_histogram.png", res.extra["operating_point"]["exit_fractions"], "exit",
                  "samples leaving (%)", "exits at 50% of the static network's FLOPs (test)")
        rel = res.extra["reliability"]
        plots.plot_reliability(out / "reliability.png", rel["before"], rel["after"])

    def sections(self, cfg, res):
        e, op = res.extra, res.extra["operating_point"]
        calib = report.markdown_table([{**r, "acc": 100 * r["accuracy"]} for r in res.rows],
                               [("exit", "exit", ""), ("acc", "test acc. (%)", ".2f"), ("ece", "ECE", ".3f"),
                                ("ece_calibrated", "ECE (T-scaled)", ".3f"), ("temperature", "T", ".2f")])
        return [("Exits (anytime prediction): test accuracy % (cumulative MFLOPs)",
                 f"{report.exit_table(res.rows)}\n\nThe static network (no early heads) costs "
                 f"{e['full_mflops']:.3f} MFLOPs; splits: {e['splits']}.\n\n"
                 "![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("Calibration: temperatures fitted on calib", f"{calib}\n\n![reliability](reliability.png)"),
                ("Budgeted batch classification: test accuracy % (test MFLOPs) at a share of the static FLOPs",
                 f"{report.budget_table(res.budgets, e['full_mflops'])}\n\nAt 50% of the static network's FLOPs, "
                 f"dynamic inference with batch compaction reached {100 * op['accuracy']:.2f}% at "
                 f"{op['mflops']:.3f} MFLOPs; it disagreed with picking from the full forward on "
                 f"{op['mismatches']} samples (predictions or exits).\n\n![exit histogram](exit_histogram.png)")]
