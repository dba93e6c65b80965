"""Task kind ``labelscarce``: exits trained with few labels, the unlabeled rest used by a method's loss.

For each number of labels per class and each seed, the train split keeps the labels of that many samples per
class (seeded) and marks the rest unlabeled (``-1``); every method (a METHODS loss: ``ce`` uses only the
labeled samples, ``consistency`` and semi-supervised self-distillation also the unlabeled ones) trains the
same network from the same initialisation. Per-exit test accuracy is mean ± std over all seeds; every method is
compared with the first one, paired by seed. Nothing is tuned on test. A training whose loss became NaN counts
with what its network scores as it stands (a sample whose output is not finite is misclassified) — in the mean,
the spread and the paired comparisons — and the method's line says how many of its seeds diverged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metadyn.config import TaskConfig, spec
from metadyn.core import evaluation, plots
from metadyn.core.train import seed_everything
from metadyn.data import keep_labels
from metadyn.errors import InputError, NonFiniteLossError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, evaluate, report, specs


@dataclass
class LabelScarceConfig(TaskConfig):
    data: specs.DataSpec = field(default_factory=specs.DataSpec)
    model: specs.ModelSpec = field(default_factory=specs.ModelSpec)
    train: specs.FitSpec = field(default_factory=specs.FitSpec)
    eval: specs.EvalSpec = field(default_factory=lambda: specs.EvalSpec(calibrate=False))
    labels_per_class: list[int] = spec(factory=lambda: [1, 5, 10, 100], ge=1, nonempty=True, distinct=True)
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], ge=0, nonempty=True, distinct=True)
    methods: dict[str, specs.MethodSpec] = spec(factory=lambda: {"CE only": specs.MethodSpec()}, nonempty=True)


@TASK_KINDS.register("labelscarce")
class LabelScarce(TaskKind):
    config = LabelScarceConfig

    def build(self, cfg, device):
        data = specs.load_data(cfg.data, cfg.seed)
        for name, m in cfg.methods.items():  # validate every method and its options before any training
            probe = specs.build_model(m.model or cfg.model, data.in_shape, data.num_classes)
            specs.build_method(m.method, m.method_options, probe, data.in_shape, f"methods.{name}.method_options")
            if m.method == "consistency" and m.method_options.get("kind") == "simsiam" and cfg.train.augment == "none":
                raise InputError("consistency kind 'simsiam' compares two augmented views: set train.augment")
        return data

    def execute(self, cfg, data, ctx: Context) -> Results:
        names = list(cfg.methods)
        variants = [(k, n) for k in cfg.labels_per_class for n in names]

        def train_one(variant, seed):
            k, name = variant
            m = cfg.methods[name]
            seed_everything(seed)
            model = specs.build_model(m.model or cfg.model, data.in_shape, data.num_classes)
            loss = specs.build_method(m.method, m.method_options, model, data.in_shape)
            group = f"{name}, {k} labels"
            try:
                specs.train(model, loss, (data.train.x, keep_labels(data.train.y, k, seed)), cfg.train, seed,
                            ctx.device, ctx.out / "checkpoints" / f"labels{k}_seed{seed}_method{names.index(name)}.pt",
                            ctx.progress)
            except NonFiniteLossError:  # scored as it stands, counted in the mean, marked
                return {"rows": evaluation.diverged_rows(model, data, group, batch_size=cfg.eval.batch_size)}
            return {"rows": evaluation.evaluate_exits(model, data, group, **cfg.eval.options()).rows}

        runs = evaluate.sweep(variants, cfg.seeds, train_one)

        def label(v):
            return f"{v[1]}, {v[0]} labels"

        rows = [{**r, "labels_per_class": v[0], "method": v[1]} for v in variants
                for r in evaluate.seed_rows(runs, [v], cfg.seeds, label=label)]
        last = max(r["exit"] for r in rows)
        comps = evaluate.seed_pairs(runs, [((k, n), (k, names[0])) for k, n in variants if n != names[0]], cfg.seeds,
                           sorted({0, last}), label)
        counts = torch.unique(data.train.y, return_counts=True)[1]
        extra = {"train_per_class": [int(counts.min()), int(counts.max())], "seeds": cfg.seeds,
                 "labels_per_class": cfg.labels_per_class}
        return Results(cfg.data.name, rows, comparisons=comps, extra=extra)

    def plots(self, cfg, res, out):
        last = max(r["exit"] for r in res.rows)
        curves = [{"group": f"{r['method']} (exit {r['exit']})", "labels_per_class": r["labels_per_class"],
                   "accuracy": r["accuracy"]} for r in res.rows if r["exit"] in (0, last) and r["accuracy"] is not None]
        plots.plot_groups(out / "accuracy_vs_labels.png", [], curves, f"{cfg.task} (test, mean over seeds)",
                    x="labels_per_class", xlabel="labels per class", logx=True)

    def sections(self, cfg, res):
        lo, hi = res.extra["train_per_class"]
        have = f"{lo}" if lo == hi else f"{lo}–{hi}"
        out = []
        for k in cfg.labels_per_class:
            note = f" (all: the train split has {have} per class)" if k >= hi else \
                f" (the train split has {have} per class)" if k >= lo else ""
            out.append((f"{k} label{'s' if k > 1 else ''} per class{note}",
                        report.exit_table([r for r in res.rows if r["labels_per_class"] == k], digits=1)))
        return out + [(f"Against `{next(iter(cfg.methods))}`", report.comparison_lines(res.comparisons, "seeds")
                       + "\n\n![accuracy vs labels](accuracy_vs_labels.png)")]
