"""Task kind ``attention``: exit attention from nothing, own features, later layers, or distilled and detachable.

For every seed, one backbone initialisation is trained three times with the task's ``train`` schedule and
method (exit-wise CE by default): with no attention on the early exits (``none``), with SCAN attention on
each exit's own features (``own``), and with masks computed from a later stage (``later``: the upper bound,
not deployable — leaving early would need the later stage). From the trained ``later`` network, stage 2
adds a detachable attention module per early exit (the same module as ``own``) and trains it, together
with the early exits' heads, for ``attention.transfer_epochs`` with exit CE + ``beta/2`` x attention
transfer towards the later-layer attention (``detachable``), trunk, final exit and later modules frozen;
then the later-layer modules are pruned and masks that are ≈1 everywhere on ``val`` are removed. The
control ``detachable_no_at`` runs the same stage 2 with ``beta = 0``: it tells whether the attention
transfer, rather than the extra epochs on the heads, makes any difference.

Reported on ``test`` (used for nothing else): per-exit accuracy (mean ± std over seeds) and MFLOPs of each
variant, the attention-transfer distance between detachable and later-layer attention, and one early-exit
operating point per deployable variant (confidence thresholds fitted on ``val`` for half the no-attention
network's FLOPs, run with :func:`~metadyn.core.inference.dynamic_exit`).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path

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
from metadyn.config import TaskConfig
from metadyn.core.flops import exit_costs, expected_cost
from metadyn.core.inference import collect_logits, dynamic_exit
from metadyn.core.policies import (
    ThresholdPolicy,
    anytime_accuracy,
    fit_thresholds_for_budget,
    pick_exits,
    policy_scores,
)
from metadyn.core.train import pick_device, seed_everything
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.anytime import (
    DataSpec,
    EvalSpec,
    ModelSpec,
    TrainSpec,
    build_method,
    build_model,
    check_specs,
    load_data,
    train,
)
from metadyn.runner.report import finish_curve_plot, markdown_table, pyplot

VARIANTS = ("none", "own", "later", "detachable", "detachable_no_at")
LABELS = {"none": "no attention", "own": "own-layer attention (SCAN)",
          "later": "later-layer attention (upper bound, not deployable)",
          "detachable": "detachable, distilled (AT)", "detachable_no_at": "detachable, CE only (β = 0, control)"}


@dataclass
class AttentionSpec:
    source: str = "final"  # the map feeding exit i's later-layer mask: the final stage's or the next one's
    beta: float = 10.0  # weight of attention transfer in stage 2 (the loss adds beta/2 * sum of distances)
    p: float = 2.0  # exponent of the attention map sum_c |A_c|^p
    transfer_epochs: int = 10  # stage 2
    transfer_lr: float = 0.01
    tune_heads: bool = True  # stage 2 also trains the early exits' heads
    saturation_tol: float = 1e-5  # a mask within this of 1 everywhere on val is removed (logits change < 1e-4)
    budget_fraction: float = 0.75  # the early-exit operating point, a fraction of the no-attention static FLOPs


@dataclass
class AttentionConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_batch_size: int = 256


def _check(cfg: AttentionConfig) -> None:
    a = cfg.attention
    check_specs(cfg.train, EvalSpec())
    if a.source not in SOURCES:
        raise InputError(f"unknown attention.source {a.source!r}; choose from: {', '.join(SOURCES)}")
    if not a.beta >= 0 or not a.p > 0 or not a.transfer_lr > 0 or a.transfer_epochs < 1:
        raise InputError(f"attention needs beta >= 0, p > 0, transfer_lr > 0 and transfer_epochs >= 1, got {a}")
    if not 0 < a.budget_fraction <= 1 or not a.saturation_tol >= 0:
        raise InputError(f"attention.budget_fraction must lie in (0, 1] and saturation_tol be >= 0, got {a}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise InputError(f"seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    if cfg.eval_batch_size < 1:
        raise InputError(f"eval_batch_size must be at least 1, got {cfg.eval_batch_size}")


def _build(cfg: AttentionConfig, data, attention: str, seed: int) -> AttentiveExits:
    """The task's backbone, initialised from ``seed`` (the same trunk and heads for every variant), wrapped."""
    seed_everything(seed)
    return AttentiveExits(build_model(cfg.model, data), data.in_shape, attention, cfg.attention.source)


def measure(model: AttentiveExits, data, cfg: AttentionConfig, ref_full: float, device) -> dict:
    """Per-exit test accuracy and MFLOPs; for a deployable model also the early-exit operating point."""
    bs = cfg.eval_batch_size
    model.eval()
    test = collect_logits(model, data.test.x, bs)
    mf = exit_mflops(model, data.in_shape)
    row = {"accuracy": anytime_accuracy(test, data.test.y), "mflops": mf, "deployable": model.deployable,
           "params": sum(p.numel() for p in model.parameters()), "budget": None}
    if model.deployable:
        cum = [m * 1e6 for m in mf]
        budget = cfg.attention.budget_fraction * ref_full
        try:
            t = fit_thresholds_for_budget(policy_scores(collect_logits(model, data.val.x, bs)), cum, budget)
        except InputError:  # the budget is below this variant's cheapest thresholds
            return row
        policy = ThresholdPolicy(t.tolist())
        picked_idx, picked = pick_exits(test, policy)
        dyn = dynamic_exit(model, data.test.x.to(device), policy, micro_batch=bs)
        idx, logits = dyn.exit_idx.cpu(), dyn.logits.float().cpu()
        row["budget"] = {"accuracy": float((logits.argmax(-1) == data.test.y).double().mean()),
                         "mflops": expected_cost(idx, cum) / 1e6, "budget_mflops": budget / 1e6,
                         "mismatches": int((idx != picked_idx).sum() + (logits.argmax(-1) != picked.argmax(-1)).sum())}
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(cfg: AttentionConfig, out: Path, prepare, progress: bool = True) -> dict:
    from metadyn.data.augment import AUGMENTS

    _check(cfg)
    device = pick_device(cfg.device)
    data = load_data(cfg.data, cfg.seed)
    for attention in ("none", "own", "later"):  # build everything (and fail on bad input) before touching `out`
        probe = _build(cfg, data, attention, cfg.seeds[0])
        build_method(cfg.train.method, cfg.train.method_options, probe, data.in_shape)
    add_detachable(probe, cfg.attention.tune_heads)
    augment = AUGMENTS[cfg.train.augment]
    a = cfg.attention
    stage2 = dataclasses.replace(cfg.train, epochs=a.transfer_epochs, lr=a.transfer_lr)
    prepare()

    ref_full = None
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    distances: dict[str, list[list[float]]] = {"init": [], "detachable": [], "detachable_no_at": []}
    removed: dict[str, list] = {"own": [], "detachable": [], "detachable_no_at": []}
    for seed in cfg.seeds:
        ck = out / "checkpoints" / f"seed{seed}"
        ck.mkdir(parents=True, exist_ok=True)
        trained = {}
        for attention in ("none", "own", "later"):  # stage 1: the same initialisation and batch order
            model = _build(cfg, data, attention, seed)
            loss = build_method(cfg.train.method, cfg.train.method_options, model, data.in_shape)
            seed_everything(seed)
            train(model, loss, data, cfg.train, augment, seed, device, ck / f"{attention}.pt", progress)
            if attention == "none":
                ref_full = float(exit_costs(model, data.in_shape).full)  # the same for every seed
            trained[attention] = model
        for name, beta in (("detachable", a.beta), ("detachable_no_at", 0.0)):  # stage 2 from the later model
            model = copy.deepcopy(trained["later"])
            seed_everything(seed)
            add_detachable(model, a.tune_heads)
            if name == "detachable":
                distances["init"].append(transfer_distances(model, data.test.x, a.p, cfg.eval_batch_size))
            seed_everything(seed)
            train(model, detachable_loss(beta, a.p), data, stage2, augment, seed, device, ck / f"{name}.pt", progress)
            distances[name].append(transfer_distances(model, data.test.x, a.p, cfg.eval_batch_size))
            prune_later(model)
            trained[name] = model
        for name in ("own", "detachable", "detachable_no_at"):
            removed[name].append(prune_saturated(trained[name], data.val.x, tol=a.saturation_tol,
                                                 batch_size=cfg.eval_batch_size))
        for v in VARIANTS:
            runs[v].append(measure(trained[v], data, cfg, ref_full, device))

    variants = {}
    for v in VARIANTS:
        k = len(runs[v][0]["accuracy"])
        stats = [_mean_std([r["accuracy"][i] for r in runs[v]]) for i in range(k)]
        variants[v] = {"label": LABELS[v], "deployable": runs[v][0]["deployable"], "mflops": runs[v][0]["mflops"],
                       "params": runs[v][0]["params"], "accuracy_mean": [m for m, _ in stats],
                       "accuracy_std": [s for _, s in stats], "runs": runs[v],
                       "saturated_removed": removed.get(v)}
    dist = {key: {"mean": [_mean_std([d[i] for d in ds])[0] for i in range(len(ds[0]))],
                  "std": [_mean_std([d[i] for d in ds])[1] for i in range(len(ds[0]))], "runs": ds}
            for key, ds in distances.items()}
    comparisons = compare(runs)
    exits = [{"variant": v, "exit": i, "accuracy": r["accuracy_mean"][i], "accuracy_std": r["accuracy_std"][i],
              "mflops": r["mflops"][i], "deployable": r["deployable"]}
             for v, r in variants.items() for i in range(len(r["mflops"]))]
    curve = []
    for v in VARIANTS:
        pts = [r["budget"] for r in runs[v] if r["budget"] is not None]
        if pts:
            curve.append({"variant": v, "mflops": statistics.fmean(p["mflops"] for p in pts),
                          "accuracy": statistics.fmean(p["accuracy"] for p in pts),
                          "mismatches": sum(p["mismatches"] for p in pts)})
    extra = {"variants": variants, "transfer_distance": dist, "comparisons": comparisons, "seeds": cfg.seeds,
             "reference_full_mflops": ref_full / 1e6,
             "splits": {n: len(getattr(data, n)) for n in ("train", "val", "calib", "test")}}
    metrics = {"dataset": cfg.data.name, "seed": cfg.seed, "device": str(device), "exits": exits, "curve": curve,
               "extra": extra}
    plot_variants(out / "accuracy_vs_mflops.png", variants, f"{cfg.task} (test)")
    atomic_write_text(out / "report.md", report(cfg, metrics))
    return metrics


PAIRS = (("own", "none"), ("later", "none"), ("detachable", "own"), ("detachable", "detachable_no_at"),
         ("detachable", "none"))


def compare(runs: dict[str, list[dict]]) -> list[dict]:
    """Per early exit, the paired (same seed) accuracy difference of each pair in PAIRS: mean, std and a
    verdict — better/worse when the mean exceeds twice its standard error (std / sqrt(seeds)), else no clear
    difference (one seed: no verdict)."""
    rows = []
    for a, b in PAIRS:
        k = len(runs[a][0]["accuracy"])
        for i in range(k - 1):
            d = [ra["accuracy"][i] - rb["accuracy"][i] for ra, rb in zip(runs[a], runs[b])]
            m, s = _mean_std(d)
            n = len(d)
            if n < 2:
                verdict = "one seed: no verdict"
            elif abs(m) > 2 * s / n ** 0.5 and m != 0:
                verdict = "better" if m > 0 else "worse"
            else:
                verdict = "no clear difference"
            rows.append({"variant": a, "against": b, "exit": i, "difference": m, "std": s, "verdict": verdict})
    return rows


def report(cfg: AttentionConfig, m: dict) -> str:
    e = m["extra"]
    var = e["variants"]
    k = len(var["none"]["mflops"])
    rows = []
    for v, r in var.items():
        row = {"variant": f"`{v}`", "what": r["label"], "params": r["params"]}
        for i in range(k):
            acc, std = 100 * r["accuracy_mean"][i], 100 * r["accuracy_std"][i]
            row[f"e{i}"] = f"{acc:.2f} ± {std:.2f} ({r['mflops'][i]:.3f})"
        rows.append(row)
    acc_table = markdown_table(rows, [("variant", "variant", ""), ("what", "attention on the early exits", ""),
                                      ("params", "parameters", "d")]
                               + [(f"e{i}", f"exit {i}", "") for i in range(k)])
    d = e["transfer_distance"]
    drow = [{"what": what, **{f"e{i}": f"{d[key]['mean'][i]:.3f} ± {d[key]['std'][i]:.3f}"
                              for i in range(k - 1)}}
            for key, what in (("init", "detachable modules at initialisation"),
                              ("detachable", f"after stage 2 with attention transfer (β = {cfg.attention.beta:g})"),
                              ("detachable_no_at", "after stage 2 with CE only (β = 0)"))]
    dist_table = markdown_table(drow, [("what", "detachable vs later-layer attention", "")]
                                + [(f"e{i}", f"exit {i}", "") for i in range(k - 1)])
    brow = []
    for v, r in var.items():
        pts = [x["budget"] for x in r["runs"] if x["budget"] is not None]
        if not pts:
            brow.append({"variant": f"`{v}`", "acc": "not deployable" if not r["deployable"] else
                         "budget below its cheapest thresholds"})
            continue
        am, asd = _mean_std([p["accuracy"] for p in pts])
        brow.append({"variant": f"`{v}`", "acc": f"{100 * am:.2f} ± {100 * asd:.2f}",
                     "mf": statistics.fmean(p["mflops"] for p in pts), "mis": sum(p["mismatches"] for p in pts)})
    budget_table = markdown_table(brow, [("variant", "variant", ""), ("acc", "test acc. (%)", ""),
                                         ("mf", "test MFLOPs", ".3f"), ("mis", "dynamic vs picked mismatches", "d")])
    crow = [{"pair": f"`{c['variant']}` − `{c['against']}`", "exit": c["exit"],
             "diff": f"{100 * c['difference']:+.2f} ± {100 * c['std']:.2f}", "verdict": c["verdict"]}
            for c in e["comparisons"]]
    cmp_table = markdown_table(crow, [("pair", "pair (same seeds)", ""), ("exit", "exit", ""),
                                      ("diff", "accuracy difference (points), mean ± std", ""),
                                      ("verdict", "verdict", "")])
    removed = {v: sum(len(x) for x in var[v]["saturated_removed"]) for v in ("own", "detachable", "detachable_no_at")}
    a = cfg.attention
    return f"""# {cfg.task}

`{cfg.model.backbone}` {cfg.model.options or ''} on `{cfg.data.name}` (splits {e['splits']}, split seed {cfg.seed}),
training seeds {cfg.seeds}, device `{m['device']}`. Stage 1: {cfg.train.epochs} epochs of `{cfg.train.method}`
({cfg.train.optimizer}, lr {cfg.train.lr}, batch {cfg.train.batch_size}, augment `{cfg.train.augment}`), the same
initialisation and batch order for `none`, `own` and `later`. Stage 2 (from the trained `later` network):
{a.transfer_epochs} epochs at lr {a.transfer_lr} of exit CE + β/2 · attention transfer (p = {a.p:g}) for the detachable
modules{' and the early heads' if a.tune_heads else ''}; trunk, final exit and later-layer modules frozen; then the
later-layer modules are pruned. Later-layer masks read the `{a.source}` stage. Every number is on `test`; thresholds
are fitted on `val`. MFLOPs: `torch.utils.flop_counter` (2 per multiply-add), cumulative over the exits on the way.

## Test accuracy % per exit, mean ± std over seeds (cumulative MFLOPs)

The `later` variant's MFLOPs include the later stages its masks need: leaving early saves nothing, so it is an upper
bound, not a deployable network. `detachable*` are measured after pruning (their parameters and MFLOPs exclude the
later-layer modules).

{acc_table}

## Attention-transfer distance on test (‖Q_det/‖Q_det‖ − Q_later/‖Q_later‖‖₂, in [0, 2])

{dist_table}

## Early exit at {100 * a.budget_fraction:.0f}% of the no-attention network's {e['reference_full_mflops']:.3f} MFLOPs

Confidence thresholds fitted on `val` (MSDNet's geometric family), run on `test` with batch compaction
(`dynamic_exit`); "mismatches" counts disagreements with picking from the full forward, summed over seeds.

{budget_table}

## Paired differences (same seeds)

"better"/"worse" when the mean difference exceeds twice its standard error over seeds.

{cmp_table}

Masks ≈1 everywhere on val (within {a.saturation_tol:g}) removed: own {removed['own']}, detachable
{removed['detachable']}, control {removed['detachable_no_at']} (summed over seeds and exits).

![accuracy vs MFLOPs](accuracy_vs_mflops.png)
"""


def plot_variants(path: Path, variants: dict, title: str = "") -> None:
    """Every variant's exits: mean test accuracy (± std over seeds) against cumulative MFLOPs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for j, (v, r) in enumerate(variants.items()):
        ax.errorbar(r["mflops"], [100 * a for a in r["accuracy_mean"]], yerr=[100 * s for s in r["accuracy_std"]],
                    fmt="o-" if r["deployable"] else "s:", capsize=3, color=f"C{j}",
                    label=v + ("" if r["deployable"] else " (not deployable)"))
    finish_curve_plot(fig, ax, path, title or "exit attention", xlabel="MFLOPs per sample (cumulative)", legend_size=7)


TASK_KINDS.register("attention", TaskKind(AttentionConfig, run))
