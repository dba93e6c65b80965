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
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from metadyn.attention import (
    SOURCES,
    AttentiveExits,
    add_detachable,
    detachable_loss,
    exit_mflops,
    prune_later,
    prune_saturated,
    transfer_distances,
)
from metadyn.config import TaskConfig, spec
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits
from metadyn.core.policies import anytime_accuracy
from metadyn.core.train import seed_everything
from metadyn.errors import NonFiniteLossError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind
from metadyn.runner.evaluate import aggregate, compare, holm, mean_std, operating_point, sweep
from metadyn.runner.report import (
    FLOPS_NOTE,
    budget_table,
    comparison_lines,
    exit_table,
    markdown_table,
    plot_groups,
    settings_line,
)
from metadyn.runner.specs import DataSpec, EvalSpec, ModelSpec, TrainSpec, build_method, build_model, load_data, train

VARIANTS = ("none", "own", "later", "detachable", "detachable_no_at")
LABELS = {"none": "no attention", "own": "own-layer attention (SCAN)",
          "later": "later-layer attention (upper bound, not deployable)",
          "detachable": "detachable, distilled (AT)", "detachable_no_at": "detachable, CE only (β = 0, control)"}
PAIRS = (("own", "none"), ("later", "none"), ("detachable", "own"), ("detachable", "detachable_no_at"),
         ("detachable", "none"))


@dataclass
class AttentionSpec:
    source: str = spec("final", choices=SOURCES)  # the map feeding a later-layer mask: the final stage's or the next
    beta: float = spec(10.0, ge=0)  # weight of attention transfer in stage 2 (the loss adds beta/2 * distances)
    p: float = spec(2.0, gt=0)  # exponent of the attention map sum_c |A_c|^p
    transfer_epochs: int = spec(10, ge=1)  # stage 2
    transfer_lr: float = spec(0.01, gt=0)
    tune_heads: bool = True  # stage 2 also trains the early exits' heads
    saturation_tol: float = spec(1e-5, ge=0)  # a mask within this of 1 everywhere on val is removed
    budget_fraction: float = spec(0.75, gt=0, le=1)  # the operating point, a share of the no-attention FLOPs


@dataclass
class AttentionConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], ge=0, nonempty=True, distinct=True)
    eval: EvalSpec = field(default_factory=lambda: EvalSpec(calibrate=False))


@TASK_KINDS.register("attention")
class Attention(TaskKind):
    config = AttentionConfig

    def _model(self, cfg, data, attention: str, seed: int) -> AttentiveExits:
        seed_everything(seed)  # the same trunk and heads for every variant of a seed
        return AttentiveExits(build_model(cfg.model, data.in_shape, data.num_classes), data.in_shape, attention,
                              cfg.attention.source)

    def build(self, cfg, device):
        data = load_data(cfg.data, cfg.seed)
        for attention in ("none", "own", "later"):
            probe = self._model(cfg, data, attention, cfg.seeds[0])
            build_method(cfg.train.method, cfg.train.method_options, probe, data.in_shape)
        add_detachable(probe, cfg.attention.tune_heads)
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
                loss = build_method(cfg.train.method, cfg.train.method_options, model, data.in_shape)
                seed_everything(seed)
                train(model, loss, data.train, cfg.train, seed, ctx.device, ck / f"{v}.pt", ctx.progress)
                if v == "none":
                    ref_full[seed] = float(exit_costs(model, data.in_shape).full)
            else:
                if (seed, "later") not in trained:
                    raise NonFiniteLossError("the later-layer network of this seed diverged")
                model = copy.deepcopy(trained[seed, "later"])
                seed_everything(seed)
                add_detachable(model, a.tune_heads)
                res["distance_init"] = transfer_distances(model, data.test.x, a.p, bs)
                seed_everything(seed)
                beta = a.beta if v == "detachable" else 0.0
                train(model, detachable_loss(beta, a.p), data.train, stage2, seed, ctx.device, ck / f"{v}.pt",
                      ctx.progress)
                res["distance"] = transfer_distances(model, data.test.x, a.p, bs)
                prune_later(model)
            trained[seed, v] = model
            if v != "none" and v != "later":
                res["removed"] = prune_saturated(model, data.val.x, tol=a.saturation_tol, batch_size=bs)
            model.eval()
            test = collect_logits(model, data.test.x, bs)
            mf = exit_mflops(model, data.in_shape)
            acc = anytime_accuracy(test, data.test.y)
            res["rows"] = [{"group": v, "exit": i, "accuracy": acc[i], "mflops": mf[i],
                            "deployable": model.deployable} for i in range(len(mf))]
            res["params"] = sum(p.numel() for p in model.parameters())
            if model.deployable and seed in ref_full:
                val = collect_logits(model, data.val.x, bs)
                res["budget"] = operating_point(model, val, test, data.test.x, data.test.y, [m * 1e6 for m in mf],
                                                a.budget_fraction * ref_full[seed], "confidence", ctx.device, bs)
            return res

        runs = sweep(VARIANTS, cfg.seeds, train_one)
        rows, budgets, extra = [], [], {"removed": {}, "distance": {}, "params": {}}
        for v in VARIANTS:
            got = [runs[v, s] for s in cfg.seeds]
            done = [r for r in got if r is not None]
            rows += aggregate([r and r["rows"] for r in got], group=v)
            pts = [r["budget"] for r in done if r.get("budget")]
            if pts:
                (acc, sd), (mf, _) = mean_std([p["accuracy"] for p in pts]), mean_std([p["mflops"] for p in pts])
                budgets.append({"group": v, "budget_fraction": a.budget_fraction, "accuracy": acc, "accuracy_std": sd,
                                "mflops": mf, "mismatches": sum(p["mismatches"] for p in pts)})
            extra["params"][v] = done[0]["params"] if done else None
            extra["removed"][v] = [r.get("removed") for r in done]
            for key in ("distance_init", "distance"):
                if done and key in done[0]:
                    name = "init" if key == "distance_init" else v
                    extra["distance"][name] = [mean_std([r[key][i] for r in done]) for i in range(len(done[0][key]))]
        k = max(r["exit"] for r in rows)
        comps = []
        for x, y in PAIRS:
            ok = [s for s in cfg.seeds if runs[x, s] and runs[y, s]]
            comps += [compare(x, y, f"exit {i}", [runs[x, s]["rows"][i]["accuracy"] for s in ok],
                              [runs[y, s]["rows"][i]["accuracy"] for s in ok]) for i in range(k)]
        extra["reference_full_mflops"] = mean_std(list(ref_full.values()))[0] / 1e6 if ref_full else None
        return Results(cfg.data.name, rows, budgets=budgets, comparisons=holm(comps), extra=extra)

    def plots(self, cfg, res, out):
        plot_groups(out / "accuracy_vs_mflops.png", res.rows, [], f"{cfg.task} (test)", labels=LABELS,
                    xlabel="MFLOPs per sample (cumulative)")

    def report(self, cfg, res, m):
        e, a = res.extra, cfg.attention
        k = max(r["exit"] for r in res.rows)
        dist = markdown_table([{"what": f"`{n}`" if n != "init" else "at initialisation",
                                **{f"e{i}": f"{mu:.3f} ± {sd:.3f}" for i, (mu, sd) in enumerate(d)}}
                               for n, d in e["distance"].items()],
                              [("what", "detachable vs later-layer attention", "")]
                              + [(f"e{i}", f"exit {i}", "") for i in range(k)])
        removed = {v: sum(len(x) for x in r if x) for v, r in e["removed"].items() if r and r[0] is not None}
        return f"""# {cfg.task}

`{cfg.model.backbone}` {cfg.model.options or ''} on `{cfg.data.name}`, training seeds {cfg.seeds}. {settings_line(m)}
Stage 1: {cfg.train.epochs} epochs of `{cfg.train.method}` (same initialisation and batch order for `none`, `own`,
`later`). Stage 2 (from the trained `later` network): {a.transfer_epochs} epochs at lr {a.transfer_lr} of exit CE +
β/2 · attention transfer (β = {a.beta:g}, p = {a.p:g}) for the detachable modules{' and the early heads' if
a.tune_heads else ''}; then the later-layer modules are pruned. Later-layer masks read the `{a.source}` stage.
Every number is on `test`; thresholds are fitted on `val`. {FLOPS_NOTE} The `later` variant's MFLOPs include the
later stages its masks need (not deployable); `detachable*` are measured after pruning.

## Test accuracy % per exit, mean ± std over seeds (cumulative MFLOPs)

{exit_table(res.rows, labels=LABELS)}

## Attention-transfer distance on test (‖Q_det/‖Q_det‖ − Q_later/‖Q_later‖‖₂, in [0, 2])

{dist}

## Early exit at {100 * a.budget_fraction:.0f}% of the no-attention network's FLOPs: test accuracy % (MFLOPs)

Confidence thresholds fitted on `val`, run on `test` with batch compaction; mismatches with picking from the
full forward, summed over seeds: {", ".join(f"{b['group']} {b['mismatches']}" for b in res.budgets)}.

{budget_table(res.budgets)}

## Paired differences

{comparison_lines(res.comparisons, "seeds")}

Masks ≈1 everywhere on val (within {a.saturation_tol:g}) removed, summed over seeds and exits: {removed}.

![accuracy vs MFLOPs](accuracy_vs_mflops.png)
"""
