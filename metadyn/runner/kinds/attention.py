"""Task kind ``attention``: exit attention from nothing, own features, later layers, or distilled and detachable.

For every seed, one backbone initialisation is trained three times with the task's ``train`` schedule and
method: no attention on the early exits (``none``), SCAN attention on each exit's own features (``own``), and
masks computed from a later stage (``later``: the upper bound, not deployable). From the trained ``later``
network, stage 2 adds a detachable attention module per early exit and trains it (with the early heads) for
``attention.transfer_epochs`` with exit CE + ``beta/2`` x attention transfer (Zagoruyko & Komodakis, ICLR 2017,
Eq. 2) towards the later-layer attention (``detachable``); trunk, final exit and later modules frozen; then
the later-layer modules are pruned and masks ≈1 everywhere on ``val`` are removed. The control
``detachable_no_at`` runs the same stage 2 with ``beta = 0``. Reported on ``test``: per-exit accuracy, the
attention-transfer distance, and one real early-exit operating point per deployable variant.

One data split for all seeds: the train/val/test split comes from ``seed``, and ``seeds`` vary only the
initialisation and the batch order, so the spread over seeds (and the paired-by-seed tests) measures training
variability on one split, not the variability between splits.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from metadyn import attention as att
from metadyn.config import TaskConfig, spec
from metadyn.core import evaluation, plots, stats
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits
from metadyn.core.policies import anytime_accuracy
from metadyn.core.train import seed_everything
from metadyn.errors import NonFiniteLossError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, evaluate, report, specs

VARIANTS = ("none", "own", "later", "detachable", "detachable_no_at")
LABELS = {"none": "no attention", "own": "own-layer attention (SCAN)",
          "later": "later-layer attention (upper bound, not deployable)",
          "detachable": "detachable, distilled (AT)", "detachable_no_at": "detachable, CE only (β = 0, control)"}
PAIRS = (("own", "none"), ("later", "none"), ("detachable", "own"), ("detachable", "detachable_no_at"),
         ("detachable", "none"))


@dataclass
class AttentionSpec:
    source: str = spec("final", choices=att.SOURCES)  # the map feeding a later-layer mask: final stage's or next
    beta: float = spec(10.0, ge=0)  # weight of attention transfer in stage 2 (the loss adds beta/2 * distances)
    p: float = spec(2.0, gt=0)  # exponent of the attention map sum_c |A_c|^p
    transfer_epochs: int = spec(10, ge=1)  # stage 2
    transfer_lr: float = spec(0.01, gt=0)
    tune_heads: bool = True  # stage 2 also trains the early exits' heads
    saturation_tol: float = spec(1e-5, ge=0)  # a mask within this of 1 everywhere on val is removed
    budget_fraction: float = spec(0.75, gt=0, le=1)  # the operating point, a share of the no-attention FLOPs


@dataclass
class AttentionConfig(TaskConfig):
    data: specs.DataSpec = field(default_factory=specs.DataSpec)
    model: specs.ModelSpec = field(default_factory=specs.ModelSpec)
    train: specs.TrainSpec = field(default_factory=specs.TrainSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], ge=0, nonempty=True, distinct=True)
    eval: specs.EvalSpec = field(default_factory=lambda: specs.EvalSpec(calibrate=False))


@TASK_KINDS.register("attention")
class Attention(TaskKind):
    config = AttentionConfig

    def _model(self, cfg, data, attention: str, seed: int) -> att.AttentiveExits:
        seed_everything(seed)  # the same trunk and heads for every variant of a seed
        net = specs.build_model(cfg.model, data.in_shape, data.num_classes)
        return att.AttentiveExits(net, data.in_shape, attention, cfg.attention.source)

    def build(self, cfg, device):
        data = specs.load_data(cfg.data, cfg.seed)
        for attention in ("none", "own", "later"):
            probe = self._model(cfg, data, attention, cfg.seeds[0])
            specs.build_method(cfg.train.method, cfg.train.method_options, probe, data.in_shape)
        att.add_detachable(probe, cfg.attention.tune_heads)
        return data

    def execute(self, cfg, data, ctx: Context) -> Results:
        a, bs = cfg.attention, cfg.eval.batch_size
        stage2 = dataclasses.replace(cfg.train, epochs=a.transfer_epochs, lr=a.transfer_lr)
        trained: dict = {}
        ref_full: dict = {}

        def train_one(v: str, seed: int) -> dict:
            ck = ctx.out / "checkpoints" / f"seed{seed}"
            res = {}
            if v in ("none", "own", "later"):
                model = self._model(cfg, data, v, seed)
                loss = specs.build_method(cfg.train.method, cfg.train.method_options, model, data.in_shape)
                seed_everything(seed)
                specs.train(model, loss, data.train, cfg.train, seed, ctx.device, ck / f"{v}.pt", ctx.progress)
                if v == "none":
                    ref_full[seed] = float(exit_costs(model, data.in_shape).full)
            else:
                if (seed, "later") not in trained:
                    raise NonFiniteLossError("the later-layer network of this seed diverged")
                model = copy.deepcopy(trained[seed, "later"])
                seed_everything(seed)
                att.add_detachable(model, a.tune_heads)
                res["distance_init"] = att.transfer_distances(model, data.test.x, a.p, bs)
                seed_everything(seed)
                beta = a.beta if v == "detachable" else 0.0
                specs.train(model, att.detachable_loss(beta, a.p), data.train, stage2, seed, ctx.device, ck / f"{v}.pt",
                      ctx.progress)
                res["distance"] = att.transfer_distances(model, data.test.x, a.p, bs)
                att.prune_later(model)
            trained[seed, v] = model
            if v != "none" and v != "later":
                res["removed"] = att.prune_saturated(model, data.val.x, tol=a.saturation_tol, batch_size=bs)
            model.eval()
            test = collect_logits(model, data.test.x, bs)
            mf = att.exit_mflops(model, data.in_shape)
            acc = anytime_accuracy(test, data.test.y)
            res["rows"] = [{"group": v, "exit": i, "accuracy": acc[i], "mflops": mf[i],
                            "deployable": model.deployable} for i in range(len(mf))]
            res["params"] = sum(p.numel() for p in model.parameters())
            if model.deployable and seed in ref_full:
                val = collect_logits(model, data.val.x, bs)
                op = evaluation.operating_point(model, val, test, data.test.x, data.test.y, [m * 1e6 for m in mf],
                                     a.budget_fraction * ref_full[seed], "confidence", ctx.device, bs)
                res["budgets"] = [{"group": v, "budget_fraction": a.budget_fraction, **op}] if op else []
            return res

        runs = evaluate.sweep(VARIANTS, cfg.seeds, train_one)
        rows = evaluate.seed_rows(runs, VARIANTS, cfg.seeds)
        budgets = evaluate.seed_rows(runs, VARIANTS, cfg.seeds, "budgets", ("accuracy", "mflops", "mismatches"))
        extra = {"removed": {}, "distance": {}, "params": {}}
        for v in VARIANTS:
            done = [r for r in (runs[v, s] for s in cfg.seeds) if r is not None]
            extra["params"][v] = done[0]["params"] if done else None
            extra["removed"][v] = [r.get("removed") for r in done]
            for key in ("distance_init", "distance"):
                if done and key in done[0]:
                    name = "init" if key == "distance_init" else v
                    extra["distance"][name] = [stats.mean_std([r[key][i] for r in done])
                                               for i in range(len(done[0][key]))]
        comps = evaluate.seed_pairs(runs, PAIRS, cfg.seeds, range(max(r["exit"] for r in rows)))
        extra["reference_full_mflops"] = stats.mean_std(list(ref_full.values()))[0] / 1e6 if ref_full else None
        return Results(cfg.data.name, rows, budgets=budgets, comparisons=comps, extra=extra)

    def plots(self, cfg, res, out):
        plots.plot_groups(out / "accuracy_vs_mflops.png", res.rows, [], f"{cfg.task} (test)", labels=LABELS,
                    xlabel="MFLOPs per sample (cumulative)")

    def sections(self, cfg, res):
        e, a = res.extra, cfg.attention
        k = max(r["exit"] for r in res.rows)
        dist = report.markdown_table([{"what": f"`{n}`" if n != "init" else "at initialisation",
                                **{f"e{i}": f"{mu:.3f} ± {sd:.3f}" for i, (mu, sd) in enumerate(d)}}
                               for n, d in e["distance"].items()],
                              [("what", "detachable vs later-layer attention", "")]
                              + [(f"e{i}", f"exit {i}", "") for i in range(k)])
        removed = {v: sum(len(x) for x in r if x) for v, r in e["removed"].items() if r and r[0] is not None}
        mismatches = ", ".join(f"{b['group']} {b['mismatches']}" for b in res.budgets)
        return [("Test accuracy % per exit, mean ± std over seeds (cumulative MFLOPs)",
                 f"{report.exit_table(res.rows, labels=LABELS)}\n\nOne data split (from `seed: {cfg.seed}`) for every "
                 f"seed: the ± is over {len(cfg.seeds)} initialisations and batch orders on that split, not over "
                 "splits. The `later` variant's MFLOPs include the later "
                 "stages its masks need (not deployable); `detachable*` are measured after pruning.\n\n"
                 "![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("Attention-transfer distance on test (‖Q_det/‖Q_det‖ − Q_later/‖Q_later‖‖₂, in [0, 2])", dist),
                (f"Early exit at {100 * a.budget_fraction:.0f}% of the no-attention network's FLOPs: test accuracy % "
                 "(MFLOPs)", f"Confidence thresholds fitted on `val`, run on `test` with batch compaction; mismatches "
                 f"with picking from the full forward, mean over seeds: {mismatches}.\n\n"
                 + report.budget_table(res.budgets)),
                ("Paired differences", f"{report.comparison_lines(res.comparisons, 'seeds')}\n\nMasks ≈1 everywhere on "
                 f"val (within {a.saturation_tol:g}) removed, summed over seeds and exits: {removed}.")]
