"""Task kinds ``skipnet`` and ``blockdrop``: learned layer skipping, evaluated with real skipping.

Protocol (leak-free): the always-on ResNet is trained on ``train``; every gated network is trained on
``train`` too. The reward/penalty knob (SkipNet's ``alpha``, BlockDrop's ``gamma``) is swept; the operating
point is the one with the fewest ``val`` MFLOPs whose ``val`` accuracy is within ``max_val_drop`` of the
always-on network's (else the most accurate on ``val``). ``test`` is used for nothing but the report. Every
gated evaluation runs with real skipping (a block computes only on the samples whose gate is on).

* ``skipnet`` (Wang et al., ECCV 2018): the always-on ResNet's weights, with fresh gates, go through supervised
  pre-training with relaxed gates (``supervised``), then, for each ``alpha``, the hybrid REINFORCE objective.
* ``blockdrop`` (Wu et al., CVPR 2018): for each ``gamma``, a policy network learns on the frozen always-on
  ResNet under the curriculum (epoch t learns the last t blocks; with the released code's entropy bonus,
  weight ``entropy``), then policy and ResNet are fine-tuned jointly (no entropy bonus, as in the code).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from metadyn.config import TaskConfig, spec
from metadyn.core import evaluation, gating, plots, stats
from metadyn.core.calibration import ece
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits
from metadyn.core.train import save_checkpoint
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, report, specs


def _stage(**over) -> specs.FitSpec:
    return specs.FitSpec(**{"epochs": 10, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, **over})


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
    data: specs.DataSpec = field(default_factory=specs.DataSpec)
    pretrain: specs.TrainSpec = field(default_factory=specs.TrainSpec)  # the always-on ResNet
    max_val_drop: float = spec(0.01, ge=0)
    eval: specs.EvalSpec = field(default_factory=lambda: specs.EvalSpec(calibrate=False))


@dataclass
class SkipNetConfig(_GatedConfig):
    kind: str = "skipnet"
    model: SkipNetModelSpec = field(default_factory=SkipNetModelSpec)
    supervised: specs.FitSpec = field(default_factory=_stage)  # relaxed gates, cross-entropy
    hybrid: specs.FitSpec = field(default_factory=_stage)  # REINFORCE on the gates, one run per alpha
    alphas: list[float] = spec(factory=lambda: [0.05, 0.1, 0.2, 0.4], ge=0, nonempty=True, distinct=True)


@dataclass
class BlockDropConfig(_GatedConfig):
    kind: str = "blockdrop"
    model: BlockDropModelSpec = field(default_factory=BlockDropModelSpec)
    curriculum: specs.FitSpec = field(default_factory=_stage)  # policy only, ResNet frozen
    finetune: specs.FitSpec = field(default_factory=_stage)  # policy and ResNet jointly (epochs 0: skip)
    gammas: list[float] = spec(factory=lambda: [0.5, 1.0, 2.0, 5.0], ge=0, nonempty=True, distinct=True)
    entropy: float = spec(0.1, ge=0)  # curriculum's entropy bonus (cl_training.py's beta; 0: none)


def select_point(points: Sequence[dict], reference_val_accuracy: float, max_drop: float) -> dict:
    """The point with the fewest val MFLOPs whose val accuracy is at least ``reference - max_drop``; if none
    is, the most accurate on val. Only val numbers are looked at."""
    ok = [p for p in points if p["val_accuracy"] >= reference_val_accuracy - max_drop - 1e-12]
    if ok:
        return min(ok, key=lambda p: (p["val_mflops"], -p["val_accuracy"]))
    return max(points, key=lambda p: (p["val_accuracy"], -p["val_mflops"]))


class _Gated(TaskKind):
    """What SkipNet and BlockDrop share: the always-on ResNet, the sweep over a knob, the chosen point.
    Subclasses give ``make_gated`` (built before the folder is touched) and ``sweep`` -> ``(points, nets,
    side points, costs)``; every point is a row of group ``"<knob>=<value>"`` (side points: e.g. after SkipNet's
    supervised stage, or BlockDrop's curriculum alone, labeled so)."""

    knob = ""

    def build(self, cfg, device):
        data, m = specs.load_data(cfg.data, cfg.seed), cfg.model
        resnet = specs.ModelSpec("resnet", {"depth": m.depth, "exits": ((m.depth - 2) // 2,), "width": m.width})
        net = specs.build_model(resnet, data.in_shape, data.num_classes, "model")
        loss = specs.build_method(cfg.pretrain.method, cfg.pretrain.method_options, net, data.in_shape,
                            "pretrain.method_options")
        torch.manual_seed(cfg.seed + 1)  # gates / policy initialised the same whether or not the ResNet trains here
        return data, net, loss, self.make_gated(cfg, data, net)

    def _fit(self, net, data, loss, stage, cfg, ctx, name: str, callbacks=None):
        return specs.train(net, loss, data.train, stage, cfg.seed, ctx.device, ctx.out / f"checkpoint_{name}.pt",
                     ctx.progress, callbacks=callbacks)

    def point(self, group: str, value, net, data, costs, cfg) -> dict:
        val = gating.evaluate_gated(net, data.val.x, data.val.y, costs, cfg.eval.batch_size)
        test = gating.evaluate_gated(net, data.test.x, data.test.y, costs, cfg.eval.batch_size)
        test["ece"] = ece(test.pop("logits"), data.test.y)
        return {"group": group, "exit": 0, self.knob: value, "val_accuracy": val["accuracy"],
                "val_mflops": val["mflops"], **test}

    def execute(self, cfg, built, ctx: Context) -> Results:
        data, backbone, loss, gated = built
        self._fit(backbone, data, loss, cfg.pretrain, cfg, ctx, "resnet")
        backbone.eval()
        always = {"group": "always-on", "exit": 0, "mflops": exit_costs(backbone, data.in_shape).full / 1e6,
                  "blocks_used": float(len(backbone.blocks))}
        for name in ("val", "test"):
            lg, y = collect_logits(backbone, data.split(name).x, cfg.eval.batch_size)[-1], data.split(name).y
            always.update({"val_accuracy": float((lg.argmax(-1) == y).double().mean())} if name == "val" else
                          {"accuracy": float((lg.argmax(-1) == y).double().mean()), "ece": ece(lg, y),
                           "correct": evaluation.correct(lg, y)})
        points, nets, side, costs = self.sweep(cfg, data, backbone, gated, ctx)
        chosen = select_point(points, always["val_accuracy"], cfg.max_val_drop)
        save_checkpoint({"model": nets[points.index(chosen)].state_dict(), self.knob: chosen[self.knob]},
                        ctx.out / "checkpoint.pt")
        comps = stats.holm([stats.compare("chosen", "always-on", "test", chosen["correct"], always["correct"])])
        rows = [always, *points, *side]
        for r in rows:
            r.pop("correct", None)
        curves = [{"group": "gated (test)", "mflops": p["mflops"], "accuracy": p["accuracy"]}
                  for p in sorted(points, key=lambda p: p["mflops"])]
        extra = {"knob": self.knob, "chosen": chosen, "always_on": always, "num_blocks": len(backbone.blocks),
                 "fixed_mflops": costs.fixed / 1e6, "block_mflops": [b / 1e6 for b in costs.blocks]}
        return Results(cfg.data.name, rows, curves, comparisons=comps, extra=extra)

    def plots(self, cfg, res, out):
        c = res.extra["chosen"]
        plots.plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test)")
        plots.plot_bars(out / "block_usage.png", c["block_usage"], "block", "samples running it (%)",
                  f"blocks run by the chosen network ({self.knob} = {c[self.knob]:g}, test)", start=1)

    def sections(self, cfg, res):
        e = res.extra
        c, a, full = e["chosen"], e["always_on"], e["always_on"]["mflops"]
        table = report.markdown_table([{**r, "acc": 100 * r["accuracy"], "val": 100 * r["val_accuracy"],
                                 "pct": 100 * r["mflops"] / full} for r in res.rows],
                               [("group", "network", ""), ("val", "val acc. (%)", ".2f"),
                                ("acc", "test acc. (%)", ".2f"), ("mflops", "MFLOPs", ".3f"),
                                ("pct", "% of always-on", ".0f"), ("distinct_policies", "policies", ""),
                                ("blocks_used", f"blocks run (of {e['num_blocks']})", ".2f")])
        pols = ", ".join(f"`{p['policy']}` {100 * p['fraction']:.1f}%" for p in c["top_policies"])
        drop = 100 * (a["accuracy"] - c["accuracy"])
        verdict = "meets" if c["mflops"] < full and drop <= 1.0 + 1e-9 else "does NOT meet"
        return [("Result", f"Chosen on val: {self.knob} = {c[self.knob]:g}, test accuracy {100 * c['accuracy']:.2f}% "
                 f"vs {100 * a['accuracy']:.2f}% always-on ({-drop:+.2f} points) at {100 * c['mflops'] / full:.0f}% "
                 f"of its FLOPs: this {verdict} the bar of at most 1 point lost at fewer FLOPs. Every sample pays "
                 f"{e['fixed_mflops']:.3f} MFLOPs for the stem, head and gates or policy.\n\n"
                 + report.comparison_lines(res.comparisons, "the test samples")),
                (f"Accuracy vs FLOPs over {self.knob}", f"{table}\n\n![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("Policies of the chosen network (test; block 1 first, 1 = run)",
                 f"{c['distinct_policies']} distinct; the most frequent: {pols}.\n\n![block usage](block_usage.png)")]


@TASK_KINDS.register("skipnet")
class SkipNet(_Gated):
    config = SkipNetConfig
    knob = "alpha"

    def make_gated(self, cfg, data, backbone):
        m = cfg.model
        return gating.GatedResNet(copy.deepcopy(backbone), gate=m.gate, embed_dim=m.embed_dim, hidden_dim=m.hidden_dim)

    def sweep(self, cfg, data, backbone, gated, ctx):
        gated.backbone.load_state_dict(backbone.state_dict())
        gated.mode = "relaxed"
        self._fit(gated, data, gating.gated_ce, cfg.supervised, cfg, ctx, "supervised")
        costs = gating.gated_costs(gated, data.in_shape)
        supervised = self.point("after supervised pre-training", None, gated, data, costs, cfg)
        points, nets = [], []
        for alpha in cfg.alphas:
            net = copy.deepcopy(gated)
            net.mode = "sample"
            self._fit(net, data, gating.skipnet_loss(alpha), cfg.hybrid, cfg, ctx, f"alpha_{alpha:g}")
            points.append(self.point(f"alpha={alpha:g}", alpha, net, data, costs, cfg))
            nets.append(net)
        return points, nets, [supervised], costs


@TASK_KINDS.register("blockdrop")
class BlockDrop(_Gated):
    config = BlockDropConfig
    knob = "gamma"

    def make_gated(self, cfg, data, backbone):
        m = cfg.model
        policy = gating.PolicyNet(data.in_shape, len(backbone.blocks), width=m.policy_width,
                                  downsample=m.policy_downsample)
        gating.BlockDropNet(backbone, policy, m.alpha)  # validates alpha before anything is written
        return policy

    def sweep(self, cfg, data, backbone, policy, ctx):
        points, nets, curriculum, costs = [], [], [], None
        for gamma in cfg.gammas:
            net = gating.BlockDropNet(copy.deepcopy(backbone), copy.deepcopy(policy), cfg.model.alpha).freeze_backbone()
            costs = costs or gating.gated_costs(net, data.in_shape)
            net.mode = "sample"
            tag = f"gamma_{gamma:g}"
            self._fit(net, data, gating.blockdrop_loss(gamma, entropy=cfg.entropy), cfg.curriculum, cfg, ctx,
                      f"{tag}_curriculum",
                      callbacks=[gating.Curriculum(net)])
            net.learn_last = None
            curriculum.append(self.point(f"gamma={gamma:g}, curriculum only", gamma, net, data, costs, cfg))
            if cfg.finetune.epochs > 0:
                net.freeze_backbone(False)
                net.mode = "sample"
                self._fit(net, data, gating.blockdrop_loss(gamma, joint=True, entropy=0.0), cfg.finetune, cfg, ctx,
                          f"{tag}_finetune")
            points.append(self.point(f"gamma={gamma:g}", gamma, net, data, costs, cfg))
            nets.append(net)
        return points, nets, curriculum, costs
