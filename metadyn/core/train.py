"""One small training loop with callbacks, seeded determinism and atomic, resumable checkpoints.

A research method is a loss (``loss(out, y)``) plus, if it needs one, a callback — never a fork of
this loop. Checkpoints are written atomically (temp file, then rename) after every epoch and read
with ``torch.load(weights_only=True)``; an interrupted run resumes from its last completed epoch and
ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metadyn.core.callbacks import Callback, TrainState
from metadyn.core.losses import ce_loss
from metadyn.errors import InputError, NonFiniteLossError


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(spec)!r} was asked for but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` to a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``); a corrupt file is an :class:`InputError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {str(path)!r} does not exist") from None
    except Exception as e:  # unpickling errors, truncated files
        raise InputError(f"checkpoint {str(path)!r} cannot be read safely: {type(e).__name__}") from None


# --------------------------------------------------------------------------- the loop


def _epoch_batches(data, batch_size: int, seed: int, epoch: int, device: torch.device) -> Iterable:
    """Shuffled mini-batches of an in-memory ``(x, y)`` pair (or an object with ``.x``/``.y``), seeded
    by ``(seed, epoch)`` so a resumed run sees the same order; a callable ``data(epoch)`` is used as is."""
    if callable(data):
        yield from data(epoch)
        return
    x, y = (data.x, data.y) if hasattr(data, "x") else data
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(x), generator=g)
    for s in range(0, len(x), batch_size):
        i = perm[s : s + batch_size]
        yield x[i].to(device, non_blocking=True), y[i].to(device, non_blocking=True)


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r}; choose from: sgd, adam, adamw")


def fit(
    model: nn.Module,
    data,
    *,
    loss: Callable | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    augment: Callable[[Tensor], Tensor] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    callbacks: Sequence[Callback] = (),
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> TrainState:
    """Train ``model`` on ``data`` with ``loss(model(x), y)``.

    Args:
        model: usually a MultiExitNet (``loss`` receives its ExitOutput).
        data: ``(x, y)`` tensors, an object with ``.x``/``.y`` (a :class:`metadyn.data.Split`), or a
            callable ``epoch -> iterable of (x, y)``.
        loss: a method's loss ``loss(out, y)``; default exit-wise cross-entropy. A loss that is an
            ``nn.Module`` (one with parameters, e.g. projection heads) is trained along with the model.
        schedule: ``"cosine"`` (per-step cosine decay to 0) or ``"constant"``.
        augment: optional batch transform applied to ``x`` during training. A loss with an attribute
            ``views = V > 1`` receives ``V`` independently augmented copies of each batch stacked
            view-major, ``(V*B, ...)``, with the labels repeated.
        checkpoint: where to write the checkpoint after every epoch; if the file exists, training
            resumes from it (its model, optimizer, schedule, history and each callback's
            :meth:`~metadyn.core.callbacks.Callback.state_dict`, restored before ``on_train_start``).
        progress: show a tqdm progress bar per epoch.

    Returns:
        The final :class:`TrainState` (``state.history`` holds one dict per epoch).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
    """
    loss_fn = ce_loss() if loss is None else loss
    dev = pick_device(device)
    model.to(dev)
    # A loss may carry parameters of its own (an nn.Module: projection heads, attention modules); they
    # are trained with the model and saved in the checkpoint.
    loss_mod = loss_fn if isinstance(loss_fn, nn.Module) else None
    if loss_mod is not None:
        loss_mod.to(dev)
    views = int(getattr(loss_fn, "views", 1))  # a loss may ask for several augmented views of each batch
    trainable = list(model.parameters()) + (list(loss_mod.parameters()) if loss_mod is not None else [])
    params = [p for p in trainable if p.requires_grad]
    opt = make_optimizer(params, optimizer, lr, momentum, weight_decay)
    n = len(data.x if hasattr(data, "x") else data[0]) if not callable(data) else None
    steps_per_epoch = math.ceil(n / batch_size) if n else None
    if schedule == "cosine" and steps_per_epoch:
        total = max(1, epochs * steps_per_epoch)  # epochs=0 (nothing to train) must not divide by zero
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    elif schedule in ("constant", "cosine"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    else:
        raise InputError(f"unknown schedule {schedule!r}; choose from: cosine, constant")

    state = TrainState(model, opt)
    if checkpoint is not None and Path(checkpoint).exists():
        ck = load_checkpoint(checkpoint, map_location=dev)
        model.load_state_dict(ck["model"])
        if loss_mod is not None:
            loss_mod.load_state_dict(ck["loss"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state.epoch, state.step, state.history = ck["epoch"], ck["step"], list(ck["history"])
        _restore_callbacks(callbacks, ck.get("callbacks"), checkpoint)  # absent in checkpoints of older runs

    for cb in callbacks:
        cb.on_train_start(state)
    start = state.epoch
    for epoch in range(start, epochs):
        state.epoch = epoch
        torch.manual_seed(seed * 100_003 + epoch)  # dropout/augmentation randomness, reproducible on resume
        model.train()
        if loss_mod is not None:
            loss_mod.train()
        for cb in callbacks:
            cb.on_epoch_start(state)
        total_loss = torch.zeros((), device=dev)
        seen = 0
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for b, (x, y) in enumerate(_epoch_batches(data, batch_size, seed, epoch, dev)):
            if views > 1:  # (V*B, ...): view-major, each view augmented independently
                x = torch.cat([augment(x) if augment is not None else x for _ in range(views)])
                y = y.repeat(views)
            elif augment is not None:
                x = augment(x)
            state.batch = (x, y)
            out = model(x)
            value = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            value.backward()
            state.loss = value.detach()
            for cb in callbacks:
                cb.on_after_backward(state)
            opt.step()
            sched.step()
            state.step += 1
            total_loss += state.loss
            seen += 1
            for cb in callbacks:
                cb.on_batch_end(state)
            if bar is not None:
                bar.update(1)
            if (b + 1) % log_every == 0:
                _check_finite(total_loss, epoch, b, checkpoint)  # one host sync every log_every steps
                if bar is not None:
                    bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}")
        if bar is not None:
            bar.close()
        _check_finite(total_loss, epoch, seen - 1, checkpoint)
        state.history.append({"epoch": epoch + 1, "loss": float(total_loss) / max(seen, 1),
                              "lr": opt.param_groups[0]["lr"]})
        for cb in callbacks:
            cb.on_epoch_end(state)
        state.epoch = epoch + 1
        if checkpoint is not None:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "loss": loss_mod.state_dict() if loss_mod is not None else {},
                             "scheduler": sched.state_dict(), "epoch": state.epoch, "step": state.step,
                             "history": state.history, "callbacks": [cb.state_dict() for cb in callbacks]},
                            checkpoint)
    return state


def _restore_callbacks(callbacks: Sequence[Callback], saved: list[dict] | None, checkpoint) -> None:
    """Give each callback the state it had when ``checkpoint`` was written (matched by position)."""
    if saved is None:
        return
    if len(saved) != len(callbacks):
        if not any(saved):  # nothing to restore (e.g. a run interrupted by a stateless callback)
            return
        raise InputError(f"checkpoint {str(checkpoint)!r} holds the state of {len(saved)} callbacks but this run "
                         f"has {len(callbacks)}; resume with the callbacks it was written with")
    for cb, sd in zip(callbacks, saved):
        cb.load_state_dict(sd)


def _check_finite(total: Tensor, epoch: int, batch: int, checkpoint) -> None:
    if not torch.isfinite(total):
        kept = f"; last good checkpoint kept at {checkpoint}" if checkpoint and Path(checkpoint).exists() else ""
        raise NonFiniteLossError(f"training stopped: the loss became NaN or infinite in epoch {epoch + 1} "
                                 f"(by batch {batch + 1}){kept}")


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal, none in logs and CI
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
