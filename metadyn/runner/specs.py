"""The config pieces every task kind shares, with their constraints declared on the fields, and the
builders that turn them into data, models, losses and trained networks."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from metadyn.config import checked_call, spec
from metadyn.core.policies import SCORES
from metadyn.core.train import fit
from metadyn.registry import BACKBONES, METHODS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")


def _augments():
    from metadyn.data.augment import AUGMENTS

    return tuple(AUGMENTS)


@dataclass
class DataSpec:
    """A classification dataset (``metadyn.registry.DATASETS``) with seeded train/val/calib/test splits."""

    name: str = "digits"
    root: str | None = None
    val_fraction: float = spec(0.1, gt=0, lt=1)
    calib_fraction: float = spec(0.1, gt=0, lt=1)
    test_fraction: float = spec(0.2, gt=0, lt=1)
    options: dict = field(default_factory=dict)


@dataclass
class ModelSpec:
    """A registered backbone (``metadyn.registry.BACKBONES``) and its options."""

    backbone: str = "resnet"
    options: dict = field(default_factory=dict)
    REQUIRED_ALONE: ClassVar[tuple[str, ...]] = ("backbone",)  # a method's own model names its backbone


@dataclass
class FitSpec:
    """Arguments of the core :func:`~metadyn.core.train.fit` for one training stage (0 epochs: none)."""

    epochs: int = spec(30, ge=0)
    batch_size: int = spec(64, ge=1)
    lr: float = spec(0.05, gt=0)
    optimizer: str = spec("sgd", choices=OPTIMIZERS)
    momentum: float = spec(0.9, ge=0, lt=1)
    weight_decay: float = spec(5e-4, ge=0)
    schedule: str = spec("cosine", choices=SCHEDULES)
    augment: str = spec("none", choices=_augments)

    def fit_kwargs(self) -> dict:
        """These settings as keyword arguments of :func:`metadyn.core.train.fit`."""
        from metadyn.data.augment import AUGMENTS

        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
                "momentum": self.momentum, "weight_decay": self.weight_decay, "schedule": self.schedule,
                "augment": AUGMENTS[self.augment]}


@dataclass
class TrainSpec(FitSpec):
    """A fit stage with the method (a METHODS loss and its options) it trains."""

    method: str = "ce"
    method_options: dict = field(default_factory=dict)


@dataclass
class MethodSpec:
    """One contender of a sweep: a training method (METHODS), its options and optionally its own model."""

    method: str = "ce"
    method_options: dict = field(default_factory=dict)
    model: ModelSpec | None = None


@dataclass
class EvalSpec:
    """How exits are scored and measured."""

    policy: str = spec("confidence", choices=tuple(SCORES))  # exit score: max softmax or negative entropy
    calibrate: bool = True  # per-exit temperature scaling on the calib split
    ece_bins: int = spec(15, ge=1)
    batch_size: int = spec(256, ge=1)

    def options(self) -> dict:
        """Keyword arguments of :func:`metadyn.core.evaluation.evaluate_exits`."""
        return {"batch_size": self.batch_size, "calibrate": self.calibrate, "ece_bins": self.ece_bins}


def load_data(spec: DataSpec, seed: int):
    """The task's dataset with its seeded train/val/calib/test splits."""
    from metadyn.data import load_classification

    return load_classification(spec.name, root=spec.root, seed=seed, val_fraction=spec.val_fraction,
                               calib_fraction=spec.calib_fraction, test_fraction=spec.test_fraction, **spec.options)


def build_model(spec: ModelSpec, in_shape, num_classes: int, where: str = "model.options"):
    """The registered backbone ``spec.backbone`` for this input shape and number of classes."""
    return checked_call(BACKBONES.get(spec.backbone), spec.options, where, in_shape=in_shape, num_classes=num_classes)


def build_method(name: str, options: dict, model, in_shape, where: str = "train.method_options"):
    """The loss of METHODS ``name``; a factory taking ``model`` / ``in_shape`` receives them (methods whose
    loss has parameters sized by the network, e.g. projection heads per exit)."""
    factory = METHODS.get(name)
    params = inspect.signature(factory).parameters
    fixed = {k: v for k, v in (("model", model), ("in_shape", in_shape)) if k in params}
    return checked_call(factory, options, where, **fixed)


def train(model, loss, data, stage: FitSpec, seed: int, device, checkpoint: Path, progress: bool = True,
          callbacks=None):
    """Train ``model`` on ``data`` (a split or ``(x, y)``) with ``loss`` and the callbacks its method brings
    (a loss may carry ``callbacks(model)``, e.g. IMTA's gradient equilibrium); resumable from ``checkpoint``."""
    if callbacks is None:
        make = getattr(loss, "callbacks", None)
        callbacks = list(make(model)) if make is not None else []
    return fit(model, data, loss=loss, **stage.fit_kwargs(), seed=seed, device=device, callbacks=callbacks,
               checkpoint=checkpoint, progress=progress)
