"""Meta-training with the core loop: episode streams, model selection on meta-val, stacked predictors.

:func:`meta_fit` trains any meta-learner (``learner(batch) -> meta-loss``: :class:`~metadyn.meta.MetaLearner`,
:class:`~metadyn.meta.ProtoExits`) with :func:`metadyn.core.train.fit` on a stream of meta-batches, scores it
after every epoch on fixed meta-val episodes and keeps the best epoch (its weights are loaded at the end), as
in MAML's and ProtoNet's protocols (Finn et al., ICML 2017; Snell et al., NeurIPS 2017). Resumable: the loop's
checkpoint and the best weights live in ``out``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from metadyn.core import distributed
from metadyn.core.callbacks import Callback, TrainState
from metadyn.core.device import module_device
from metadyn.core.train import fit, load_checkpoint, pick_device, save_checkpoint


def episode_stream(sampler, iterations: int, meta_batch: int, device, dtype: torch.dtype | None = None):
    """``epoch -> iterable of (meta_batch, None)`` for :func:`~metadyn.core.train.fit`: the same episodes for the
    same epoch on every call and every process (episode ``(epoch * iterations + i) * meta_batch + j``), gathered
    on ``device`` from a pool put there once (:class:`~metadyn.meta.evaluate.DeviceEpisodes`)."""
    from metadyn.meta.evaluate import DeviceEpisodes

    source = DeviceEpisodes(sampler, device, dtype)

    def episodes(epoch: int):
        for i in range(iterations):
            yield source.batch((epoch * iterations + i) * meta_batch, meta_batch), None

    return episodes


class BestOnVal(Callback):
    """After every epoch: mean query accuracy over exits on fixed meta-val episodes, recorded in the history;
    the best epoch's weights are written to ``path``. Its state (the best score) is checkpointed."""

    def __init__(self, predictor, module, sampler, episodes: int, steps, device, path: Path):
        self.predictor, self.module, self.sampler = predictor, module, sampler
        self.episodes, self.steps, self.device, self.path = episodes, steps, device, path
        self.best = -math.inf

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

    def on_train_start(self, state: TrainState) -> None:  # a checkpoint written before callbacks had state
        self.best = max([self.best] + [h["val_score"] for h in state.history])

    def on_epoch_end(self, state: TrainState) -> None:
        from metadyn.meta.evaluate import evaluate_episodes

        acc = evaluate_episodes(self.predictor, self.sampler, self.episodes, steps=self.steps,
                                device=self.device).accuracy.mean(0)
        score = distributed.from_rank0(float(acc.mean()), self.device)  # every rank keeps the same epoch
        stats = getattr(self.module, "last_stats", {})
        state.history[-1].update(val_accuracy=acc.tolist(), val_score=score,
                                 train_query_accuracy=stats.get("query_accuracy"))
        if score > self.best:
            self.best = score
            save_checkpoint({"model": self.module.state_dict(), "epoch": state.epoch + 1, "val_score": score},
                            self.path)


class StackedPredictor:
    """Predictions of several learners over disjoint exits, in exit order (e.g. early heads + final exit)."""

    def __init__(self, *learners):
        self.learners = learners

    def predict(self, sx, sy, qx, steps=None):
        return [z for lrn in self.learners for z in lrn.predict(sx, sy, qx, steps)]


def meta_fit(learner, train_sampler, val_sampler, out: Path, *, epochs: int = 10, iterations: int = 25,
             meta_batch: int = 8, lr: float = 1e-3, optimizer: str = "adam", val_episodes: int = 100,
             eval_steps=None, seed: int = 0, device=None, progress: bool = True) -> list[dict]:
    """Meta-train ``learner`` for ``epochs`` x ``iterations`` meta-batches; keep the epoch with the best mean
    meta-val accuracy (loaded into ``learner`` at the end). Returns the per-epoch history. ``device``: where to
    train (``None``: where the learner is). Under ``torchrun`` rank 0 writes ``out``'s files and every rank
    reads them."""
    device = module_device(learner) if device is None else pick_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best = BestOnVal(learner, learner, val_sampler, val_episodes, eval_steps, device, out / "best.pt")
    state = fit(learner, episode_stream(train_sampler, iterations, meta_batch, device), loss=lambda value, _: value,
                epochs=epochs, lr=lr, optimizer=optimizer, momentum=0.0, weight_decay=0.0, schedule="constant",
                seed=seed, device=device, callbacks=[best], checkpoint=out / "checkpoint.pt", progress=progress)
    learner.load_state_dict(load_checkpoint(out / "best.pt", map_location=device)["model"])
    return state.history
