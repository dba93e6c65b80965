"""Task kind ``labelscarce``: exits trained with few labels, unlabeled data used by a method's loss.

For each number of labels per class and each seed, the training split keeps the labels of that many
samples per class (seeded) and marks the rest unlabeled (``-1``); every listed method (a METHODS name
with options: ``ce`` uses only the labeled samples, ``consistency`` and semi-supervised
self-distillation also use the unlabeled ones) trains the same network from the same initialisation.
Per-exit test accuracy is reported as mean ± std over seeds. Nothing is tuned on test.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

import metadyn.consistency  # noqa: F401  (registers the "consistency" method)
from metadyn.config import TaskConfig, checked_call
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits
from metadyn.core.policies import anytime_accuracy
from metadyn.core.train import fit, pick_device, seed_everything
from metadyn.errors import InputError, NonFiniteLossError
from metadyn.registry import BACKBONES, TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.anytime import DataSpec, ModelSpec, TrainSpec, build_method, method_callbacks
from metadyn.runner.report import markdown_table


@dataclass
class MethodSpec:
    name: str = "ce"
    label: str = ""  # how the report names it (default: name + options)
    options: dict = field(default_factory=dict)


@dataclass
class LabelScarceConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    labels_per_class: list[int] = field(default_factory=lambda: [1, 5, 10, 100])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[MethodSpec] = field(default_factory=lambda: [MethodSpec("ce")])


def keep_labels(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """A copy of ``y`` where all but ``per_class`` samples of each class (seeded choice) are ``-1``."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(y, -1)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        keep = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        out[keep] = c
    return out


def method_label(m: MethodSpec) -> str:
    if m.label:
        return m.label
    opts = ", ".join(f"{k}={v}" for k, v in sorted(m.options.items()))
    return f"{m.name}({opts})" if opts else m.name


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(cfg: LabelScarceConfig, out: Path, prepare, progress: bool = True) -> dict:
    from metadyn.data import load_classification
    device = pick_device(cfg.device)
    cfg.train.check("train")
    if not cfg.labels_per_class or any(k < 1 for k in cfg.labels_per_class):
        raise InputError(f"labels_per_class must be positive integers, got {cfg.labels_per_class}")
    if not cfg.seeds or not cfg.methods:
        raise InputError("seeds and methods must not be empty")
    labels = [method_label(m) for m in cfg.methods]
    if len(set(labels)) != len(labels):
        raise InputError(f"two methods share a label: {labels}; give them distinct 'label's")
    data = load_classification(cfg.data.name, root=cfg.data.root, seed=cfg.seed, val_fraction=cfg.data.val_fraction,
                               calib_fraction=cfg.data.calib_fraction, test_fraction=cfg.data.test_fraction,
                               **cfg.data.options)

    def make_model():
        return checked_call(BACKBONES.get(cfg.model.backbone), cfg.model.options, "model.options",
                            in_shape=data.in_shape, num_classes=data.num_classes)

    probe = make_model()
    for m in cfg.methods:  # validate every method and its options before any training
        build_method(m.name, m.options, probe, data.in_shape)
        if m.name == "consistency" and m.options.get("kind") == "simsiam" and cfg.train.augment == "none":
            raise InputError("consistency kind 'simsiam' compares two augmented views: set train.augment")
    prepare()

    costs = exit_costs(probe, data.in_shape).mflops()
    t = cfg.train
    acc: dict[tuple[int, str], list[list[float]]] = {}
    for k in cfg.labels_per_class:
        for seed in cfg.seeds:
            y = keep_labels(data.train.y, k, seed)
            for j, (m, label) in enumerate(zip(cfg.methods, labels)):
                seed_everything(seed)
                model = make_model()
                loss = build_method(m.name, m.options, model, data.in_shape)
                try:
                    fit(model, (data.train.x, y), loss=loss, **t.fit_kwargs(), seed=seed, device=device,
                        progress=progress, callbacks=method_callbacks(loss, model),
                        checkpoint=out / "checkpoints" / f"labels{k}_seed{seed}_method{j}.pt")  # resumable
                except NonFiniteLossError:  # one diverged training is a result, not the end of the experiment
                    acc.setdefault((k, label), []).append(None)
                    continue
                logits = collect_logits(model, data.test.x)
                acc.setdefault((k, label), []).append(anytime_accuracy(logits, data.test.y))

    rows = []
    for (k, label), runs in acc.items():
        done = [r for r in runs if r is not None]
        per_exit = [_mean_std([r[i] for r in done]) if done else (float("nan"), float("nan"))
                    for i in range(len(costs))]
        rows.append({"labels_per_class": k, "method": label, "accuracy_mean": [m for m, _ in per_exit],
                     "accuracy_std": [s for _, s in per_exit], "runs": runs, "diverged": len(runs) - len(done)})
    first = rows[0]
    metrics = {
        "dataset": cfg.data.name, "seed": cfg.seed, "device": str(device),
        "exits": [{"exit": i, "accuracy": first["accuracy_mean"][i], "mflops": costs[i]} for i in range(len(costs))],
        "curve": [{"mflops": costs[i], "accuracy": first["accuracy_mean"][i]} for i in range(len(costs))],
        "extra": {"results": rows, "mflops": costs, "seeds": cfg.seeds, "labels_per_class": cfg.labels_per_class},
    }
    plot_label_curves(out / "accuracy_vs_labels.png", rows, len(costs))
    counts = torch.unique(data.train.y, return_counts=True)[1]
    atomic_write_text(out / "report.md", report(cfg, rows, costs, (int(counts.min()), int(counts.max()))))
    return metrics


def report(cfg: LabelScarceConfig, rows: list[dict], costs: list[float], per_class: tuple[int, int]) -> str:
    """The results tables, one per number of labels kept; ``per_class`` is the (fewest, most) train samples
    of a class, so that a heading can say when a class keeps all its labels."""
    lo, hi = per_class
    have = f"{lo}" if lo == hi else f"{lo}–{hi}"
    cols = [("method", "method", "")] + [(f"e{i}", f"exit {i} ({costs[i]:.2f} MF)", "") for i in range(len(costs))]
    parts = [f"# {cfg.task}\n",
             f"`{cfg.model.backbone}` {cfg.model.options or ''} on `{cfg.data.name}`, {cfg.train.epochs} epochs, "
             f"seeds {cfg.seeds}. Test accuracy (%) per exit, mean ± std over seeds; the labels kept per class "
             "come from the train split, the rest of it is used unlabeled by the methods that can. A training "
             "whose loss became NaN is left out of the mean and counted as diverged.\n"]
    for k in cfg.labels_per_class:
        sub = [r for r in rows if r["labels_per_class"] == k]
        table = [{"method": r["method"] + (f" (diverged: {r['diverged']} of {len(r['runs'])} seeds)"
                                           if r["diverged"] else ""),
                  **{f"e{i}": f"{100 * m:.1f} ± {100 * s:.1f}"
                     for i, (m, s) in enumerate(zip(r["accuracy_mean"], r["accuracy_std"]))}}
                 for r in sub]
        note = f" (all: the train split has {have} per class)" if k >= hi else \
            f" (the train split has {have} per class)" if k >= lo else ""
        parts.append(f"## {k} label{'s' if k > 1 else ''} per class{note}\n\n{markdown_table(table, cols)}\n")
    parts.append("![accuracy vs labels](accuracy_vs_labels.png)\n")
    return "\n".join(parts)


def plot_label_curves(path: Path, rows: list[dict], num_exits: int) -> None:
    """Accuracy of the first and the final exit vs labels per class, one line per method."""
    from metadyn.runner.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, e, title in ((axes[0], 0, "first exit"), (axes[1], num_exits - 1, "final exit")):
        for m in methods:
            pts = sorted((r["labels_per_class"], r["accuracy_mean"][e], r["accuracy_std"][e]) for r in rows
                         if r["method"] == m)
            ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                        marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("labels per class")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TASK_KINDS.register("labelscarce", TaskKind(LabelScarceConfig, run))
