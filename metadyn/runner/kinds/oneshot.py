"""Task kind ``oneshot``: Omniglot's one-shot classification test (Lake et al., Science 2015) for multi-exit
networks, scored exactly as the authors score it.

Protocol: networks learn only from Omniglot's background characters (by default the two "minimal" sets,
``images_background_small1`` and ``small2``), optionally with each character's 90/180/270-degree rotations as
new classes. Whole background alphabets (``data.val_alphabets``) are held out: after every meta-training epoch
the model is scored on fixed 20-way 1-shot episodes within one held-out alphabet (unrotated) and the epoch with
the best accuracy averaged over exits is kept;
the anytime curve's confidence thresholds are fitted on those episodes too. The test is the paper's one-shot
runs (``runNN``: 20 training images of 20 characters of one evaluation alphabet, one image each, and 20 test
images; the answers in ``class_labels.txt``), used for nothing else: each network adapts on a run's 20
training images and classifies its 20 test images; a run's error is the percentage of wrong test images, and
the mean over runs is the figure the paper reports.

Methods (each meta-trained with :func:`metadyn.meta.train.meta_fit`, as in the ``fewshot`` kind): ``protonet``
(prototypical networks at every exit; Snell et al., NeurIPS 2017), ``exits`` (MAML with each exit a task; Finn
et al., ICML 2017, per exit), ``joint`` (joint multi-exit MAML: one inner loop for all exits) and ``final_exit``
(MAML on the final exit, then the early heads meta-trained on the frozen trunk). Every method is trained from
several seeds: figures are means over seeds with their standard deviation over seeds; per-run errors are
averaged over seeds. ``mhd`` is the authors' Modified Hausdorff Distance baseline
(:mod:`metadyn.meta.hausdorff`), which learns nothing and is checked against the per-run errors of the authors'
demo. Comparisons: ``exits`` against each other method per exit (paired over seeds), and every method's final
exit against MHD (paired over runs); Holm's correction over all of them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from metadyn.config import TaskConfig, spec
from metadyn.core import plots, stats
from metadyn.core.flops import exit_costs
from metadyn.core.policies import SCORES, budgeted_curve
from metadyn.core.train import seed_everything, training_seconds
from metadyn.data.fewshot_folders import OMNIGLOT_MINIMAL
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, evaluate, report, specs
from metadyn.runner.kinds.fewshot import FewShot, MetaSpec, MetaTrainSpec, model_factories

METHODS = ("protonet", "exits", "joint", "final_exit")


@dataclass
class OneShotDataSpec:
    root: str | None = None  # background sets and one-shot runs (folders or zips); default $METADYN_DATA/omniglot
    background: list[str] = spec(factory=lambda: list(OMNIGLOT_MINIMAL), nonempty=True, distinct=True)
    val_alphabets: list[str] = spec(factory=lambda: ["Korean"], nonempty=True, distinct=True)
    runs: list[int] | None = spec(factory=lambda: list(range(1, 11)), ge=1, distinct=True)  # None: every run found
    size: int = spec(28, ge=4)
    rotations: bool = True


@dataclass
class OneShotEpisodeSpec:
    n_way: int = spec(20, ge=2)  # must be the runs' 20 (a MAML head has n_way outputs)
    k_shot: int = spec(1, ge=1)
    n_query: int = spec(5, ge=1)
    within_alphabet: bool = True  # meta-training episodes within one alphabet, as the test runs


@dataclass
class OneShotEvalSpec:
    val_episodes: int = spec(100, ge=2)
    policy: str = spec("confidence", choices=tuple(SCORES))
    methods: list[str] = spec(factory=lambda: list(METHODS), choices=METHODS, distinct=True, nonempty=True)
    mhd: bool = True


@dataclass
class OneShotConfig(TaskConfig):
    kind: str = "oneshot"
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], nonempty=True, distinct=True, ge=0)  # training seeds
    data: OneShotDataSpec = field(default_factory=OneShotDataSpec)
    episodes: OneShotEpisodeSpec = field(default_factory=OneShotEpisodeSpec)
    model: specs.ModelSpec = field(default_factory=lambda: specs.ModelSpec("conv4", {"width": 64,
                                                                                     "norm": "batch_episodic"}))
    meta: MetaSpec = field(default_factory=lambda: MetaSpec(inner_lr=0.1, inner_steps=1, eval_inner_steps=3))
    train: MetaTrainSpec = field(default_factory=MetaTrainSpec)
    eval: OneShotEvalSpec = field(default_factory=OneShotEvalSpec)


@dataclass
class Built:
    chars: object  # OmniglotCharacters
    runs: list  # OneShotRun per test run
    in_shape: tuple
    make_net: object
    make_learner: object


@TASK_KINDS.register("oneshot")
class OneShot(FewShot):
    """Reuses the ``fewshot`` kind's meta-training of each method (:meth:`FewShot.train_method`) per seed."""

    config = OneShotConfig

    def build(self, cfg, device):
        """Background characters, the test runs, the network and learner builders (no side effects)."""
        from metadyn.data.fewshot_folders import omniglot_characters, omniglot_runs
        from metadyn.meta.data import oneshot_samplers

        d, ep = cfg.data, cfg.episodes
        if cfg.meta.algorithm == "anil" and {"exits", "final_exit"} & set(cfg.eval.methods):
            raise InputError("the exits and final_exit methods adapt the trunk; use meta.algorithm maml/fomaml")
        runs = omniglot_runs(d.root, d.runs, d.size)
        widths = {len(r.train_files) for r in runs}
        if widths != {ep.n_way}:
            raise InputError(f"episodes.n_way is {ep.n_way} but the runs are {sorted(widths)}-way; they must agree")
        chars = omniglot_characters(d.root, d.background, d.size)
        oneshot_samplers(chars, d.val_alphabets, ep.n_way, ep.k_shot, ep.n_query, within_alphabet=ep.within_alphabet,
                         rotations=d.rotations)  # validates the alphabets and episode sizes
        in_shape = tuple(chars.x.shape[1:])

        make_net, make_learner = model_factories(cfg, in_shape)
        return Built(chars, runs, in_shape, make_net, make_learner)

    def _train_one(self, method: str, seed: int, cfg, built: Built, ctx: Context) -> dict:
        """Meta-train ``method`` from ``seed``, then score every exit on meta-val episodes and on every run."""
        from metadyn.meta.data import oneshot_samplers
        from metadyn.meta.evaluate import anytime_costs, evaluate_episodes, evaluate_runs

        d, ep, steps = cfg.data, cfg.episodes, cfg.meta.eval_inner_steps
        samplers = oneshot_samplers(built.chars, d.val_alphabets, ep.n_way, ep.k_shot, ep.n_query,
                                    within_alphabet=ep.within_alphabet, rotations=d.rotations, seed=seed,
                                    val_seed=cfg.seed)
        samplers["train_for"] = lambda _: samplers["train"]  # the fewshot kind's training episodes for a seed
        seed_everything(seed)
        net = built.make_net()
        predictor, own, history = self.train_method(method, net, (samplers, built.in_shape, built.make_net,
                                                              built.make_learner), cfg, ctx, seed)
        net.eval()
        val = evaluate_episodes(predictor, samplers["val"], cfg.eval.val_episodes, steps=steps, device=ctx.device)
        test = evaluate_runs(predictor, built.runs, steps, ctx.device)
        acc, k = test.accuracy.T.tolist(), test.accuracy.shape[1]  # (exits, runs)
        costs = anytime_costs(exit_costs(net, built.in_shape), own)
        curve = [{"group": method, "mflops": c["mflops"], "accuracy": c["accuracy"], "p": c["p"]}
                 for c in budgeted_curve(val.logits, test.logits, test.labels, costs, cfg.eval.policy)]
        rows = [{"group": method, "exit": i, "accuracy": statistics.fmean(acc[i]), "mflops": costs[i] / 1e6,
                 "val_accuracy": float(val.accuracy[:, i].mean())} for i in range(k)]
        return {"rows": rows, "curve": curve, "run_accuracy": acc, "history": history,
                "train_seconds": training_seconds(history)}

    def execute(self, cfg, built: Built, ctx: Context) -> Results:
        from metadyn.meta.hausdorff import mhd_runs

        methods, seeds, names = cfg.eval.methods, cfg.seeds, [r.name for r in built.runs]
        runs = evaluate.sweep(methods, seeds, lambda m, s: self._train_one(m, s, cfg, built, ctx))
        rows = evaluate.seed_rows(runs, methods, seeds, keys=("accuracy", "val_accuracy"))
        curves = evaluate.seed_rows(runs, methods, seeds, part="curve", keys=("accuracy", "mflops"))
        per_run = {}  # method -> exit -> per-run accuracy, mean over the seeds that finished
        for m in methods:
            done = [runs[m, s]["run_accuracy"] for s in seeds if runs[m, s] is not None]
            if done:
                per_run[m] = [[statistics.fmean(r[i][j] for r in done) for j in range(len(names))]
                              for i in range(len(done[0]))]
        for r in rows:
            if r["group"] in per_run:
                r["run_accuracy"] = per_run[r["group"]][r["exit"]]
                r["run_std"] = statistics.stdev(r["run_accuracy"]) if len(names) > 1 else 0.0
        comps = []
        if "exits" in methods:
            for b in (m for m in methods if m != "exits"):
                ok = [s for s in seeds if runs["exits", s] and runs[b, s]]
                acc = {m: [[runs[m, s]["rows"][i]["accuracy"] for s in ok] for i in range(len(runs[m, ok[0]]["rows"]))]
                       for m in ("exits", b)} if ok else {"exits": []}
                comps += [stats.compare("exits", b, f"exit {i}", a, acc[b][i]) for i, a in enumerate(acc["exits"])]
        extra = {"runs": names, "seeds": seeds,
                 "per_seed": {m: {s: (None if runs[m, s] is None else {k: runs[m, s][k] for k in
                                                                       ("run_accuracy", "history", "train_seconds")})
                                  for s in seeds} for m in methods}}
        if cfg.eval.mhd:
            extra["mhd"] = baseline = mhd_runs(built.runs)
            mhd = [1.0 - e / 100.0 for e in baseline["error"]]
            rows.append({"group": "mhd", "exit": 0, "accuracy": statistics.fmean(mhd), "mflops": baseline.pop("mflops"),
                         "run_accuracy": mhd, "run_std": statistics.stdev(mhd) if len(mhd) > 1 else 0.0})
            for m in per_run:
                comps.append(stats.compare(m, "mhd", "final exit, per run", per_run[m][-1], mhd))
        return Results("omniglot", rows, curves, comparisons=stats.holm(comps), extra=extra)

    def plots(self, cfg, res, out):
        def err(items):
            return [{**r, "accuracy": 1.0 - r["accuracy"]} for r in items if r.get("accuracy") is not None]

        plots.plot_groups(out / "error_vs_mflops.png", err(res.rows), err(res.curves),
                           f"{cfg.task}: one-shot runs", xlabel="MFLOPs per test image (after adaptation)",
                           ylabel="error (%)")

    def sections(self, cfg, res):
        nets = [r for r in res.rows if r["group"] != "mhd"]
        shown = [{**r, "error": None if r["accuracy"] is None else 1.0 - r["accuracy"],
                  "error_std": r.get("accuracy_std")} for r in nets]
        n_seeds = len(cfg.seeds)
        runs = res.extra["runs"]
        per_run = []
        for r in res.rows:
            if "run_accuracy" in r and (r["group"] == "mhd" or r["exit"] == max(x["exit"] for x in nets
                                                                              if x["group"] == r["group"])):
                line = {"group": f"`{r['group']}`" + ("" if r["group"] == "mhd" else f" exit {r['exit']}")}
                line.update({n: f"{100 * (1 - a):.1f}" for n, a in zip(runs, r["run_accuracy"])})
                line["mean"] = f"{100 * (1 - r['accuracy']):.2f}"
                per_run.append(line)
        mhd = res.extra.get("mhd")
        if mhd:
            ref = {n: e for n, e in zip(runs, mhd["authors_error"])}
            if any(v is not None for v in ref.values()):
                known = [v for v in ref.values() if v is not None]
                per_run.append({"group": "authors' MHD (their demo)", **{n: None if v is None else f"{v:.1f}"
                                                                        for n, v in ref.items()},
                                "mean": f"{statistics.fmean(known):.2f}"})
        cols = [("group", "", "")] + [(n, n, "") for n in runs] + [("mean", "mean", "")]
        final = [r for r in shown if r["exit"] == max(x["exit"] for x in shown if x["group"] == r["group"])]
        target = "\n".join(f"- `{r['group']}` final exit: {100 * r['error']:.2f}% error "
                           f"({'meets' if r['error'] <= 0.15 else 'misses'} the 15% target)"
                           for r in final if r["error"] is not None)
        if mhd and mhd["max_abs_difference"] is not None:
            d = mhd["max_abs_difference"]
            target += (f"\n- MHD: largest per-run difference from the authors' figures {d:.2f} points "
                       f"({'within' if d <= 0.5 else 'beyond'} 0.5)")
        mhd_row = next((r for r in res.rows if r["group"] == "mhd"), None)
        mhd_line = "" if mhd_row is None else (
            f"\n\nMHD (no learning): {100 * (1 - mhd_row['accuracy']):.2f}% error at {mhd_row['mflops']:.1f} MFLOPs "
            "per test image (5 FLOPs per pair of ink points, against every training image of the run).")
        seconds = {m: [v["train_seconds"] for v in per.values() if v is not None and v["train_seconds"] is not None]
                   for m, per in res.extra["per_seed"].items()}
        timing = ", ".join(f"`{m}` {statistics.fmean(v) / 60:.1f} min" for m, v in seconds.items() if v)
        return [
            (f"One-shot error % per exit, mean ± std over {n_seeds} seed(s) (MFLOPs per test image)",
             f"{report.exit_table(shown, key='error')}\n\nMFLOPs of anytime inference after adaptation: an exit "
             "whose trunk was adapted for it alone recomputes the trunk. Curve: confidence thresholds fitted on "
             f"meta-val episodes (held-out background alphabets), applied to the runs' test images.{mhd_line}\n\n"
             "![error vs MFLOPs](error_vs_mflops.png)"),
            ("Error % per run (final exits averaged over seeds; MHD learns nothing)", report.markdown_table(
                per_run, cols)),
            ("Targets", target or "(no final exit)"),
            ("Comparisons", report.comparison_lines(
                res.comparisons, "seeds (`exits` against another method) or runs (a final exit against MHD)")),
            ("Meta-training time per seed (this machine; wall time of every epoch, resumed ones included)",
             timing or "— (trained before epoch times were recorded)"),
        ]
