"""Task kind ``labelscarce``: exits trained with few labels, the unlabeled rest used by a method's loss.

For each number of labels per class and each seed, the train split keeps the labels of that many samples per
class (seeded) and marks the rest unlabeled (``-1``); every method (a METHODS loss: ``ce`` uses only the
labeled samples, ``consistency`` and semi-supervised self-distillation also the unlabeled ones) trains the
same network from the same initialisation. Per-exit test accuracy is mean ± std over seeds; every method is
compared with the first one, paired by seed. Nothing is tuned on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metadyn.config import TaskConfig, spec
from metadyn.core.train import seed_everything
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind
from metadyn.runner.evaluate import aggregate, compare, evaluate_exits, holm, sweep
from metadyn.runner.report import comparison_lines, exit_table, plot_groups, settings_line
from metadyn.runner.specs import (
    DataSpec,
    EvalSpec,
    FitSpec,
    MethodSpec,
    ModelSpec,
    build_method,
    build_model,
    load_data,
    train,
)


@dataclass
class LabelScarceConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: FitSpec = field(default_factory=FitSpec)
    eval: EvalSpec = field(default_factory=lambda: EvalSpec(calibrate=False))
    labels_per_class: list[int] = spec(factory=lambda: [1, 5, 10, 100], ge=1, nonempty=True, distinct=True)
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], ge=0, nonempty=True, distinct=True)
    methods: dict[str, MethodSpec] = spec(factory=lambda: {"CE only": MethodSpec()}, nonempty=True)


def keep_labels(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """A copy of ``y`` where all but ``per_class`` samples of each class (seeded choice) are ``-1``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(y, -1)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        out[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = c
    return out


@TASK_KINDS.register("labelscarce")
class LabelScarce(TaskKind):
    config = LabelScarceConfig

    def build(self, cfg, device):
        data = load_data(cfg.data, cfg.seed)
        for name, m in cfg.methods.items():  # validate every method and its options before any training
            probe = build_model(m.model or cfg.model, data.in_shape, data.num_classes)
            build_method(m.method, m.method_options, probe, data.in_shape, f"methods.{name}.method_options")
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
            model = build_model(m.model or cfg.model, data.in_shape, data.num_classes)
            loss = build_method(m.method, m.method_options, model, data.in_shape)
            train(model, loss, (data.train.x, keep_labels(data.train.y, k, seed)), cfg.train, seed, ctx.device,
                  ctx.out / "checkpoints" / f"labels{k}_seed{seed}_method{names.index(name)}.pt", ctx.progress)
            return evaluate_exits(model, data, cfg.eval, f"{name}, {k} labels").rows

        runs = sweep(variants, cfg.seeds, train_one)
        rows, comps = [], []
        for k, name in variants:
            rows += [{**r, "labels_per_class": k, "method": name}
                     for r in aggregate([runs[(k, name), s] for s in cfg.seeds], group=f"{name}, {k} labels")]
            ref = names[0]
            ok = [s for s in cfg.seeds if runs[(k, name), s] and runs[(k, ref), s]]
            if name != ref and ok:
                last = len(runs[(k, name), ok[0]]) - 1
                comps += [compare(f"{name}, {k} labels", f"{ref}, {k} labels", f"exit {i}",
                                  [runs[(k, name), s][i]["accuracy"] for s in ok],
                                  [runs[(k, ref), s][i]["accuracy"] for s in ok]) for i in sorted({0, last})]
        counts = torch.unique(data.train.y, return_counts=True)[1]
        extra = {"train_per_class": [int(counts.min()), int(counts.max())], "seeds": cfg.seeds,
                 "labels_per_class": cfg.labels_per_class}
        return Results(cfg.data.name, rows, comparisons=holm(comps), extra=extra)

    def plots(self, cfg, res, out):
        last = max(r["exit"] for r in res.rows)
        curves = [{"group": f"{r['method']} (exit {r['exit']})", "labels_per_class": r["labels_per_class"],
                   "accuracy": r["accuracy"]} for r in res.rows if r["exit"] in (0, last) and r["accuracy"] is not None]
        plot_groups(out / "accuracy_vs_labels.png", [], curves, f"{cfg.task} (test, mean over seeds)",
                    x="labels_per_class", xlabel="labels per class", logx=True)

    def report(self, cfg, res, m):
        lo, hi = res.extra["train_per_class"]
        have = f"{lo}" if lo == hi else f"{lo}–{hi}"
        parts = [f"# {cfg.task}\n",
                 f"`{cfg.model.backbone}` {cfg.model.options or ''} on `{cfg.data.name}`, {cfg.train.epochs} epochs, "
                 f"seeds {cfg.seeds}. {settings_line(m)} Test accuracy % per exit (MFLOPs), mean ± std over seeds; "
                 "the labels kept per class come from the train split, the rest of it is used unlabeled by the "
                 "methods that can. A training whose loss became NaN is left out of the mean and counted as "
                 "diverged.\n"]
        for k in cfg.labels_per_class:
            note = f" (all: the train split has {have} per class)" if k >= hi else \
                f" (the train split has {have} per class)" if k >= lo else ""
            sub = [r for r in res.rows if r["labels_per_class"] == k]
            parts.append(f"## {k} label{'s' if k > 1 else ''} per class{note}\n\n{exit_table(sub, digits=1)}\n")
        parts.append(f"## Against `{next(iter(cfg.methods))}`\n\n{comparison_lines(res.comparisons, 'seeds')}\n")
        parts.append("![accuracy vs labels](accuracy_vs_labels.png)\n")
        return "\n".join(parts)
