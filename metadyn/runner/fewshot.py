"""Task kind ``fewshot``: meta-learn a multi-exit network with each exit as a task, against baselines.

Protocol (leak-free): meta-training episodes come from the meta-train classes; after every epoch the
model is scored on fixed episodes of the meta-val classes and the best epoch is kept (model
selection); the early-exit thresholds of the anytime curve are fitted on meta-val episodes too. The
meta-test classes give only the final numbers: accuracy +- 95% CI per exit over ``test_episodes``.

Methods in one report: ``exits`` (this package's method: each exit its own inner loop over its path),
and the baselines ``final_exit`` (MAML on the final exit, then the early heads meta-trained with the
trunk frozen, ANIL-style), ``joint`` (multi-exit MAML with one shared inner loop for all exits) and
``protonet`` (a prototypical-network classifier at every exit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from metadyn.config import TaskConfig, checked_call
from metadyn.core.flops import exit_costs
from metadyn.core.policies import SCORES, budgeted_curve
from metadyn.core.train import Callback, TrainState, fit, load_checkpoint, pick_device, save_checkpoint, seed_everything
from metadyn.errors import InputError
from metadyn.registry import BACKBONES, TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.anytime import ModelSpec
from metadyn.runner.report import finish_curve_plot, markdown_table

BASELINES = ("final_exit", "joint", "protonet", "exits_consistency")


@dataclass
class FewShotDataSpec:
    name: str = "glyphs"
    root: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class EpisodeSpec:
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 15


@dataclass
class MetaSpec:
    algorithm: str = "maml"
    inner_lr: float | list[float] = 0.4
    inner_steps: int | list[int] = 1
    eval_inner_steps: int | None = None  # default: the training steps
    exit_weights: list[float] | None = None
    share_trunk: bool = False
    # the exits_consistency variant: options of metadyn.consistency's loss (kind, weight, hidden)
    consistency: dict = field(default_factory=lambda: {"kind": "byol", "weight": 0.1})


@dataclass
class MetaTrainSpec:
    epochs: int = 10
    iterations: int = 25  # meta-batches per epoch
    meta_batch: int = 8
    lr: float = 0.001
    optimizer: str = "adam"
    head_epochs: int = 3  # final_exit baseline: epochs for the early heads afterwards


@dataclass
class FewShotEvalSpec:
    val_episodes: int = 100
    test_episodes: int = 600
    policy: str = "confidence"
    baselines: list[str] = field(default_factory=lambda: ["final_exit", "joint", "protonet"])


@dataclass
class FewShotConfig(TaskConfig):
    kind: str = "fewshot"
    data: FewShotDataSpec = field(default_factory=FewShotDataSpec)
    episodes: EpisodeSpec = field(default_factory=EpisodeSpec)
    model: ModelSpec = field(default_factory=lambda: ModelSpec("conv4", {"width": 32, "norm": "batch_episodic"}))
    meta: MetaSpec = field(default_factory=MetaSpec)
    train: MetaTrainSpec = field(default_factory=MetaTrainSpec)
    eval: FewShotEvalSpec = field(default_factory=FewShotEvalSpec)


class _Stacked:
    """Predictions of several learners over disjoint exits, in exit order."""

    def __init__(self, *learners):
        self.learners = learners

    def predict(self, sx, sy, qx, steps=None):
        return [z for lrn in self.learners for z in lrn.predict(sx, sy, qx, steps)]


class BestOnVal(Callback):
    """After every epoch: mean query accuracy over exits on fixed meta-val episodes; the best epoch's
    weights are written to ``path`` (and survive a resume)."""

    def __init__(self, predictor, module, sampler, episodes: int, steps, device, path: Path):
        self.predictor, self.module, self.sampler = predictor, module, sampler
        self.episodes, self.steps, self.device, self.path = episodes, steps, device, path
        self.best = -math.inf

    def on_train_start(self, state: TrainState) -> None:
        self.best = max((h["val_score"] for h in state.history), default=-math.inf)

    def on_epoch_end(self, state: TrainState) -> None:
        from metadyn.meta.evaluate import evaluate_episodes

        acc = evaluate_episodes(self.predictor, self.sampler, self.episodes, steps=self.steps,
                                device=self.device).accuracy.mean(0)
        score = float(acc.mean())
        state.history[-1].update(val_accuracy=acc.tolist(), val_score=score,
                                 train_query_accuracy=self.module.last_stats.get("query_accuracy"))
        if score > self.best:
            self.best = score
            save_checkpoint({"model": self.module.state_dict(), "epoch": state.epoch + 1, "val_score": score},
                            self.path)


def build(cfg: FewShotConfig):
    """Validate and build pools, samplers, the network builder and the learners (no side effects)."""
    from metadyn.data import EpisodeSampler
    from metadyn.meta import MetaLearner
    from metadyn.meta.data import fewshot_pool

    for key in ("epochs", "iterations", "meta_batch", "head_epochs"):
        if getattr(cfg.train, key) < 1:
            raise InputError(f"train.{key} must be at least 1, got {getattr(cfg.train, key)}")
    for key in ("val_episodes", "test_episodes"):
        if getattr(cfg.eval, key) < 2:
            raise InputError(f"eval.{key} must be at least 2, got {getattr(cfg.eval, key)}")
    if not (cfg.train.lr > 0 and math.isfinite(cfg.train.lr)):
        raise InputError(f"train.lr must be a positive number, got {cfg.train.lr}")
    if cfg.eval.policy not in SCORES:
        raise InputError(f"unknown eval.policy {cfg.eval.policy!r}; choose from: {', '.join(SCORES)}")
    unknown = [b for b in cfg.eval.baselines if b not in BASELINES]
    if unknown:
        raise InputError(f"unknown eval.baselines {unknown}; choose from: {', '.join(BASELINES)}")
    if cfg.eval.baselines.count("final_exit") and cfg.meta.algorithm == "anil":
        raise InputError("the final_exit baseline adapts the final exit with MAML; use meta.algorithm maml/fomaml")
    ep = cfg.episodes
    pools = {s: fewshot_pool(cfg.data.name, s, cfg.data.root, **cfg.data.options) for s in ("train", "val", "test")}
    samplers = {s: EpisodeSampler(p, ep.n_way, ep.k_shot, ep.n_query, seed=cfg.seed + i)
                for i, (s, p) in enumerate(pools.items())}
    in_shape = tuple(pools["train"].x.shape[1:])

    def make_net():
        return checked_call(BACKBONES.get(cfg.model.backbone), cfg.model.options, "model.options",
                            in_shape=in_shape, num_classes=ep.n_way)

    m = cfg.meta

    def make_learner(net, **over):
        opts = dict(algorithm=m.algorithm, inner_lr=m.inner_lr, inner_steps=m.inner_steps,
                    exit_weights=m.exit_weights, share_trunk=m.share_trunk)
        opts.update(over)
        return MetaLearner(net, **opts)

    make_learner(make_net())  # validates the meta options and the network's normalisation
    if "exits_consistency" in cfg.eval.baselines:
        if m.consistency.get("kind", "byol") == "simsiam":
            raise InputError("meta.consistency: kind 'simsiam' needs augmented views; use byol or l2")
        make_consistency(make_net(), in_shape, m.consistency)
    return samplers, in_shape, make_net, make_learner


def make_consistency(net, in_shape, options: dict):
    """The consistency heads of the exits_consistency variant (validated against the options)."""
    from metadyn.consistency.losses import consistency_method

    return checked_call(consistency_method, options, "meta.consistency", model=net, in_shape=in_shape)


def _train(module, predictor, samplers, cfg: FewShotConfig, out: Path, device, progress: bool, epochs: int):
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    sampler = samplers["train"]

    def episodes(epoch: int):
        for i in range(t.iterations):
            batch = sampler.batch((epoch * t.iterations + i) * t.meta_batch, t.meta_batch)
            yield tuple(b.to(device) for b in batch), None

    best = BestOnVal(predictor, module, samplers["val"], cfg.eval.val_episodes, cfg.meta.eval_inner_steps, device,
                     out / "best.pt")
    state = fit(module, episodes, loss=lambda value, _: value, epochs=epochs, lr=t.lr, optimizer=t.optimizer,
                momentum=0.0, weight_decay=0.0, schedule="constant", seed=cfg.seed, device=device,
                callbacks=[best], checkpoint=out / "checkpoint.pt", progress=progress)
    module.load_state_dict(load_checkpoint(out / "best.pt", map_location=device)["model"])
    return state.history


def run(cfg: FewShotConfig, out: Path, prepare, progress: bool = True) -> dict:
    from metadyn.meta.evaluate import anytime_costs, evaluate_episodes
    from metadyn.meta.protonet import ProtoExits

    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    samplers, in_shape, make_net, make_learner = build(cfg)
    prepare()

    methods: dict[str, dict] = {}
    steps = cfg.meta.eval_inner_steps
    main_own = cfg.meta.algorithm != "anil" and not cfg.meta.share_trunk
    plan = ["exits", *cfg.eval.baselines]
    for name in plan:
        seed_everything(cfg.seed)
        net = make_net()
        k = net.num_exits
        if name == "exits":
            learner = make_learner(net)
            history = _train(learner, learner, samplers, cfg, out / name, device, progress, cfg.train.epochs)
            predictor, own = learner, [main_own] * k
        elif name == "exits_consistency":  # the same, plus Idea 3's consistency in the outer loop
            learner = make_learner(net, consistency=make_consistency(net, in_shape, cfg.meta.consistency))
            history = _train(learner, learner, samplers, cfg, out / name, device, progress, cfg.train.epochs)
            predictor, own = learner, [main_own] * k
        elif name == "joint":
            learner = make_learner(net, share_trunk=True)
            history = _train(learner, learner, samplers, cfg, out / name, device, progress, cfg.train.epochs)
            predictor, own = learner, [False] * k
        elif name == "protonet":
            learner = ProtoExits(net)
            history = _train(learner, learner, samplers, cfg, out / name, device, progress, cfg.train.epochs)
            predictor, own = learner, [False] * k
        else:  # final_exit: MAML on the final exit, then the early heads with the trunk frozen
            lr_final = cfg.meta.inner_lr[-1] if isinstance(cfg.meta.inner_lr, list) else cfg.meta.inner_lr
            st_final = cfg.meta.inner_steps[-1] if isinstance(cfg.meta.inner_steps, list) else cfg.meta.inner_steps
            final = make_learner(net, exits=[k - 1], inner_lr=lr_final, inner_steps=st_final, exit_weights=None,
                                 share_trunk=False)
            history = _train(final, final, samplers, cfg, out / name, device, progress, cfg.train.epochs)
            early = [p for n, p in net.named_parameters() if not n.startswith(f"heads.{k - 1}.") and "heads." in n]
            frozen = [p for p in net.parameters() if all(p is not q for q in early)]
            for p in frozen:
                p.requires_grad_(False)
            heads = make_learner(net, algorithm="anil", exits=list(range(k - 1)), inner_lr=lr_final,
                                 inner_steps=st_final, exit_weights=None, share_trunk=False)
            history += _train(heads, heads, samplers, cfg, out / f"{name}_heads", device, progress,
                              cfg.train.head_epochs)
            for p in frozen:
                p.requires_grad_(True)
            predictor, own = _Stacked(heads, final), [False] * (k - 1) + [True]
        net.eval()
        val = evaluate_episodes(predictor, samplers["val"], cfg.eval.val_episodes, steps=steps, device=device)
        test = evaluate_episodes(predictor, samplers["test"], cfg.eval.test_episodes, steps=steps, device=device)
        costs = anytime_costs(exit_costs(net, in_shape), own)
        curve = budgeted_curve(val.logits, test.logits, test.labels, costs, cfg.eval.policy)
        methods[name] = {
            "exits": [{"exit": i, "accuracy": m, "ci95": h, "mflops": costs[i] / 1e6}
                      for i, (m, h) in enumerate(test.mean_ci())],
            "curve": [{"mflops": c["mflops"], "accuracy": c["accuracy"], "p": c["p"]} for c in curve],
            "val_accuracy": val.accuracy.mean(0).tolist(),
            "history": history,
        }

    plot_methods(out / "accuracy_vs_mflops.png", methods, f"{cfg.task} (meta-test)")
    main = methods["exits"]
    metrics = {"dataset": cfg.data.name, "seed": cfg.seed, "device": str(device), "exits": main["exits"],
               "curve": main["curve"],
               "extra": {"methods": methods, "episodes": {"n_way": cfg.episodes.n_way, "k_shot": cfg.episodes.k_shot,
                                                          "n_query": cfg.episodes.n_query,
                                                          "test_episodes": cfg.eval.test_episodes}}}
    atomic_write_text(out / "report.md", report(cfg, metrics))
    return metrics


def plot_methods(path: Path, methods: dict, title: str) -> None:
    """Anytime few-shot curves (confidence thresholds fitted on meta-val) and per-exit points, per method."""
    from metadyn.runner.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, m) in enumerate(methods.items()):
        color = f"C{i}"
        pts = sorted(m["curve"], key=lambda c: c["mflops"])
        ax.plot([c["mflops"] for c in pts], [100 * c["accuracy"] for c in pts], "-", color=color, label=name)
        ax.errorbar([e["mflops"] for e in m["exits"]], [100 * e["accuracy"] for e in m["exits"]],
                    yerr=[100 * e["ci95"] for e in m["exits"]], fmt="o", color=color, ms=4, capsize=2)
    finish_curve_plot(fig, ax, path, title, xlabel="MFLOPs per query (after adaptation)",
                      ylabel="meta-test accuracy (%)")


def report(cfg: FewShotConfig, m: dict) -> str:
    methods = m["extra"]["methods"]
    rows = []
    for e in range(len(m["exits"])):
        row = {"exit": e}
        for name, r in methods.items():
            x = r["exits"][e]
            row[name] = f"{100 * x['accuracy']:.2f} ± {100 * x['ci95']:.2f} ({x['mflops']:.2f})"
        rows.append(row)
    table = markdown_table(rows, [("exit", "exit", ""), *((n, n, "") for n in methods)])
    ep = cfg.episodes
    return f"""# {cfg.task}

{ep.n_way}-way {ep.k_shot}-shot episodes ({ep.n_query} queries per class) on `{cfg.data.name}` with disjoint
meta-train / meta-val / meta-test classes; backbone `{cfg.model.backbone}` {cfg.model.options}; meta-learning
`{cfg.meta.algorithm}` (inner lr {cfg.meta.inner_lr}, {cfg.meta.inner_steps} step(s), evaluated with
{cfg.meta.eval_inner_steps or cfg.meta.inner_steps}); {cfg.train.epochs} epochs of {cfg.train.iterations} meta-batches
of {cfg.train.meta_batch} episodes; seed {cfg.seed}, device `{m['device']}`. The epoch with the best mean meta-val
accuracy is kept. Each cell: meta-test accuracy (%) ± 95% CI over {cfg.eval.test_episodes} episodes (MFLOPs per
query to reach that exit in anytime inference: an exit whose trunk was adapted for it alone recomputes the trunk).

- `exits`: each exit is its own task (inner loop over its path only), meta-objective the sum of exit losses;
- `final_exit`: MAML on the final exit, then the early heads meta-trained with the trunk frozen (heads adapted);
- `joint`: multi-exit MAML, one inner loop for all exits (the trunk takes every exit's update);
- `protonet`: a prototypical-network classifier at every exit (no inner loop).

{table}

![accuracy vs MFLOPs](accuracy_vs_mflops.png)

Curves: confidence thresholds fitted on meta-val episodes (MSDNet's geometric exit distributions), applied
to meta-test queries after adaptation.
"""


TASK_KINDS.register("fewshot", TaskKind(FewShotConfig, run))
