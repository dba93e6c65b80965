"""Task kind ``datafree``: convert a trained static network into an early-exit one without its data.

Per seed: a static CNN teacher is trained on ``train``; exits are attached after ``exits.at`` (the teacher
frozen, its output bit-identical) and trained by distillation from the teacher's final output on one transfer
set per condition: ``real`` training images (labels unused, the upper bound); ``impressions`` (ZSKD data
impressions, Nayak et al., ICML 2019, synthesised from the teacher alone); ``impressions_bn`` (plus
DeepInversion's BatchNorm-statistics prior, Yin et al., CVPR 2020); ``noise`` (uniform in the data range, as
many samples: the control); ``untrained`` heads; and ``student`` (when ``student.backbone`` is set: a separate
small multi-exit network distilled on the impressions). Within a seed every condition starts from the same
head initialisation. Exit thresholds are fitted on ``val``; every table number is on ``test``.

Not fully data-free: the real ``val`` split chose the synthesis temperature and the BatchNorm-prior weight
(on digits) and fits the exit thresholds; the report says so next to its tables. ``impressions.preset:
paper`` synthesises with the released ZSKD recipe (:data:`metadyn.datafree.impressions.PAPER_PRESET`)
instead of metadyn's tuned defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from metadyn import datafree
from metadyn.config import TaskConfig, spec
from metadyn.core.backbones import attach_exits
from metadyn.core.heads import ExitHead
from metadyn.core.losses import labeled_ce
from metadyn.core.train import seed_everything
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, evaluate, report, specs

CONDITIONS = ("real", "impressions", "impressions_bn", "noise", "untrained")
LABELS = {"real": "real training images (upper bound)", "impressions": "data impressions (ZSKD)",
          "impressions_bn": "data impressions + BatchNorm prior", "noise": "uniform noise (control)",
          "untrained": "untrained exits", "student": "small multi-exit student distilled on impressions"}


def _adam() -> specs.FitSpec:
    return specs.FitSpec(lr=0.01, optimizer="adam", weight_decay=0.0)


@dataclass
class TeacherSpec:
    """The static teacher (:class:`~metadyn.datafree.teacher.StaticCNN`) and how it is trained."""

    widths: list[int] = spec(factory=lambda: [16, 32, 64], ge=1, nonempty=True)
    convs: int = spec(2, ge=1)
    train: specs.FitSpec = field(default_factory=lambda: specs.FitSpec(epochs=15, augment="shift"))


@dataclass
class ExitSpec:
    """Where exits go, their heads, and how they are distilled from the teacher's final output."""

    at: list[str] = spec(factory=lambda: ["stages.0", "stages.1"], nonempty=True, distinct=True)
    head_conv: int = spec(0, ge=0)  # channels of a conv3x3 before each head's pooling (0: pooling + linear)
    tau: float = spec(1.0, gt=0)  # distillation temperature
    train: specs.FitSpec = field(default_factory=_adam)


@dataclass
class ImpressionSpec:
    num: int = spec(1280, ge=1)  # impressions per seed (the noise control has as many samples)
    bn_weight: float = spec(0.5, ge=0)  # BatchNorm-prior weight of impressions_bn (chosen on digits val)
    # tuned: synth as given (metadyn's defaults: tau 1, 100 steps at lr 0.1); paper: the released ZSKD recipe
    # (tau 20, 1500 steps at lr 0.001, batches of 100) for each of those four synth keys left at its tuned default
    preset: str = spec("tuned", choices=("tuned", "paper"))
    synth: datafree.SynthesisSettings = field(default_factory=datafree.SynthesisSettings)

    def settings(self) -> datafree.SynthesisSettings:
        """The synthesis settings this spec stands for: with ``preset: paper``, each of ``tau``, ``steps``, ``lr``
        and ``batch_size`` that ``synth`` leaves at metadyn's tuned default takes the released code's value (so
        ``--quick``'s fewer steps, or any value set to something else, are kept)."""
        if self.preset == "tuned":
            return self.synth
        from metadyn.datafree.impressions import PAPER_PRESET

        default = datafree.SynthesisSettings()
        return replace(self.synth, **{k: v for k, v in PAPER_PRESET.items()
                                      if getattr(self.synth, k) == getattr(default, k)})


@dataclass
class DatafreeConfig(TaskConfig):
    seeds: list[int] = spec(factory=lambda: [0, 1, 2], nonempty=True, distinct=True, ge=0)
    data: specs.DataSpec = field(default_factory=specs.DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    exits: ExitSpec = field(default_factory=ExitSpec)
    impressions: ImpressionSpec = field(default_factory=ImpressionSpec)
    conditions: list[str] = spec(factory=lambda: list(CONDITIONS), choices=CONDITIONS, nonempty=True, distinct=True)
    student: specs.ModelSpec | None = None  # a small multi-exit network distilled on the impressions
    eval: specs.EvalSpec = field(default_factory=specs.EvalSpec)


def _head(cfg):
    return lambda c, k: ExitHead(c, k, conv_channels=cfg.exits.head_conv)


@TASK_KINDS.register("datafree")
class Datafree(TaskKind):
    config = DatafreeConfig
    _example: datafree.Impressions | None = None  # the first seed's impressions, for the plot

    def build(self, cfg, device):
        cfg.impressions.settings().check("impressions.synth.")
        data = specs.load_data(cfg.data, cfg.seed)
        teacher = datafree.static_cnn(data.in_shape, data.num_classes, cfg.teacher.widths, cfg.teacher.convs)
        attach_exits(teacher, cfg.exits.at, example_input=torch.zeros(1, *data.in_shape), head=_head(cfg))
        if cfg.student is not None:
            specs.build_model(cfg.student, data.in_shape, data.num_classes, "student.options")
        return cfg.conditions + (["student"] if cfg.student is not None else [])

    def execute(self, cfg, conditions, ctx: Context) -> Results:
        ck, imp = ctx.out / "checkpoints", cfg.impressions
        per_seed: dict[int, dict] = {}

        def setup(seed: int) -> dict:
            """Train the teacher of a seed and build its transfer sets (once per seed)."""
            seed_everything(seed)
            data = specs.load_data(cfg.data, seed)
            teacher = datafree.static_cnn(data.in_shape, data.num_classes, cfg.teacher.widths, cfg.teacher.convs)
            specs.train(teacher, labeled_ce, data.train, cfg.teacher.train, seed, ctx.device,
                        ck / f"seed{seed}_teacher.pt", ctx.progress)
            teacher.eval()
            acc = float((datafree.teacher_logits(teacher, data.test.x).argmax(-1) == data.test.y).double().mean())
            synth = imp.settings()
            settings = {"impressions": synth, "impressions_bn": replace(synth, bn_weight=imp.bn_weight)}
            imps = {}
            for name, s in settings.items():
                if name in conditions or (name == "impressions" and "student" in conditions):
                    path = ck / f"seed{seed}_{name}_data.pt"  # written once: a resumed run reuses them
                    if not path.exists():
                        datafree.synthesize_impressions(teacher, imp.num, in_shape=data.in_shape, settings=s, seed=seed,
                                               device=ctx.device, progress=ctx.progress).save(path)
                    imps[name] = datafree.Impressions.load(path)
            lo, hi = imp.synth.bounds
            transfer = {name: x.x for name, x in imps.items()} | {"real": data.train.x}
            transfer["noise"] = torch.rand((imp.num, *data.in_shape), generator=torch.Generator().manual_seed(seed)) \
                * (hi - lo) + lo
            transfer["student"] = transfer.get("impressions")
            return {"data": data, "teacher": teacher, "teacher_accuracy": acc, "transfer": transfer, "imps": imps}

        def convert(name: str, seed: int) -> dict:
            s = per_seed.get(seed) or per_seed.setdefault(seed, setup(seed))
            data, teacher = s["data"], s["teacher"]
            torch.manual_seed(seed * 1009 + 1)  # the same head initialisation for every condition of a seed
            fit_kw = {"seed": seed, "device": ctx.device, "checkpoint": ck / f"seed{seed}_{name}_exits.pt",
                      "progress": ctx.progress, **cfg.exits.train.fit_kwargs()}
            if name == "student":  # the teacher's outputs are precomputed: no augmentation
                net = specs.build_model(cfg.student, data.in_shape, data.num_classes, "student.options")
                datafree.distill_student(net, teacher, s["transfer"][name], tau=cfg.exits.tau,
                                         **{**fit_kw, "augment": None})
            else:
                net = attach_exits(teacher, cfg.exits.at, example_input=data.train.x[:1].to(ctx.device),
                                   head=_head(cfg))
                if name != "untrained":
                    datafree.train_exits(net, s["transfer"][name], tau=cfg.exits.tau, **fit_kw)
            e = evaluate.evaluate_exits(net, data, cfg.eval, name)
            curve, budgets = evaluate.budget_sweep(e, data.test.y, cfg.eval.policy, name)
            return {"rows": e.rows, "curve": curve, "budgets": budgets}

        runs = evaluate.sweep(conditions, cfg.seeds, convert)
        rows = evaluate.seed_rows(runs, conditions, cfg.seeds, keys=("accuracy", "val_accuracy", "ece"))
        curves = evaluate.seed_rows(runs, conditions, cfg.seeds, "curve", ("accuracy", "mflops"))
        budgets = evaluate.seed_rows(runs, conditions, cfg.seeds, "budgets", ("accuracy", "mflops"))
        pairs = [p for n in ("impressions", "impressions_bn") for p in ((n, "noise"), ("real", n))
                 if set(p) <= set(conditions)]
        comps = evaluate.seed_pairs(runs, pairs, cfg.seeds, range(max(r["exit"] for r in rows)))
        extra = {"teacher_test_accuracy": list(evaluate.mean_std([s["teacher_accuracy"] for s in per_seed.values()])),
                 "impressions": {f"seed{seed}_{n}": i.summary() for seed, s in per_seed.items()
                                 for n, i in s["imps"].items() if n in conditions},
                 "splits": {n: len(next(iter(per_seed.values()))["data"].split(n))
                            for n in ("train", "val", "calib", "test")} if per_seed else {}}
        self._example = next((s["imps"].get("impressions") for s in per_seed.values()), None)
        return Results(cfg.data.name, rows, curves, budgets, comps, extra)

    def plots(self, cfg, res, out):
        report.plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test, mean over seeds)",
                    labels=LABELS)
        if self._example is not None:
            self._example.plot(out / "impressions.png")

    def sections(self, cfg, res):
        e = res.extra
        imp = report.markdown_table([{"which": k, **v, "agree": 100 * v["argmax_agreement"]}
                              for k, v in e["impressions"].items()],
                             [("which", "impressions", ""), ("median_kl", "median KL", ".4f"),
                              ("mean_kl", "mean KL", ".4f"), ("agree", "argmax agreement (%)", ".1f")])
        tm, tsd = e["teacher_test_accuracy"]
        full = max((r["mflops"] or 0) for r in res.rows if r["group"] != "student")
        synth, preset, bn = cfg.impressions.settings(), cfg.impressions.preset, cfg.impressions.bn_weight
        tau_from = ("the released ZSKD code" if preset == "paper" else
                    "chosen on digits' real `val` split" if synth.tau == datafree.DEFAULT_TAU else "as set")
        bn_from = "chosen on digits' real `val` split" if bn == ImpressionSpec().bn_weight else "as set"
        where = (f"**Real data in the choices:** the exit thresholds are fitted on this task's real `val` split; the "
                 f"synthesis temperature tau = {synth.tau:g} ({tau_from}) and the BatchNorm-prior weight {bn:g} "
                 f"({bn_from}). The conversion is data-free in its training set only. Synthesis: preset `{preset}`, "
                 f"{synth.steps} Adam steps at lr {synth.lr:g}, batches of {synth.batch_size}.")
        return [("Test accuracy per exit % (MFLOPs), mean ± std over seeds",
                 f"{report.exit_table(res.rows, labels=LABELS)}\n\n{where}\n\nThe final exit is the teacher itself: "
                 f"test accuracy {100 * tm:.2f} ± {100 * tsd:.2f}%. Splits: {e['splits']}.\n\n"
                 "![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("What the numbers show", report.comparison_lines(res.comparisons, "seeds")),
                (f"Budgeted test accuracy %: {cfg.eval.policy} thresholds fitted on the real `val` split",
                 "A deployment without any data would have to fit them on impressions; not done here. \"—\": below "
                 f"the first exit.\n\n{report.budget_table(res.budgets, full)}"),
                ("Validation accuracy per exit % (what hyper-parameters are chosen on)",
                 report.exit_table(res.rows, "val_accuracy")),
                ("Achieved match of the impressions: KL(target || softmax(teacher / tau))",
                 imp + ("\n\n![impressions](impressions.png)" if self._example is not None else ""))]

