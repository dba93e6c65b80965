"""Task kinds ``skipnet`` and ``blockdrop``: learned layer skipping, evaluated with real skipping.

Protocol (leak-free): the always-on ResNet is trained on ``train`` with the core's :func:`fit`; every gated
network is trained on ``train`` too. The reward/penalty knob (SkipNet's ``alpha``, BlockDrop's ``gamma``) is
swept; the reported operating point is the one with the fewest ``val`` MFLOPs whose ``val`` accuracy is
within ``max_val_drop`` of the always-on network's (or, if none is, the most accurate on ``val``). ``test``
is used for nothing but the numbers in the report. ``calib`` is not used. Every gated evaluation runs with
real skipping (autograd off: a block computes only on the samples whose gate is on).

* ``skipnet`` (Wang et al., ECCV 2018): the always-on ResNet's weights, with fresh gates, go through
  supervised pre-training with relaxed gates (``supervised``), then, for each ``alpha``, the hybrid
  REINFORCE objective (``hybrid``).
* ``blockdrop`` (Wu et al., CVPR 2018): for each ``gamma``, a policy network learns on the frozen always-on
  ResNet under the curriculum (``curriculum``; epoch t learns the last t blocks), then policy and ResNet
  are fine-tuned jointly (``finetune``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metadyn.config import TaskConfig, checked_call
from metadyn.core.backbones.resnet import resnet_exits
from metadyn.core.calibration import ece
from metadyn.core.flops import exit_costs
from metadyn.core.gates import (
    BlockDropNet,
    Curriculum,
    GatedCosts,
    GatedResNet,
    PolicyNet,
    blockdrop_loss,
    gated_ce,
    gated_costs,
    policy_counts,
    skipnet_loss,
)
from metadyn.core.inference import collect_logits
from metadyn.core.train import fit, pick_device, save_checkpoint, seed_everything
from metadyn.errors import InputError
from metadyn.registry import METHODS, TASK_KINDS
from metadyn.runner import TaskKind, atomic_write_text
from metadyn.runner.anytime import DataSpec, FitSpec, TrainSpec
from metadyn.runner.report import finish_curve_plot, markdown_table, pyplot

TOP_POLICIES = 10


@dataclass
class StageSpec(FitSpec):
    """One training stage of a gated network (``fit`` arguments, Adam defaults)."""

    epochs: int = 10
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0


@dataclass
class SkipNetModelSpec:
    depth: int = 20
    width: int = 16
    gate: str = "ff"  # ff (a feed-forward gate per block) | rnn (one shared LSTM)
    embed_dim: int = 10
    hidden_dim: int = 10


@dataclass
class BlockDropModelSpec:
    depth: int = 20
    width: int = 16
    policy_width: int = 8  # the policy network is a ResNet-8 of this width
    policy_downsample: int = 2  # on the input average-pooled by this factor
    alpha: float = 0.8  # exploration bound of the keep probabilities


@dataclass
class SkipNetConfig(TaskConfig):
    kind: str = "skipnet"
    data: DataSpec = field(default_factory=DataSpec)
    model: SkipNetModelSpec = field(default_factory=SkipNetModelSpec)
    pretrain: TrainSpec = field(default_factory=TrainSpec)  # the always-on ResNet
    supervised: StageSpec = field(default_factory=StageSpec)  # relaxed gates, cross-entropy
    hybrid: StageSpec = field(default_factory=StageSpec)  # REINFORCE on the gates, one run per alpha
    alphas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    max_val_drop: float = 0.01
    eval_batch_size: int = 256


@dataclass
class BlockDropConfig(TaskConfig):
    kind: str = "blockdrop"
    data: DataSpec = field(default_factory=DataSpec)
    model: BlockDropModelSpec = field(default_factory=BlockDropModelSpec)
    pretrain: TrainSpec = field(default_factory=TrainSpec)  # the always-on ResNet
    curriculum: StageSpec = field(default_factory=StageSpec)  # policy only, ResNet frozen
    finetune: StageSpec = field(default_factory=StageSpec)  # policy and ResNet jointly (epochs 0: skip)
    gammas: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 5.0])
    max_val_drop: float = 0.01
    eval_batch_size: int = 256


# --------------------------------------------------------------------------- validation and building


def _check_positive(value, key: str, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise InputError(f"{key} must be a {'non-negative' if allow_zero else 'positive'} number, got {value}")


def _check_sweep(values: Sequence[float], key: str) -> None:
    if not values:
        raise InputError(f"{key} must list at least one value")
    for i, v in enumerate(values):
        _check_positive(v, f"{key}[{i}]", allow_zero=True)
    if len(set(values)) != len(values):
        raise InputError(f"{key} has repeated values: {list(values)}")


def _build(cfg: SkipNetConfig | BlockDropConfig):
    """Validate the config and load data, build the always-on ResNet and its loss (no side effects)."""
    from metadyn.data import load_classification

    cfg.pretrain.check("pretrain")
    _check_positive(cfg.max_val_drop, "max_val_drop", allow_zero=True)
    if cfg.eval_batch_size < 1:
        raise InputError(f"eval_batch_size must be at least 1, got {cfg.eval_batch_size}")
    d = cfg.data
    data = load_classification(d.name, root=d.root, seed=cfg.seed, val_fraction=d.val_fraction,
                               calib_fraction=d.calib_fraction, test_fraction=d.test_fraction, **d.options)
    depth = cfg.model.depth
    if (depth - 2) % 6 != 0 or depth < 8:
        raise InputError(f"model.depth must be 6n+2 (8, 14, 20, 56, ...), got {depth}")
    if cfg.model.width < 1:
        raise InputError(f"model.width must be positive, got {cfg.model.width}")
    backbone = resnet_exits(data.in_shape, data.num_classes, depth=depth, exits=((depth - 2) // 2,),
                            width=cfg.model.width)
    loss = checked_call(METHODS.get(cfg.pretrain.method), cfg.pretrain.method_options, "pretrain.method_options")
    return data, backbone, loss


def _fit(model, data, loss, spec: StageSpec | TrainSpec, seed: int, device, checkpoint: Path, progress: bool,
         callbacks=()):
    return fit(model, data.train, loss=loss, **spec.fit_kwargs(), seed=seed, device=device, callbacks=callbacks,
               checkpoint=checkpoint, progress=progress)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_gated(net: GatedResNet | BlockDropNet, split, costs: GatedCosts, batch_size: int = 256) -> dict:
    """Greedy decisions, real skipping: accuracy, MFLOPs per sample, blocks used and the policies taken."""
    p = next(net.parameters())
    net.eval()
    net.mode = "greedy"
    logits, actions = [], []
    for s in range(0, len(split), batch_size):
        out = net(split.x[s : s + batch_size].to(p.device, p.dtype))
        logits.append(out.logits.float().cpu())
        actions.append(out.actions.cpu())
    lg, act = torch.cat(logits), torch.cat(actions)
    n = len(split)
    pols = policy_counts(act)
    return {"accuracy": float((lg.argmax(-1) == split.y).double().mean()), "mflops": float(costs.mflops(act).mean()),
            "blocks_used": float(act.sum(1).mean()), "block_usage": act.mean(0).tolist(),
            "distinct_policies": len(pols), "ece": ece(lg, split.y),
            "top_policies": [{"policy": k, "fraction": c / n} for k, c in pols[:TOP_POLICIES]]}


def always_on_metrics(backbone, data, batch_size: int) -> dict:
    """Accuracy and MFLOPs of the ungated ResNet (every block, no gates) on val and test."""
    mflops = exit_costs(backbone, data.in_shape).full / 1e6
    res = {"mflops": mflops, "blocks_used": float(len(backbone.blocks))}
    for name in ("val", "test"):
        split = data.split(name)
        lg = collect_logits(backbone, split.x, batch_size)[-1]
        acc = float((lg.argmax(-1) == split.y).double().mean())
        if name == "test":
            res.update(accuracy=acc, ece=ece(lg, split.y))
        else:
            res["val_accuracy"] = acc
    return res


def select_point(points: Sequence[dict], reference_val_accuracy: float, max_drop: float) -> dict:
    """The point with the fewest val MFLOPs whose val accuracy is at least ``reference - max_drop``; if none
    is, the most accurate on val. Only val numbers are looked at."""
    ok = [p for p in points if p["val_accuracy"] >= reference_val_accuracy - max_drop - 1e-12]
    if ok:
        return min(ok, key=lambda p: (p["val_mflops"], -p["val_accuracy"]))
    return max(points, key=lambda p: (p["val_accuracy"], -p["val_mflops"]))


def _point(knob: str, value: float, net, data, costs: GatedCosts, batch_size: int) -> dict:
    val = evaluate_gated(net, data.val, costs, batch_size)
    test = evaluate_gated(net, data.test, costs, batch_size)
    return {knob: value, "val_accuracy": val["accuracy"], "val_mflops": val["mflops"], **test}


# --------------------------------------------------------------------------- task kinds


def run_skipnet(cfg: SkipNetConfig, out: Path, prepare, progress: bool = True) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data, backbone, pre_loss = _build(cfg)
    cfg.supervised.check("supervised")
    cfg.hybrid.check("hybrid")
    _check_sweep(cfg.alphas, "alphas")
    m = cfg.model
    torch.manual_seed(cfg.seed + 1)  # gates initialised the same whether or not the ResNet is trained in this call
    gated = GatedResNet(copy.deepcopy(backbone), gate=m.gate, embed_dim=m.embed_dim, hidden_dim=m.hidden_dim)
    prepare()

    s = cfg.seed
    _fit(backbone, data, pre_loss, cfg.pretrain, s, device, out / "checkpoint_resnet.pt", progress)
    always_on = always_on_metrics(backbone.eval(), data, cfg.eval_batch_size)

    gated.backbone.load_state_dict(backbone.state_dict())
    gated.mode = "relaxed"
    _fit(gated, data, gated_ce, cfg.supervised, s, device, out / "checkpoint_supervised.pt", progress)
    costs = gated_costs(gated, data.in_shape)
    supervised = _point("alpha", None, gated, data, costs, cfg.eval_batch_size)

    points, nets = [], []
    for alpha in cfg.alphas:
        net = copy.deepcopy(gated)
        net.mode = "sample"
        _fit(net, data, skipnet_loss(alpha), cfg.hybrid, s, device, out / f"checkpoint_alpha_{alpha:g}.pt", progress)
        points.append(_point("alpha", alpha, net, data, costs, cfg.eval_batch_size))
        nets.append(net)
    return _finish(cfg, out, device, "alpha", points, nets, always_on, costs, {"supervised": supervised})


def run_blockdrop(cfg: BlockDropConfig, out: Path, prepare, progress: bool = True) -> dict:
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    data, backbone, pre_loss = _build(cfg)
    cfg.curriculum.check("curriculum")
    cfg.finetune.check("finetune", min_epochs=0)
    _check_sweep(cfg.gammas, "gammas")
    m = cfg.model
    torch.manual_seed(cfg.seed + 1)  # one policy initialisation, shared by every gamma
    policy = PolicyNet(data.in_shape, len(backbone.blocks), width=m.policy_width, downsample=m.policy_downsample)
    BlockDropNet(backbone, policy, m.alpha)  # validates alpha before anything is written
    prepare()

    s = cfg.seed
    _fit(backbone, data, pre_loss, cfg.pretrain, s, device, out / "checkpoint_resnet.pt", progress)
    always_on = always_on_metrics(backbone.eval(), data, cfg.eval_batch_size)

    points, nets, curriculum = [], [], []
    costs = None
    for gamma in cfg.gammas:
        net = BlockDropNet(copy.deepcopy(backbone), copy.deepcopy(policy), m.alpha).freeze_backbone()
        costs = costs or gated_costs(net, data.in_shape)
        net.mode = "sample"
        tag = f"gamma_{gamma:g}"
        _fit(net, data, blockdrop_loss(gamma), cfg.curriculum, s, device, out / f"checkpoint_{tag}_curriculum.pt",
             progress, callbacks=[Curriculum(net)])
        net.learn_last = None
        curriculum.append(_point("gamma", gamma, net, data, costs, cfg.eval_batch_size))
        if cfg.finetune.epochs > 0:
            net.freeze_backbone(False)
            net.mode = "sample"
            _fit(net, data, blockdrop_loss(gamma, joint=True), cfg.finetune, s, device,
                 out / f"checkpoint_{tag}_finetune.pt", progress)
        points.append(_point("gamma", gamma, net, data, costs, cfg.eval_batch_size))
        nets.append(net)
    return _finish(cfg, out, device, "gamma", points, nets, always_on, costs, {"curriculum_only": curriculum})


def _finish(cfg, out: Path, device, knob: str, points: list[dict], nets: list, always_on: dict,
            costs: GatedCosts, extra: dict) -> dict:
    chosen = select_point(points, always_on["val_accuracy"], cfg.max_val_drop)
    k = points.index(chosen)
    save_checkpoint({"model": nets[k].state_dict(), knob: chosen[knob]}, out / "checkpoint.pt")
    title = f"{cfg.task} (test)"
    plot_tradeoff(out / "accuracy_vs_mflops.png", points, knob, always_on, chosen, title)
    plot_block_usage(out / "block_usage.png", chosen["block_usage"], f"blocks run by the chosen network ({knob} = "
                     f"{chosen[knob]:g}, test)")
    metrics = {
        "dataset": cfg.data.name, "seed": cfg.seed, "device": str(device),
        "exits": [{"exit": 0, "accuracy": chosen["accuracy"], "mflops": chosen["mflops"], "ece": chosen["ece"],
                   knob: chosen[knob]}],
        "curve": [{"mflops": p["mflops"], "accuracy": p["accuracy"], knob: p[knob]}
                  for p in sorted(points, key=lambda p: p["mflops"])],
        "extra": {"knob": knob, "chosen": chosen, "always_on": always_on, "sweep": points,
                  "num_blocks": len(nets[k].backbone.blocks), "fixed_mflops": costs.fixed / 1e6,
                  "block_mflops": [b / 1e6 for b in costs.blocks], **extra},
    }
    atomic_write_text(out / "report.md", report(cfg, metrics))
    return metrics


# --------------------------------------------------------------------------- report


def report(cfg, m: dict) -> str:
    e = m["extra"]
    knob, c, a, k = e["knob"], e["chosen"], e["always_on"], e["num_blocks"]
    skipnet = knob == "alpha"
    full = a["mflops"]

    def row(name, r, value=None):
        return {"name": name, "knob": value, "acc": 100 * r["accuracy"],
                "val": 100 * r["val_accuracy"] if "val_accuracy" in r else None, "mflops": r["mflops"],
                "pct": 100 * r["mflops"] / full, "blocks": r["blocks_used"], "distinct": r.get("distinct_policies")}

    cols = [("name", "network", ""), ("knob", knob, ".3g"), ("val", "val acc. (%)", ".2f"),
            ("acc", "test acc. (%)", ".2f"), ("mflops", "MFLOPs", ".3f"), ("pct", "% of always-on", ".0f"),
            ("blocks", f"blocks run (of {k})", ".2f"), ("distinct", "distinct policies", "")]
    rows = [row("always-on ResNet", a)]
    if skipnet:
        rows.append(row("SkipNet after supervised pre-training", e["supervised"]))
    rows.append(row(f"{'SkipNet' if skipnet else 'BlockDrop'}, chosen on val", c, c[knob]))
    main_table = markdown_table(rows, cols)
    sweep = [row("", p, p[knob]) for p in e["sweep"]]
    sweep_table = markdown_table(sweep, cols[1:])
    if not skipnet:
        cur = [row("", p, p[knob]) for p in e["curriculum_only"]]
        sweep_table += "\n\nAfter the curriculum alone (ResNet frozen, before joint fine-tuning):\n\n"
        sweep_table += markdown_table(cur, cols[1:])
    pol_rows = [{"policy": f"`{p['policy']}`", "n": sum(ch == "1" for ch in p["policy"]), "pct": 100 * p["fraction"]}
                for p in c["top_policies"]]
    pol_table = markdown_table(pol_rows, [("policy", "policy (block 1 first, 1 = run)", ""),
                                          ("n", "blocks run", ""), ("pct", "% of test samples", ".1f")])
    usage = " ".join(f"{100 * u:.0f}" for u in c["block_usage"])
    drop = 100 * (a["accuracy"] - c["accuracy"])
    fewer = c["mflops"] < full
    verdict = ("meets" if fewer and drop <= 1.0 + 1e-9 else "does NOT meet")
    if skipnet:
        method = (f"SkipNet with {cfg.model.gate} gates on a ResNet-{cfg.model.depth} (width {cfg.model.width}). "
                  f"Stages (epochs): the always-on ResNet ({cfg.pretrain.epochs}), supervised pre-training with "
                  f"relaxed gates ({cfg.supervised.epochs}), then the hybrid REINFORCE objective "
                  f"({cfg.hybrid.epochs}) for each alpha.")
    else:
        method = (f"BlockDrop on a ResNet-{cfg.model.depth} (width {cfg.model.width}), policy network a ResNet-8 of "
                  f"width {cfg.model.policy_width} on the input pooled by {cfg.model.policy_downsample}, exploration "
                  f"bound {cfg.model.alpha}. Stages (epochs): the always-on ResNet ({cfg.pretrain.epochs}), the "
                  f"curriculum on the frozen ResNet ({cfg.curriculum.epochs}), then joint fine-tuning "
                  f"({cfg.finetune.epochs}) for each gamma.")
    return f"""# {cfg.task}

{method} Dataset `{cfg.data.name}`, seed {cfg.seed}, device `{m['device']}`.
The operating point is the {knob} with the fewest val MFLOPs whose val accuracy is within
{100 * cfg.max_val_drop:.1f} points of the always-on network's (else the most accurate on val); every
accuracy and MFLOPs figure below is on `test`, measured with real skipping (a block computes only on the
samples whose gate is on). MFLOPs are counted by `torch.utils.flop_counter` (2 FLOPs per multiply-add) per
block, plus every sample's stem, head and {'gates' if skipnet else 'policy network'}
({e['fixed_mflops']:.3f} MFLOPs fixed per sample).

## Result

{main_table}

Against the always-on network: test accuracy {100 * c['accuracy']:.2f}% vs {100 * a['accuracy']:.2f}%
({0.0 - drop:+.2f} points) at {100 * c['mflops'] / full:.0f}% of its FLOPs — this {verdict} the bar of at most 1 point
lost at fewer FLOPs.

## Accuracy vs FLOPs over {knob}

{sweep_table}

![accuracy vs MFLOPs](accuracy_vs_mflops.png)

## Policies of the chosen network (test)

{c['distinct_policies']} distinct policies; the {len(pol_rows)} most frequent:

{pol_table}

Share of test samples running each block (%, block 1 first): {usage}

![block usage](block_usage.png)
"""


def plot_tradeoff(path: Path, points: Sequence[dict], knob: str, always_on: dict, chosen: dict, title: str) -> None:
    """Test accuracy vs MFLOPs of every swept knob value, the chosen one and the always-on network."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    pts = sorted(points, key=lambda p: p["mflops"])
    ax.plot([p["mflops"] for p in pts], [100 * p["accuracy"] for p in pts], "o-", label=f"gated, one point per {knob}")
    for p in pts:
        ax.annotate(f"{p[knob]:g}", (p["mflops"], 100 * p["accuracy"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
    ax.plot([chosen["mflops"]], [100 * chosen["accuracy"]], "*", ms=14, color="tab:red", label="chosen on val")
    ax.plot([always_on["mflops"]], [100 * always_on["accuracy"]], "s", color="gray", label="always-on ResNet")
    finish_curve_plot(fig, ax, path, title)


def plot_block_usage(path: Path, usage: Sequence[float], title: str) -> None:
    """Share of samples running each block."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(range(1, len(usage) + 1), [100 * u for u in usage], color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("samples running it (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TASK_KINDS.register("skipnet", TaskKind(SkipNetConfig, run_skipnet))
TASK_KINDS.register("blockdrop", TaskKind(BlockDropConfig, run_blockdrop))
