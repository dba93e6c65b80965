"""Task kind ``fewshot``: meta-learn a multi-exit network with each exit as a task, against baselines.

Protocol (leak-free): meta-training episodes come from the meta-train classes; after every epoch the model is
scored on fixed meta-val episodes and the best epoch is kept; the anytime curve's thresholds are fitted on
meta-val episodes too. Meta-test classes give only the final numbers. Every method is meta-trained once per
training seed (``seeds``: network initialisation, meta-training episodes and batch order); the meta-val and
meta-test episodes are the same for every seed (from ``seed``). With several training seeds a table entry is
the mean over seeds of the per-seed meta-test accuracy ± its standard deviation over seeds, and comparisons are
paired by seed; with one seed, it is the accuracy ± 95% CI over the test episodes, paired by episode.

Methods: ``exits`` (each exit its own MAML task over its path: Finn et al., ICML 2017, per exit), and the
baselines ``final_exit`` (MAML on the final exit, then the early heads meta-trained with the trunk frozen,
ANIL-style), ``joint`` (one shared inner loop for all exits), ``protonet`` (Snell et al., NeurIPS 2017, at
every exit) and ``exits_consistency`` (``exits`` plus Idea 3's consistency term in the outer loop). Every
baseline is compared with ``exits`` on the same meta-test episodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metadyn.config import TaskConfig, checked_call, spec
from metadyn.core import plots, stats
from metadyn.core.flops import exit_costs
from metadyn.core.policies import SCORES, budgeted_curve
from metadyn.core.train import seed_everything
from metadyn.errors import InputError
from metadyn.meta.train import StackedPredictor
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, evaluate, report, specs

BASELINES = ("final_exit", "joint", "protonet", "exits_consistency")


@dataclass
class FewShotDataSpec:
    name: str = "glyphs"
    root: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class EpisodeSpec:
    n_way: int = spec(5, ge=2)
    k_shot: int = spec(1, ge=1)
    n_query: int = spec(15, ge=1)


@dataclass
class MetaSpec:
    algorithm: str = "maml"
    inner_lr: float | list[float] = spec(0.4, gt=0)
    inner_steps: int | list[int] = spec(1, ge=1)
    eval_inner_steps: int | None = spec(None, ge=1)  # default: the training steps
    exit_weights: list[float] | None = spec(None, ge=0)
    share_trunk: bool = False
    metasgd_init: str = spec("uniform", choices=("uniform", "constant"))  # Meta-SGD rates: the paper's U[.005, .1]
    # the exits_consistency variant: options of metadyn.consistency's loss (kind, weight, hidden)
    consistency: dict = field(default_factory=lambda: {"kind": "byol", "weight": 0.1})


@dataclass
class MetaTrainSpec:
    epochs: int = spec(10, ge=1)
    iterations: int = spec(25, ge=1)  # meta-batches per epoch
    meta_batch: int = spec(8, ge=1)
    lr: float = spec(0.001, gt=0)
    optimizer: str = spec("adam", choices=("sgd", "adam", "adamw"))
    head_epochs: int = spec(3, ge=1)  # final_exit baseline: epochs for the early heads afterwards


@dataclass
class FewShotEvalSpec:
    val_episodes: int = spec(100, ge=2)
    test_episodes: int = spec(600, ge=2)
    policy: str = spec("confidence", choices=tuple(SCORES))
    baselines: list[str] = spec(factory=lambda: ["final_exit", "joint", "protonet"], choices=BASELINES, distinct=True)


@dataclass
class FewShotConfig(TaskConfig):
    kind: str = "fewshot"
    data: FewShotDataSpec = field(default_factory=FewShotDataSpec)
    episodes: EpisodeSpec = field(default_factory=EpisodeSpec)
    model: specs.ModelSpec = field(default_factory=lambda: specs.ModelSpec("conv4", {"width": 32,
                                                                                     "norm": "batch_episodic"}))
    meta: MetaSpec = field(default_factory=MetaSpec)
    train: MetaTrainSpec = field(default_factory=MetaTrainSpec)
    eval: FewShotEvalSpec = field(default_factory=FewShotEvalSpec)
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], ge=0, nonempty=True, distinct=True)  # training seeds


def make_consistency(net, in_shape, options: dict):
    """The consistency heads of the exits_consistency variant (validated against the options)."""
    from metadyn.consistency.losses import consistency_method

    return checked_call(consistency_method, options, "meta.consistency", model=net, in_shape=in_shape)


def model_factories(cfg, in_shape):
    """``make_net()`` (the task's multi-exit network for ``n_way`` classes) and ``make_learner(net, **over)``
    (a :class:`MetaLearner` with the task's ``meta`` options, ``over`` replacing some), checked once here: the
    meta options and the network's normalisation are validated before anything runs. Shared by every kind
    built on this protocol (``fewshot``, ``oneshot``)."""
    from metadyn.meta import MetaLearner

    m, n_way = cfg.meta, cfg.episodes.n_way

    def make_net():
        return specs.build_model(cfg.model, in_shape, n_way)

    def make_learner(net, **over):
        opts = dict(algorithm=m.algorithm, inner_lr=m.inner_lr, inner_steps=m.inner_steps,
                    exit_weights=m.exit_weights, share_trunk=m.share_trunk, metasgd_init=m.metasgd_init)
        return MetaLearner(net, **{**opts, **over})

    make_learner(make_net())
    return make_net, make_learner


@TASK_KINDS.register("fewshot")
class FewShot(TaskKind):
    config = FewShotConfig

    def build(self, cfg, device):
        """Pools, samplers, the network builder and the learner builder (no side effects)."""
        from metadyn.data import EpisodeSampler
        from metadyn.meta.data import fewshot_pool

        if "final_exit" in cfg.eval.baselines and cfg.meta.algorithm == "anil":
            raise InputError("the final_exit baseline adapts the final exit with MAML; use meta.algorithm maml/fomaml")
        ep, m = cfg.episodes, cfg.meta
        pools = {s: fewshot_pool(cfg.data.name, s, cfg.data.root, **cfg.data.options) for s in ("train", "val", "test")}
        samplers = {s: EpisodeSampler(p, ep.n_way, ep.k_shot, ep.n_query, seed=cfg.seed + i)
                    for i, (s, p) in enumerate(pools.items())}
        # meta-training episodes per training seed (seed == cfg.seed gives the sampler above)
        samplers["train_for"] = lambda seed: EpisodeSampler(pools["train"], ep.n_way, ep.k_shot, ep.n_query,
                                                            seed=seed)
        in_shape = tuple(pools["train"].x.shape[1:])

        make_net, make_learner = model_factories(cfg, in_shape)
        if "exits_consistency" in cfg.eval.baselines:
            if m.consistency.get("kind", "byol") == "simsiam":
                raise InputError("meta.consistency: kind 'simsiam' needs augmented views; use byol or l2")
            make_consistency(make_net(), in_shape, m.consistency)
        return samplers, in_shape, make_net, make_learner

    def _train(self, learner, samplers, cfg, out, ctx: Context, epochs: int, seed: int) -> list:
        from metadyn.meta.train import meta_fit

        t = cfg.train
        return meta_fit(learner, samplers["train_for"](seed), samplers["val"], out, epochs=epochs,
                        iterations=t.iterations, meta_batch=t.meta_batch, lr=t.lr, optimizer=t.optimizer,
                        val_episodes=cfg.eval.val_episodes, eval_steps=cfg.meta.eval_inner_steps, seed=seed,
                        device=ctx.device, progress=ctx.progress)

    def train_method(self, name: str, net, built, cfg, ctx: Context, seed: int):
        """Meta-train method ``name`` on ``net``; returns its predictor, which exits own their trunk, history.

        The hook a kind built on this protocol reuses (``oneshot`` does, with its own episodes in ``built``)."""
        samplers, in_shape, _, make_learner = built
        k, epochs, out = net.num_exits, cfg.train.epochs, ctx.out / f"seed{seed}" / name
        own = cfg.meta.algorithm != "anil" and not cfg.meta.share_trunk
        if name in ("exits", "exits_consistency", "joint", "protonet"):
            if name == "protonet":
                from metadyn.meta.protonet import ProtoExits

                learner = ProtoExits(net)
            else:
                over = {"share_trunk": True} if name == "joint" else {}
                if name == "exits_consistency":  # the same, plus Idea 3's consistency in the outer loop
                    over["consistency"] = make_consistency(net, in_shape, cfg.meta.consistency)
                learner = make_learner(net, **over)
            history = self._train(learner, samplers, cfg, out, ctx, epochs, seed)
            return learner, [own and name.startswith("exits")] * k, history
        # final_exit: MAML on the final exit, then the early heads with the trunk frozen
        last = lambda v: v[-1] if isinstance(v, list) else v  # noqa: E731
        one = {"inner_lr": last(cfg.meta.inner_lr), "inner_steps": last(cfg.meta.inner_steps), "exit_weights": None,
               "share_trunk": False}
        final = make_learner(net, exits=[k - 1], **one)
        history = self._train(final, samplers, cfg, out, ctx, epochs, seed)
        early = [p for n, p in net.named_parameters() if not n.startswith(f"heads.{k - 1}.") and "heads." in n]
        frozen = [p for p in net.parameters() if all(p is not q for q in early)]
        for p in frozen:
            p.requires_grad_(False)
        heads = make_learner(net, algorithm="anil", exits=list(range(k - 1)), **one)
        history += self._train(heads, samplers, cfg, ctx.out / f"seed{seed}" / f"{name}_heads", ctx,
                               cfg.train.head_epochs, seed)
        for p in frozen:
            p.requires_grad_(True)
        return StackedPredictor(heads, final), [False] * (k - 1) + [True], history

    def execute(self, cfg, built, ctx: Context) -> Results:
        from metadyn.meta.evaluate import anytime_costs, evaluate_episodes

        samplers, in_shape, make_net, _ = built
        steps, methods, seeds = cfg.meta.eval_inner_steps, ["exits", *cfg.eval.baselines], cfg.seeds

        def train_one(name: str, seed: int) -> dict:
            seed_everything(seed)
            net = make_net()
            predictor, own, history = self.train_method(name, net, built, cfg, ctx, seed)
            net.eval()
            val = evaluate_episodes(predictor, samplers["val"], cfg.eval.val_episodes, steps=steps, device=ctx.device)
            test = evaluate_episodes(predictor, samplers["test"], cfg.eval.test_episodes, steps=steps,
                                     device=ctx.device)
            costs = anytime_costs(exit_costs(net, in_shape), own)
            rows = [{"group": name, "exit": i, "accuracy": mu, "ci95": h, "mflops": costs[i] / 1e6,
                     "val_accuracy": float(val.accuracy[:, i].mean())} for i, (mu, h) in enumerate(test.mean_ci())]
            curve = [{"group": name, "mflops": c["mflops"], "accuracy": c["accuracy"], "p": c["p"]}
                     for c in budgeted_curve(val.logits, test.logits, test.labels, costs, cfg.eval.policy)]
            return {"rows": rows, "curve": curve, "episodes": test.accuracy, "history": history}

        runs = evaluate.sweep(methods, seeds, train_one)
        several = len(seeds) > 1
        if several:  # mean ± std over training seeds; the per-seed 95% CIs stay in extra
            rows = evaluate.seed_rows(runs, methods, seeds, keys=("accuracy", "val_accuracy"))
            for r in rows:
                r.pop("ci95", None)
            exits = range(max(r["exit"] for r in rows) + 1)
            comps = evaluate.seed_pairs(runs, [("exits", b) for b in cfg.eval.baselines], seeds, exits)
        else:
            rows = [r for m in methods for r in (runs[m, seeds[0]] or {"rows": stats.aggregate([None], group=m)})[
                "rows"]]
            acc = {m: runs[m, seeds[0]]["episodes"] for m in methods if runs[m, seeds[0]]}
            comps = stats.holm([stats.compare("exits", b, f"exit {i}", acc["exits"][:, i].tolist(),
                                                    acc[b][:, i].tolist())
                                   for b in cfg.eval.baselines if "exits" in acc and b in acc
                                   for i in range(acc[b].shape[1])])
        curves = evaluate.seed_rows(runs, methods, seeds, "curve", ("accuracy", "mflops"))
        ep = cfg.episodes
        extra = {m: {"history": {f"seed{s}": (runs[m, s] or {}).get("history") for s in seeds}} for m in methods}
        extra["per_seed"] = [{**r, "seed": s} for m in methods for s in seeds
                             for r in (runs[m, s] or {}).get("rows", [])]
        extra["seeds"] = list(seeds)
        extra["episodes"] = {"n_way": ep.n_way, "k_shot": ep.k_shot, "n_query": ep.n_query,
                             "test_episodes": cfg.eval.test_episodes}
        return Results(cfg.data.name, rows, curves, comparisons=comps, extra=extra)

    def plots(self, cfg, res, out):
        plots.plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (meta-test)",
                    xlabel="MFLOPs per query (after adaptation)", ylabel="meta-test accuracy (%)")

    def sections(self, cfg, res):
        n, episodes = len(cfg.seeds), cfg.eval.test_episodes
        if n > 1:
            head = (f"Meta-test accuracy % per exit, mean ± std over {n} training seeds (each seed: {episodes} "
                    "meta-test episodes, the same for every seed) (MFLOPs per query to reach it)")
            unit = f"the {n} training seeds (each seed's mean over {episodes} meta-test episodes)"
            per_seed = report.markdown_table(
                [{**r, "acc": 100 * r["accuracy"], "ci": 100 * r["ci95"]} for r in res.extra["per_seed"]],
                [("group", "method", ""), ("seed", "seed", "d"), ("exit", "exit", "d"), ("acc", "accuracy (%)", ".2f"),
                 ("ci", "95% CI over episodes", ".2f")])
            extra = [("Every training seed (accuracy ± 95% CI over its meta-test episodes)", per_seed)]
        else:
            head = "Meta-test accuracy % ± 95% CI per exit (MFLOPs per query to reach it)"
            unit = f"the {episodes} meta-test episodes (one training seed)"
            extra = []
        return [(head,
                 f"{report.exit_table(res.rows)}\n\nAn exit whose trunk was adapted for it alone recomputes the "
                 "trunk in anytime inference. Curves: confidence thresholds fitted on meta-val episodes, applied to "
                 "meta-test queries after adaptation.\n\n![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("`exits` against each baseline", report.comparison_lines(res.comparisons, unit)), *extra]
