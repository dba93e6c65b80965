"""Task kinds ``skipnet`` and ``blockdrop``: learned layer skipping, evaluated with real skipping.

Protocol (leak-free): the always-on ResNet is trained on ``train``; every gated network is trained on
``train`` too. The reward/penalty knob (SkipNet's ``alpha``, BlockDrop's ``gamma``) is swept; the operating
point is the one with the fewest ``val`` MFLOPs whose ``val`` accuracy is within ``max_val_drop`` of the
always-on network's (else the most accurate on ``val``). ``test`` is used for nothing but the report. Every
gated evaluation runs with real skipping (a block computes only on the samples whose gate is on).

* ``skipnet`` (Wang et al., ECCV 2018): the always-on ResNet's weights, with fresh gates, go through supervised
  pre-training with relaxed gates (``supervised``), then, for each ``alpha``, the hybrid REINFORCE objective.
* ``blockdrop`` (Wu et al., CVPR 2018): for each ``gamma``, a policy network learns on the frozen always-on
  ResNet under the curriculum (epoch t learns the last t blocks), then policy and ResNet are fine-tuned jointly.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from metadyn.config import TaskConfig, spec
from metadyn.core.calibration import ece
from metadyn.core.flops import exit_costs
from metadyn.core.gating import (
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
from metadyn.core.train import save_checkpoint
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind
from metadyn.runner.evaluate import compare, correct, holm
from metadyn.runner.report import comparison_lines, markdown_table, plot_bars, plot_groups, settings_line
from metadyn.runner.specs import DataSpec, EvalSpec, FitSpec, ModelSpec, TrainSpec, build_method, build_model, load_data

TOP_POLICIES = 10


def _stage(**over) -> FitSpec:
    return FitSpec(**{"epochs": 10, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, **over})


@dataclass
class SkipNetModelSpec:
    depth: int = 20
    width: int = spec(16, ge=1)
    gate: str = spec("ff", choices=("ff", "rnn"))  # a feed-forward gate per block | one shared LSTM
    embed_dim: int = spec(10, ge=1)
    hidden_dim: int = spec(10, ge=1)


@dataclass
class BlockDropModelSpec:
    depth: int = 20
    width: int = spec(16, ge=1)
    policy_width: int = spec(8, ge=1)  # the policy network is a ResNet-8 of this width
    policy_downsample: int = spec(2, ge=1)  # on the input average-pooled by this factor
    alpha: float = 0.8  # exploration bound of the keep probabilities


@dataclass
class _GatedConfig(TaskConfig):
    data: DataSpec = field(default_factory=DataSpec)
    pretrain: TrainSpec = field(default_factory=TrainSpec)  # the always-on ResNet
    max_val_drop: float = spec(0.01, ge=0)
    eval: EvalSpec = field(default_factory=lambda: EvalSpec(calibrate=False))


@dataclass
class SkipNetConfig(_GatedConfig):
    kind: str = "skipnet"
    model: SkipNetModelSpec = field(default_factory=SkipNetModelSpec)
    supervised: FitSpec = field(default_factory=_stage)  # relaxed gates, cross-entropy
    hybrid: FitSpec = field(default_factory=_stage)  # REINFORCE on the gates, one run per alpha
    alphas: list[float] = spec(factory=lambda: [0.05, 0.1, 0.2, 0.4], ge=0, nonempty=True, distinct=True)


@dataclass
class BlockDropConfig(_GatedConfig):
    kind: str = "blockdrop"
    model: BlockDropModelSpec = field(default_factory=BlockDropModelSpec)
    curriculum: FitSpec = field(default_factory=_stage)  # policy only, ResNet frozen
    finetune: FitSpec = field(default_factory=_stage)  # policy and ResNet jointly (epochs 0: skip)
    gammas: list[float] = spec(factory=lambda: [0.5, 1.0, 2.0, 5.0], ge=0, nonempty=True, distinct=True)


@torch.no_grad()
def evaluate_gated(net, split, costs: GatedCosts, batch_size: int = 256) -> dict:
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
    pols = policy_counts(act)
    return {"accuracy": float((lg.argmax(-1) == split.y).double().mean()), "mflops": float(costs.mflops(act).mean()),
            "blocks_used": float(act.sum(1).mean()), "block_usage": act.mean(0).tolist(),
            "distinct_policies": len(pols), "ece": ece(lg, split.y), "correct": correct(lg, split.y),
            "top_policies": [{"policy": k, "fraction": c / len(split)} for k, c in pols[:TOP_POLICIES]]}


def select_point(points: Sequence[dict], reference_val_accuracy: float, max_drop: float) -> dict:
    """The point with the fewest val MFLOPs whose val accuracy is at least ``reference - max_drop``; if none
    is, the most accurate on val. Only val numbers are looked at."""
    ok = [p for p in points if p["val_accuracy"] >= reference_val_accuracy - max_drop - 1e-12]
    if ok:
        return min(ok, key=lambda p: (p["val_mflops"], -p["val_accuracy"]))
    return max(points, key=lambda p: (p["val_accuracy"], -p["val_mflops"]))


class _Gated(TaskKind):
    """What SkipNet and BlockDrop share: the always-on ResNet, the sweep over a knob, the chosen point."""

    knob = ""

    def build(self, cfg, device):
        data = load_data(cfg.data, cfg.seed)
        m = cfg.model
        backbone = build_model(ModelSpec("resnet", {"depth": m.depth, "exits": ((m.depth - 2) // 2,), "width": m.width}),
                               data.in_shape, data.num_classes, "model")
        loss = build_method(cfg.pretrain.method, cfg.pretrain.method_options, backbone, data.in_shape,
                            "pretrain.method_options")
        torch.manual_seed(cfg.seed + 1)  # gates / policy initialised the same whether or not the ResNet trains here
        return data, backbone, loss, self.make_gated(cfg, data, backbone)

    def make_gated(self, cfg, data, backbone):
        raise NotImplementedError

    def _fit(self, net, data, loss, stage, cfg, ctx, name: str, callbacks=None):
        from metadyn.runner.specs import train

        return train(net, loss, data.train, stage, cfg.seed, ctx.device, ctx.out / f"checkpoint_{name}.pt",
                     ctx.progress, callbacks=callbacks)

    def point(self, value, net, data, costs, cfg) -> dict:
        val = evaluate_gated(net, data.val, costs, cfg.eval.batch_size)
        return {self.knob: value, "val_accuracy": val["accuracy"], "val_mflops": val["mflops"],
                **evaluate_gated(net, data.test, costs, cfg.eval.batch_size)}

    def execute(self, cfg, built, ctx: Context) -> Results:
        data, backbone, loss, gated = built
        self._fit(backbone, data, loss, cfg.pretrain, cfg, ctx, "resnet")
        backbone.eval()
        always = {"mflops": exit_costs(backbone, data.in_shape).full / 1e6, "blocks_used": float(len(backbone.blocks))}
        for name in ("val", "test"):
            lg = collect_logits(backbone, data.split(name).x, cfg.eval.batch_size)[-1]
            acc = float((lg.argmax(-1) == data.split(name).y).double().mean())
            always.update({"val_accuracy": acc} if name == "val" else
                          {"accuracy": acc, "ece": ece(lg, data.test.y), "correct": correct(lg, data.test.y)})
        points, nets, extra = self.sweep(cfg, data, backbone, gated, ctx)
        chosen = select_point(points, always["val_accuracy"], cfg.max_val_drop)
        k = points.index(chosen)
        save_checkpoint({"model": nets[k].state_dict(), self.knob: chosen[self.knob]}, ctx.out / "checkpoint.pt")
        comps = holm([compare("chosen", "always-on", "test", chosen["correct"], always["correct"])])
        costs = extra.pop("costs")
        for p in [always, *points, *(x for v in extra.values() for x in (v if isinstance(v, list) else [v]))]:
            p.pop("correct", None)
        rows = [{"group": "always-on", "exit": 0, **always}] + [
            {"group": f"{self.knob}={p[self.knob]:g}", "exit": 0, **p} for p in points]
        curves = [{"group": "gated (test)", "mflops": p["mflops"], "accuracy": p["accuracy"], self.knob: p[self.knob]}
                  for p in sorted(points, key=lambda p: p["mflops"])]
        extra.update(knob=self.knob, chosen=chosen, always_on=always, num_blocks=len(backbone.blocks),
                     fixed_mflops=costs.fixed / 1e6, block_mflops=[b / 1e6 for b in costs.blocks])
        return Results(cfg.data.name, rows, curves, comparisons=comps, extra=extra)

    def plots(self, cfg, res, out):
        c = res.extra["chosen"]
        plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test)")
        plot_bars(out / "block_usage.png", c["block_usage"], "block", "samples running it (%)",
                  f"blocks run by the chosen network ({self.knob} = {c[self.knob]:g}, test)", start=1)

    def report(self, cfg, res, m):
        e = res.extra
        c, a, full = e["chosen"], e["always_on"], e["always_on"]["mflops"]
        cols = [("group", "network", ""), ("val", "val acc. (%)", ".2f"), ("acc", "test acc. (%)", ".2f"),
                ("mflops", "MFLOPs", ".3f"), ("pct", "% of always-on", ".0f"),
                ("blocks_used", f"blocks run (of {e['num_blocks']})", ".2f"), ("distinct_policies", "policies", "")]

        def table(rows):
            return markdown_table([{**r, "acc": 100 * r["accuracy"], "val": 100 * r["val_accuracy"],
                                    "pct": 100 * r["mflops"] / full} for r in rows], cols)

        extra = "".join(f"\n\n`{name}`:\n\n" + table([{"group": f"{self.knob}={p[self.knob]}", **p}
                                                      for p in (v if isinstance(v, list) else [v])])
                        for name, v in e.items() if name in ("supervised", "curriculum_only"))
        pols = markdown_table([{"policy": f"`{p['policy']}`", "n": p["policy"].count("1"), "pct": 100 * p["fraction"]}
                               for p in c["top_policies"]], [("policy", "policy (block 1 first, 1 = run)", ""),
                                                             ("n", "blocks run", ""), ("pct", "% of test samples", ".1f")])
        drop = 100 * (a["accuracy"] - c["accuracy"])
        verdict = "meets" if c["mflops"] < full and drop <= 1.0 + 1e-9 else "does NOT meet"
        return f"""# {cfg.task}

{self.describe(cfg)} Dataset `{cfg.data.name}`. {settings_line(m)}
The operating point is the {self.knob} with the fewest val MFLOPs whose val accuracy is within
{100 * cfg.max_val_drop:.1f} points of the always-on network's (else the most accurate on val); every test number is
measured with real skipping. MFLOPs: `torch.utils.flop_counter` (2 per multiply-add) per block, plus every
sample's stem, head and gates or policy network ({e['fixed_mflops']:.3f} MFLOPs fixed per sample).

## Result

Chosen: {self.knob} = {c[self.knob]:g}, test accuracy {100 * c['accuracy']:.2f}% vs {100 * a['accuracy']:.2f}% always-on
({-drop:+.2f} points) at {100 * c['mflops'] / full:.0f}% of its FLOPs — this {verdict} the bar of at most 1 point lost
at fewer FLOPs.

{comparison_lines(res.comparisons, "the test samples")}

## Accuracy vs FLOPs over {self.knob}

{table(res.rows)}{extra}

![accuracy vs MFLOPs](accuracy_vs_mflops.png)

## Policies of the chosen network (test): {c['distinct_policies']} distinct, the most frequent

{pols}

![block usage](block_usage.png)
"""


@TASK_KINDS.register("skipnet")
class SkipNet(_Gated):
    config = SkipNetConfig
    knob = "alpha"

    def make_gated(self, cfg, data, backbone):
        m = cfg.model
        return GatedResNet(copy.deepcopy(backbone), gate=m.gate, embed_dim=m.embed_dim, hidden_dim=m.hidden_dim)

    def describe(self, cfg) -> str:
        return (f"SkipNet with {cfg.model.gate} gates on a ResNet-{cfg.model.depth} (width {cfg.model.width}): the "
                f"always-on ResNet ({cfg.pretrain.epochs} epochs), supervised pre-training with relaxed gates "
                f"({cfg.supervised.epochs}), then the hybrid REINFORCE objective ({cfg.hybrid.epochs}) for each alpha.")

    def sweep(self, cfg, data, backbone, gated, ctx):
        gated.backbone.load_state_dict(backbone.state_dict())
        gated.mode = "relaxed"
        self._fit(gated, data, gated_ce, cfg.supervised, cfg, ctx, "supervised")
        costs = gated_costs(gated, data.in_shape)
        supervised = self.point(None, gated, data, costs, cfg)
        points, nets = [], []
        for alpha in cfg.alphas:
            net = copy.deepcopy(gated)
            net.mode = "sample"
            self._fit(net, data, skipnet_loss(alpha), cfg.hybrid, cfg, ctx, f"alpha_{alpha:g}")
            points.append(self.point(alpha, net, data, costs, cfg))
            nets.append(net)
        return points, nets, {"supervised": supervised, "costs": costs}


@TASK_KINDS.register("blockdrop")
class BlockDrop(_Gated):
    config = BlockDropConfig
    knob = "gamma"

    def make_gated(self, cfg, data, backbone):
        m = cfg.model
        policy = PolicyNet(data.in_shape, len(backbone.blocks), width=m.policy_width, downsample=m.policy_downsample)
        BlockDropNet(backbone, policy, m.alpha)  # validates alpha before anything is written
        return policy

    def describe(self, cfg) -> str:
        m = cfg.model
        return (f"BlockDrop on a ResNet-{m.depth} (width {m.width}), policy network a ResNet-8 of width "
                f"{m.policy_width} on the input pooled by {m.policy_downsample}, exploration bound {m.alpha}: the "
                f"always-on ResNet ({cfg.pretrain.epochs} epochs), the curriculum on the frozen ResNet "
                f"({cfg.curriculum.epochs}), then joint fine-tuning ({cfg.finetune.epochs}) for each gamma.")

    def sweep(self, cfg, data, backbone, policy, ctx):
        points, nets, curriculum, costs = [], [], [], None
        for gamma in cfg.gammas:
            net = BlockDropNet(copy.deepcopy(backbone), copy.deepcopy(policy), cfg.model.alpha).freeze_backbone()
            costs = costs or gated_costs(net, data.in_shape)
            net.mode = "sample"
            tag = f"gamma_{gamma:g}"
            self._fit(net, data, blockdrop_loss(gamma), cfg.curriculum, cfg, ctx, f"{tag}_curriculum",
                      callbacks=[Curriculum(net)])
            net.learn_last = None
            curriculum.append(self.point(gamma, net, data, costs, cfg))
            if cfg.finetune.epochs > 0:
                net.freeze_backbone(False)
                net.mode = "sample"
                self._fit(net, data, blockdrop_loss(gamma, joint=True), cfg.finetune, cfg, ctx, f"{tag}_finetune")
            points.append(self.point(gamma, net, data, costs, cfg))
            nets.append(net)
        return points, nets, {"curriculum_only": curriculum, "costs": costs}
