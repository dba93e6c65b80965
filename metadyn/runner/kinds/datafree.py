"""Task kind ``datafree``: convert a trained static network into an early-exit one without its data.

Per seed: the teacher is trained on ``train`` (the built-in static CNN, or the user's ``teacher.builder``), or
loaded from the user's ``teacher.checkpoint`` (then the same network in every seed); exits are attached after
``exits.at`` (module names, or ``auto``: ``exits.count`` cuts at even fractions of the teacher's FLOPs; the
teacher frozen, its output bit-identical) and trained by distillation from the teacher's final output on one transfer
set per condition: ``real`` training images (labels unused, the upper bound); ``impressions`` (ZSKD data
impressions, Nayak et al., ICML 2019, synthesised from the teacher alone); ``impressions_bn`` (plus
a feature prior: DeepInversion's BatchNorm-statistics prior, Yin et al., CVPR 2020, or for a teacher without
BatchNorm its image prior, :mod:`metadyn.datafree.priors`); ``noise`` (uniform in the data range, as
many samples: the control); ``untrained`` heads; and ``student`` (when ``student.backbone`` is set: a separate
small multi-exit network distilled on the impressions). Within a seed every condition starts from the same
head initialisation. Exit thresholds are fitted on ``val``; every table number is on ``test``.

Two modes are reported side by side. Today's: the real ``val`` split fits the exit thresholds (and chose, on
digits, the synthesis temperature and the prior weight). Fully data-free (``impressions.holdout`` > 0): the
thresholds are fitted on held-out impressions (synthesised with another seed, never trained on), so no real
image of the task is used for any choice; the synthesis temperature and prior weight are fixed beforehand (chosen
on digits, so on digits itself this mode is not data-free). The report says so next to its tables. ``impressions.preset:
paper`` synthesises with the released ZSKD recipe (:data:`metadyn.datafree.impressions.PAPER_PRESET`)
instead of metadyn's tuned defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from metadyn import datafree
from metadyn.config import TaskConfig, spec
from metadyn.core import evaluation, plots, stats
from metadyn.core.backbones import attach_exits
from metadyn.core.backbones.attach import auto_cut_points
from metadyn.core.heads import ExitHead
from metadyn.core.inference import collect_logits
from metadyn.core.losses import labeled_ce
from metadyn.core.train import seed_everything
from metadyn.data.base import Split
from metadyn.datafree.priors import PRIORS, PriorSettings, resolve_prior
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner import Context, Results, TaskKind, evaluate, report, specs

CONDITIONS = ("real", "impressions", "impressions_bn", "noise", "untrained")
LABELS = {"real": "real training images (upper bound)", "impressions": "data impressions (ZSKD)",
          "impressions_bn": "data impressions + feature prior", "noise": "uniform noise (control)",
          "untrained": "untrained exits", "student": "small multi-exit student distilled on impressions"}


def _adam() -> specs.FitSpec:
    return specs.FitSpec(lr=0.01, optimizer="adam", weight_decay=0.0)


PRIOR_NAMES = {"bn": "BatchNorm prior", "image": "image prior (TV + l2)"}


@dataclass
class TeacherSpec:
    """The static teacher and how it is trained: the built-in :class:`~metadyn.datafree.teacher.StaticCNN`
    (``widths``, ``convs``) unless ``builder`` names the user's network (a torchvision model name, a registered
    backbone or ``package.module:function``, called with ``options``;
    :func:`~metadyn.datafree.teacher.build_teacher`). With ``checkpoint`` (a state dict) it is loaded, not
    trained. Its inputs: images in ``impressions.synth.bounds`` normalised by ``mean`` / ``std`` per channel
    (both or neither; the data's splits are normalised likewise); the shape is the data set's."""

    widths: list[int] = spec(factory=lambda: [16, 32, 64], ge=1, nonempty=True)
    convs: int = spec(2, ge=1)
    builder: str | None = None
    options: dict = field(default_factory=dict)
    checkpoint: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    train: specs.FitSpec = field(default_factory=lambda: specs.FitSpec(epochs=15, augment="shift"))


@dataclass
class ExitSpec:
    """Where exits go, their heads, and how they are distilled from the teacher's final output."""

    at: list[str] | str = spec(factory=lambda: ["stages.0", "stages.1"], nonempty=True, distinct=True)  # or "auto"
    count: int = spec(2, ge=1)  # exits placed by at: auto (even fractions of the teacher's FLOPs)
    head_conv: int = spec(0, ge=0)  # channels of a conv3x3 before each head's pooling (0: pooling + linear)
    tau: float = spec(1.0, gt=0)  # distillation temperature
    train: specs.FitSpec = field(default_factory=_adam)


@dataclass
class ImpressionSpec:
    num: int = spec(1280, ge=1)  # impressions per seed (the noise control has as many samples)
    bn_weight: float = spec(0.5, ge=0)  # feature-prior weight of impressions_bn (chosen on digits val)
    prior: str = spec("bn", choices=PRIORS)  # the feature prior of impressions_bn (metadyn.datafree.priors)
    holdout: int = spec(256, ge=0)  # held-out impressions fitting the fully data-free thresholds (0: that mode off)
    # tuned: synth as given (metadyn's defaults: tau 1, 100 steps at lr 0.1); paper: the released ZSKD recipe
    # (tau 20, 1500 steps at lr 0.001, batches of 100, uniform init) for each of those synth keys left at its default
    preset: str = spec("tuned", choices=("tuned", "paper"))
    synth: datafree.SynthesisSettings = field(default_factory=datafree.SynthesisSettings)

    def settings(self) -> datafree.SynthesisSettings:
        """The synthesis settings this spec stands for: with ``preset: paper``, each of ``tau``, ``steps``, ``lr``,
        ``batch_size`` and ``init`` that ``synth`` leaves at metadyn's default takes the released code's value (so
        ``--quick``'s fewer steps, or any value set to something else, are kept)."""
        if self.synth.bn_weight != 0:  # it would give the ZSKD condition the feature prior too: two equal sets
            raise InputError(f"impressions.synth.bn_weight is {self.synth.bn_weight:g}: the `impressions` condition "
                             "is ZSKD's, without a feature prior; set the prior's weight of `impressions_bn` with "
                             "impressions.bn_weight")
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


def _labels(cfg, prior: str | None = None) -> dict:
    """The conditions' names; ``prior``: the prior ``impressions.prior`` resolved for the teacher."""
    prior = PRIOR_NAMES.get(prior or cfg.impressions.prior, "feature prior (BatchNorm, else image)")
    return LABELS | {"impressions_bn": f"data impressions + {prior}"}


def _head(cfg):
    return lambda c, k: ExitHead(c, k, conv_channels=cfg.exits.head_conv)


def _space(cfg) -> datafree.InputSpace:
    return datafree.InputSpace(cfg.impressions.synth.bounds, cfg.teacher.mean, cfg.teacher.std)


def _teacher(cfg, data) -> nn.Module:
    t = cfg.teacher
    if t.builder is None:
        if t.checkpoint is not None:
            raise InputError("teacher.checkpoint needs teacher.builder (the network it was saved from)")
        return datafree.static_cnn(data.in_shape, data.num_classes, t.widths, t.convs)
    return datafree.build_teacher(t.builder, t.options, t.checkpoint, in_shape=data.in_shape,
                                  num_classes=data.num_classes, in_channels=data.in_shape[0])


def _at(cfg, teacher: nn.Module, example: torch.Tensor) -> list[str]:
    at = cfg.exits.at
    if isinstance(at, str):
        if at != "auto":
            raise InputError(f"exits.at must be a list of module names or 'auto', got {at!r}")
        return auto_cut_points(teacher, example, cfg.exits.count)
    return at


def _normalised(data, space: datafree.InputSpace):
    if space.mean is None:
        return data
    space.check_channels(data.in_shape[0], "teacher.mean and teacher.std")
    return replace(data, **{n: Split(space.to_teacher(data.split(n).x), data.split(n).y)
                            for n in ("train", "val", "calib", "test")})


@TASK_KINDS.register("datafree")
class Datafree(TaskKind):
    config = DatafreeConfig
    _example: datafree.Impressions | None = None  # the first seed's impressions, for the plot

    def build(self, cfg, device):
        cfg.impressions.settings().check("impressions.synth.")
        data = specs.load_data(cfg.data, cfg.seed)
        _normalised(data, _space(cfg))
        teacher = _teacher(cfg, data).eval()
        example = torch.zeros(1, *data.in_shape)
        attach_exits(teacher, _at(cfg, teacher, example), example_input=example, head=_head(cfg))
        if cfg.student is not None:
            specs.build_model(cfg.student, data.in_shape, data.num_classes, "student.options")
        return cfg.conditions + (["student"] if cfg.student is not None else [])

    def execute(self, cfg, conditions, ctx: Context) -> Results:
        ck, imp = ctx.out / "checkpoints", cfg.impressions
        per_seed: dict[int, dict] = {}

        def setup(seed: int) -> dict:
            """Train the teacher of a seed and build its transfer sets (once per seed)."""
            seed_everything(seed)
            space = _space(cfg)
            data = _normalised(specs.load_data(cfg.data, seed), space)
            teacher = _teacher(cfg, data)
            if cfg.teacher.checkpoint is None:
                specs.train(teacher, labeled_ce, data.train, cfg.teacher.train, seed, ctx.device,
                            ck / f"seed{seed}_teacher.pt", ctx.progress)
            teacher.to(ctx.device).eval()
            acc = float((datafree.teacher_logits(teacher, data.test.x).argmax(-1) == data.test.y).double().mean())
            synth = imp.settings()
            settings = {"impressions": synth, "impressions_bn": PriorSettings(
                **vars(replace(synth, bn_weight=imp.bn_weight)), prior=imp.prior)}
            source = space.synthesis_model(teacher)  # optimised in the data range, handed over normalised
            imps, held = {}, {}
            for name, s in settings.items():
                needed = name in conditions or (name == "impressions" and "student" in conditions)
                for part, n, offset, into in (("data", imp.num, 0, imps), ("holdout", imp.holdout, 7919, held)):
                    if not n or not (needed or (part == "holdout" and name == "impressions")):
                        continue
                    path = ck / f"seed{seed}_{name}_{part}.pt"  # written once: a resumed run reuses them
                    if not path.exists():
                        datafree.synthesize_impressions(source, n, in_shape=data.in_shape, settings=s,
                                                        seed=seed + offset, device=ctx.device,
                                                        progress=ctx.progress).save(path)
                    into[name] = datafree.Impressions.load(path)
            transfer = {name: space.to_teacher(x.x) for name, x in imps.items()} | {"real": data.train.x}
            transfer["noise"] = space.noise(imp.num, data.in_shape, seed)
            transfer["student"] = transfer.get("impressions")
            held_x = {name: space.to_teacher(x.x) for name, x in held.items()}
            return {"data": data, "teacher": teacher, "teacher_accuracy": acc, "transfer": transfer, "imps": imps,
                    "held": held_x, "at": _at(cfg, teacher, data.train.x[:1].to(ctx.device))}

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
                net = attach_exits(teacher, s["at"], example_input=data.train.x[:1].to(ctx.device),
                                   head=_head(cfg))
                if name != "untrained":
                    datafree.train_exits(net, s["transfer"][name], tau=cfg.exits.tau, **fit_kw)
            e = evaluation.evaluate_exits(net, data, name, **cfg.eval.options())
            curve, budgets = evaluation.budget_sweep(e, data.test.y, cfg.eval.policy, name)
            out = {"rows": e.rows, "curve": curve, "budgets": budgets}
            # fully data-free: thresholds fitted on held-out impressions (its own prior's for impressions_bn)
            held = s["held"].get(name if name == "impressions_bn" else "impressions")
            if held is not None:
                e_free = replace(e, val=collect_logits(net, held, cfg.eval.batch_size))
                out["budgets_datafree"] = evaluation.budget_sweep(e_free, data.test.y, cfg.eval.policy, name)[1]
            return out

        runs = evaluate.sweep(conditions, cfg.seeds, convert)
        rows = evaluate.seed_rows(runs, conditions, cfg.seeds, keys=("accuracy", "val_accuracy", "ece"))
        curves = evaluate.seed_rows(runs, conditions, cfg.seeds, "curve", ("accuracy", "mflops"))
        budgets = evaluate.seed_rows(runs, conditions, cfg.seeds, "budgets", ("accuracy", "mflops"))
        pairs = [p for n in ("impressions", "impressions_bn") for p in ((n, "noise"), ("real", n))
                 if set(p) <= set(conditions)]
        comps = evaluate.seed_pairs(runs, pairs, cfg.seeds, range(max(r["exit"] for r in rows)))
        free = evaluate.seed_rows(runs, conditions, cfg.seeds, "budgets_datafree", ("accuracy", "mflops"))
        extra = {"teacher_test_accuracy": list(stats.mean_std([s["teacher_accuracy"] for s in per_seed.values()])),
                 "budgets_datafree": free,
                 "exits_at": next(iter(per_seed.values()))["at"] if per_seed else [],
                 "prior": resolve_prior(imp.prior, next(iter(per_seed.values()))["teacher"]) if per_seed else None,
                 "impressions": {f"seed{seed}_{n}": i.summary() for seed, s in per_seed.items()
                                 for n, i in s["imps"].items() if n in conditions},
                 "splits": {n: len(next(iter(per_seed.values()))["data"].split(n))
                            for n in ("train", "val", "calib", "test")} if per_seed else {}}
        self._example = next((s["imps"].get("impressions") for s in per_seed.values()), None)
        return Results(cfg.data.name, rows, curves, budgets, comps, extra)

    def plots(self, cfg, res, out):
        plots.plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test, mean over seeds)",
                    labels=_labels(cfg, res.extra.get("prior")))
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
                 f"synthesis temperature tau = {synth.tau:g} ({tau_from}) and the feature-prior weight {bn:g} "
                 f"({bn_from}). The conversion is data-free in its training set only (the fully data-free mode's "
                 f"thresholds are below). Synthesis: preset `{preset}`, "
                 f"{synth.steps} Adam steps at lr {synth.lr:g}, batches of {synth.batch_size}. "
                 f"Exits after: {', '.join(e.get('exits_at', []))}.")
        labels = _labels(cfg, e.get("prior"))
        return [("Test accuracy per exit % (MFLOPs), mean ± std over seeds",
                 f"{report.exit_table(res.rows, labels=labels)}\n\n{where}\n\nThe final exit is the teacher itself: "
                 f"test accuracy {100 * tm:.2f} ± {100 * tsd:.2f}%. Splits: {e['splits']}.\n\n"
                 "![accuracy vs MFLOPs](accuracy_vs_mflops.png)"),
                ("What the numbers show", report.comparison_lines(res.comparisons, "seeds")),
                (f"Budgeted test accuracy %: {cfg.eval.policy} thresholds fitted on the real `val` split",
                 "\"—\": below the first exit. The fully data-free mode's table follows.\n\n"
                 f"{report.budget_table(res.budgets, full)}"),
                *([(f"Fully data-free mode: budgeted test accuracy %, {cfg.eval.policy} thresholds fitted on "
                    f"{cfg.impressions.holdout} held-out impressions",
                    "No real image of this task chose anything: the thresholds are fitted on impressions synthesised "
                    "with another seed and never trained on (for `impressions_bn`, its own prior's; for every other "
                    f"condition, plain impressions). The synthesis temperature tau = {synth.tau:g} ({tau_from}) and "
                    f"the prior weight {bn:g} ({bn_from}) were fixed beforehand"
                    + (": on digits itself, this mode is therefore not data-free. " if cfg.data.name == "digits" else
                       f": no `{cfg.data.name}` image chose them. ")
                    + "The budget is met on the held-out impressions; the MFLOPs in brackets are what the test images "
                    "spend under those thresholds.\n\n"
                    f"{report.budget_table(e['budgets_datafree'], full)}")] if e.get("budgets_datafree") else []),
                ("Validation accuracy per exit % (what hyper-parameters are chosen on)",
                 report.exit_table(res.rows, "val_accuracy")),
                ("Achieved match of the impressions: KL(target || softmax(teacher / tau))",
                 imp + ("\n\n![impressions](impressions.png)" if self._example is not None else ""))]

