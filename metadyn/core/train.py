"""One small training loop with callbacks, seeded determinism and atomic, resumable checkpoints.

A research method is a loss (``loss(out, y)``) plus, if it needs one, a callback — never a fork of
this loop. Checkpoints are written atomically (temp file, then rename) after every epoch and read
with ``torch.load(weights_only=True)``; an interrupted run resumes from its last completed epoch and
ends bit-identical to an uninterrupted one on the CPU (same thread count and torch version). On a GPU that
holds only with deterministic kernels (:func:`metadyn.core.device.configure_kernels`, ``metadyn run --kernels
deterministic``): cuDNN's autotuned or atomics-based kernels may sum in another order on every run.

Under ``torchrun`` (an initialised process group with several ranks) :func:`fit` is data-parallel with
``DistributedDataParallel``: each rank takes its share of every global batch (``batch_size`` is the global
batch), gradients are averaged over the ranks so every rank takes the step one process would take on the
whole batch, rank 0 alone writes the checkpoint and every rank resumes from it
(:mod:`metadyn.core.distributed`).

A checkpoint is only written when it is good: the epoch's loss is finite and so is every parameter and
every buffer that was finite when training started (a diverged BatchNorm's ``running_var`` of ``inf``
counts as divergence even when the loss still reads 1e23). A checkpoint read back is checked for its
structure and its fit to the model before anything is restored from it.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metadyn.core import distributed
from metadyn.core.callbacks import Callback, TrainState
from metadyn.core.device import autocast, fits_on, module_device, resolve_precision
from metadyn.core.files import atomic_file, remove_stale_temps
from metadyn.core.losses import ce_loss
from metadyn.errors import InputError, NonFiniteLossError

DEVICES = "auto, cpu, cuda, cuda:N, mps"


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` when this
    machine has it. Anything else (``"tpu"``, ``"meta"``, a CUDA index beyond the GPUs present) is an
    :class:`InputError`, raised before any work starts."""
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(spec, str | torch.device):
        raise InputError(f"device must be a string such as {DEVICES}, got {type(spec).__name__}")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"unknown device {str(spec)[:40]!r}; choose from: {DEVICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(spec)!r} was asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(spec)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {str(spec)!r} was asked for but MPS is not available on this machine")
        return dev
    raise InputError(f"device {str(spec)!r} cannot run metadyn; choose from: {DEVICES}")


def _torch_seed(seed: int) -> int:
    """``seed`` in torch's seed range (any integer; those below 2**63 are unchanged)."""
    return int(seed) % 2**63


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(_torch_seed(seed))
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- checkpoints


def training_seconds(history: Sequence[dict]) -> float | None:
    """Wall seconds of a training from its history (every epoch's ``seconds``, resumed ones included: the history
    is checkpointed); None when an epoch has no time recorded."""
    times = [h.get("seconds") for h in history]
    return None if not times or None in times else float(sum(times))


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Write ``obj`` with ``torch.save`` to a temp file beside ``path``, then rename it over ``path``.

    Under ``torchrun`` this is collective (every rank calls it at the same point, as every rank runs the same
    code): rank 0 alone writes, and every rank waits at a barrier until the file is there, so any rank may read
    it right after."""
    if distributed.is_rank0():
        _write_checkpoint(obj, Path(path))
    distributed.barrier()


def _write_checkpoint(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, fsync=True) as f:
        torch.save(obj, f)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Read a checkpoint safely (``weights_only=True``); a corrupt file is an :class:`InputError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"checkpoint {str(path)!r} is a folder") from None
    except Exception as e:  # unpickling errors, truncated files
        raise InputError(f"checkpoint {str(path)!r} cannot be read safely: {type(e).__name__}") from None


_CHECKPOINT_KEYS = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "step": int, "history": list}


def _check_checkpoint(ck: Any, path) -> None:
    """Refuse anything but a checkpoint :func:`fit` wrote: its keys, their types, non-negative counters."""
    where = f"checkpoint {str(path)!r}"
    if not isinstance(ck, dict):
        raise InputError(f"{where} is not a training checkpoint (it holds a {type(ck).__name__}, not a mapping)")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise InputError(f"{where} is not a training checkpoint (no {', '.join(missing)})")
    for k, tp in _CHECKPOINT_KEYS.items():
        if isinstance(ck[k], bool) or not isinstance(ck[k], tp):
            raise InputError(f"{where}: '{k}' must be {tp.__name__}, got {type(ck[k]).__name__}")
    if ck["epoch"] < 0 or ck["step"] < 0 or len(ck["history"]) != ck["epoch"] \
            or not all(isinstance(h, dict) for h in ck["history"]):
        raise InputError(f"{where} is inconsistent (epoch {ck['epoch']}, step {ck['step']}, "
                         f"{len(ck['history'])} history entries)")
    if not all(isinstance(v, Tensor) for v in ck["model"].values()):
        raise InputError(f"{where}: the model state holds values that are not tensors")
    if not isinstance(ck.get("loss", {}), dict) or not isinstance(ck.get("callbacks", []), list | type(None)):
        raise InputError(f"{where}: 'loss' must be a mapping and 'callbacks' a list")


def _restore(what: str, load, state, path) -> None:
    """``load(state)`` for one part of a checkpoint; a mismatch is an InputError naming the part."""
    try:
        load(state)
    except InputError:
        raise
    except Exception as e:  # wrong keys or shapes, a different optimizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first if len(first) <= 160 else first[:157] + "..."
        raise InputError(f"checkpoint {str(path)!r} does not fit this {what}: {first}") from None


def _same_kinds(loaded: dict, own: dict, what: str, path) -> None:
    """Refuse a loaded state dict whose keys or value types differ from the object's own (``own``); a
    checkpoint is restored only into what wrote one like it."""
    extra = [k for k in loaded if k not in own]
    if extra:
        raise InputError(f"checkpoint {str(path)!r} does not fit this {what}: unexpected key {str(extra[0])[:40]!r}")
    for k, v in own.items():
        if k not in loaded:
            continue
        w = loaded[k]
        num = (int, float)
        same = (isinstance(v, bool) == isinstance(w, bool)) and (
            isinstance(w, type(v)) or (isinstance(v, num) and isinstance(w, num)) or v is None or w is None)
        if not same:
            raise InputError(f"checkpoint {str(path)!r} does not fit this {what}: {k!r} is a {type(w).__name__}, "
                             f"not a {type(v).__name__}")


def _load_optimizer(opt: torch.optim.Optimizer, sd: dict, path) -> None:
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or not isinstance(sd.get("state"), dict) or len(groups) != len(opt.param_groups):
        raise InputError(f"checkpoint {str(path)!r} does not fit this optimizer: its parameter groups differ")
    for loaded, own in zip(groups, opt.state_dict()["param_groups"]):
        if not isinstance(loaded, dict):
            raise InputError(f"checkpoint {str(path)!r} does not fit this optimizer: a group is not a mapping")
        _same_kinds(loaded, own, "optimizer", path)
    opt.load_state_dict(sd)


def _tensors(modules: Sequence[nn.Module | None]) -> dict[str, Tensor]:
    """The floating-point parameters and buffers of ``modules`` by name (the loss's prefixed ``loss.``)."""
    out = {}
    for prefix, m in zip(("", "loss."), modules):
        if m is not None:
            for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
                if t.is_floating_point():
                    out[prefix + name] = t
    return out


def _first_nonfinite(modules: Sequence[nn.Module | None], names: Sequence[str] | None = None) -> str | None:
    """The first of ``names`` (default: all) whose parameter or buffer is not finite (one host sync when all are)."""
    tensors = _tensors(modules)
    named = [(k, tensors[k]) for k in (tensors if names is None else names) if k in tensors]
    if not named:
        return None
    with torch.no_grad():
        ok = torch.stack([torch.isfinite(t).all() for _, t in named])
    return None if bool(ok.all()) else named[int((~ok).nonzero()[0])][0]


# --------------------------------------------------------------------------- the loop


class _Batches:
    """Shuffled mini-batches of an in-memory ``(x, y)`` pair (or an object with ``.x``/``.y``), seeded by
    ``(seed, epoch)`` so a resumed run sees the same order; a callable ``data(epoch)`` is used as is.

    The tensors are put on ``device`` once when they fit there (:func:`~metadyn.core.device.fits_on`), and
    each batch is gathered on the device; otherwise every batch is gathered on the host and copied from
    pinned memory. Under several ranks every global batch of ``batch_size`` samples is split into contiguous
    shares (sizes differ by at most one), and a last batch with fewer samples than ranks is dropped; ``share``
    of a batch is its rank's fraction of the global batch's samples."""

    def __init__(self, data, batch_size: int, seed: int, device: torch.device):
        self.fn = data if callable(data) else None
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.fn is None:
            x, y = (data.x, data.y) if hasattr(data, "x") else data
            nbytes = x.numel() * x.element_size() + y.numel() * y.element_size()
            if (x.device == device and y.device == device) or fits_on(device, nbytes):
                x, y = x.to(device), y.to(device)
            self.x, self.y = x, y

    def steps(self) -> int | None:
        """Batches per epoch (None for a callable)."""
        if self.fn is not None:
            return None
        n, b = len(self.x), self.batch_size
        return n // b + (1 if n % b >= max(self.world, 1) and n % b else 0)

    def epoch(self, epoch: int) -> Iterable[tuple[Any, Any, float]]:
        if self.fn is not None:
            for x, y in self.fn(epoch):
                yield x, y, 1.0 / self.world
            return
        x, y, dev = self.x, self.y, self.device
        g = torch.Generator().manual_seed(_torch_seed(self.seed * 100_003 + epoch))
        perm = torch.randperm(len(x), generator=g)
        if x.device == dev:
            perm = perm.to(dev)
        for s in range(0, len(perm), self.batch_size):
            i = perm[s : s + self.batch_size]
            total = len(i)
            if self.world > 1:
                if total < self.world:
                    break
                i = i.tensor_split(self.world)[self.rank]
            if x.device == dev:
                yield x[i], y[i], len(i) / total
            else:
                xb, yb = x[i], y[i]
                if dev.type == "cuda":
                    xb, yb = xb.pin_memory(), yb.pin_memory()
                yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True), len(i) / total


class _Step(nn.Module):
    """``loss(model(x), y)`` as one module, so that DistributedDataParallel sees every trainable parameter
    (the model's and a loss's own) in one forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable, loss_mod: nn.Module | None):
        super().__init__()
        self.model, self.loss_mod = model, loss_mod
        self.loss_fn = loss_fn if loss_mod is None else None

    def forward(self, x, y):
        fn = self.loss_fn if self.loss_mod is None else self.loss_mod
        return fn(self.model(x), y)


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
    device: str | torch.device | None = None,
    precision: str | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> TrainState:
    """Train ``model`` on ``data`` with ``loss(model(x), y)``.

    Args:
        model: usually a MultiExitNet (``loss`` receives its ExitOutput).
        data: ``(x, y)`` tensors, an object with ``.x``/``.y`` (a :class:`metadyn.data.Split`), or a
            callable ``epoch -> iterable of (x, y)`` (under ``torchrun`` it must give each rank its own share).
        loss: a method's loss ``loss(out, y)``; default exit-wise cross-entropy. A loss that is an
            ``nn.Module`` (one with parameters, e.g. projection heads) is trained along with the model.
        batch_size: samples per optimizer step (under ``torchrun``: over all ranks together).
        schedule: ``"cosine"`` (per-step cosine decay to 0) or ``"constant"``.
        augment: optional batch transform applied to ``x`` during training. A loss with an attribute
            ``views = V > 1`` receives ``V`` independently augmented copies of each batch stacked
            view-major, ``(V*B, ...)``, with the labels repeated.
        device: where to train (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``); ``None``: where ``model`` is.
            The model (and a loss module) is moved there; in-memory data is put there once when it fits.
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the forward pass and the loss; parameters, gradients
            and optimizer state stay float32); ``None``: :func:`~metadyn.core.device.default_precision`.
        checkpoint: where to write the checkpoint after every epoch; if the file exists, training
            resumes from it (its model, optimizer, schedule, history and each callback's
            :meth:`~metadyn.core.callbacks.Callback.state_dict`, restored before ``on_train_start``).
        progress: show a tqdm progress bar per epoch.

    Under ``torchrun`` (a process group with several ranks), the model runs wrapped in
    ``DistributedDataParallel`` (gradients averaged over ranks, buffers such as BatchNorm statistics taken
    from rank 0 at every forward; BatchNorm normalises with each rank's share of the batch, as DDP does); a
    model that all-reduces its own gradients says so with an attribute ``syncs_gradients = True``
    (:class:`~metadyn.meta.MetaLearner`) and is not wrapped. Dropout and augmentation draw from a stream
    seeded per rank; the data order is the same on every rank. Rank 0 writes the checkpoint, every rank
    reads it on resume.

    Returns:
        The final :class:`TrainState` (``state.history`` holds one dict per epoch).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
    """
    loss_fn = ce_loss() if loss is None else loss
    dev = module_device(model) if device is None else pick_device(device)
    precision = resolve_precision(precision)
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
    batches = _Batches(data, batch_size, seed, dev)
    steps_per_epoch = batches.steps()
    if schedule == "cosine" and steps_per_epoch:
        total = max(1, epochs * steps_per_epoch)  # epochs=0 (nothing to train) must not divide by zero
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    elif schedule in ("constant", "cosine"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    else:
        raise InputError(f"unknown schedule {schedule!r}; choose from: cosine, constant")

    state = TrainState(model, opt)
    # what must stay finite for a checkpoint to be good: every parameter and buffer finite before training
    tensors = _tensors([model, loss_mod])
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist() if tensors else []
    watched = [k for k, ok in zip(tensors, finite) if ok]
    many = distributed.active()
    if checkpoint is not None and distributed.is_rank0():
        remove_stale_temps(checkpoint)
    if checkpoint is not None and Path(checkpoint).exists():  # every rank resumes from the same file
        ck = load_checkpoint(checkpoint, map_location=dev)
        _check_checkpoint(ck, checkpoint)
        _restore("model", model.load_state_dict, ck["model"], checkpoint)
        if loss_mod is not None:
            _restore("method's loss", loss_mod.load_state_dict, ck.get("loss", {}), checkpoint)
        _restore("optimizer", lambda sd: _load_optimizer(opt, sd, checkpoint), ck["optimizer"], checkpoint)
        _same_kinds(ck["scheduler"], sched.state_dict(), "schedule", checkpoint)
        _restore("schedule", sched.load_state_dict, ck["scheduler"], checkpoint)
        state.epoch, state.step, state.history = ck["epoch"], ck["step"], list(ck["history"])
        _restore("run's callbacks", lambda saved: _restore_callbacks(callbacks, saved, checkpoint),
                 ck.get("callbacks"), checkpoint)  # absent in checkpoints of older runs
        bad = _first_nonfinite([model, loss_mod], watched)
        if bad is not None:
            raise InputError(f"checkpoint {str(checkpoint)!r} holds non-finite values in {bad!r}; it is not a good "
                             "checkpoint")
    distributed.barrier()  # every rank has read the checkpoint before rank 0 may write the next one
    step_fn: nn.Module = _Step(model, loss_fn, loss_mod)
    if many and not getattr(model, "syncs_gradients", False) and params:
        from torch.nn.parallel import DistributedDataParallel

        step_fn = DistributedDataParallel(step_fn, device_ids=[dev.index] if dev.type == "cuda" else None,
                                          find_unused_parameters=True)
    rank = distributed.rank()
    show = progress and rank == 0

    for cb in callbacks:
        cb.on_train_start(state)
    start = state.epoch
    for epoch in range(start, epochs):
        began = time.perf_counter()
        state.epoch = epoch
        # dropout/augmentation, reproducible on resume; another stream on every rank
        torch.manual_seed(_torch_seed(seed * 100_003 + epoch + 1_000_003 * rank))
        model.train()
        if loss_mod is not None:
            loss_mod.train()
        for cb in callbacks:
            cb.on_epoch_start(state)
        total_loss = torch.zeros((), device=dev)
        seen = 0
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", show)
        for b, (x, y, share) in enumerate(batches.epoch(epoch)):
            if views > 1:  # (V*B, ...): view-major, each view augmented independently
                x = torch.cat([augment(x) if augment is not None else x for _ in range(views)])
                y = y.repeat(views)
            elif augment is not None:
                x = augment(x)
            state.batch = (x, y)
            with autocast(dev, precision):
                value = step_fn(x, y)
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; a rank's share of an uneven batch weighs its mean loss so that
            # the average is the gradient of the whole batch's mean
            weight = share * distributed.world_size()
            (value if weight == 1 else value * weight).backward()
            state.loss = value.detach()
            for cb in callbacks:
                cb.on_after_backward(state)
            opt.step()
            sched.step()
            state.step += 1
            total_loss += state.loss * share if many else state.loss
            seen += 1
            for cb in callbacks:
                cb.on_batch_end(state)
            if bar is not None:
                bar.update(1)
            if (b + 1) % log_every == 0 and not many:
                _check_finite(total_loss, epoch, b, checkpoint)  # one host sync every log_every steps
                if bar is not None:
                    bar.set_postfix(loss=f"{float(total_loss) / seen:.4f}")
        if bar is not None:
            bar.close()
        distributed.all_reduce_coalesced([total_loss])  # the global batches' losses, the same on every rank
        _check_finite(total_loss, epoch, seen - 1, checkpoint)
        bad = _first_nonfinite([model, loss_mod], watched)
        if distributed.any_rank(bad is not None, dev):
            bad = bad or "a buffer of another rank"
            kept = f"; last good checkpoint kept at {checkpoint}" if checkpoint and Path(checkpoint).exists() else ""
            raise NonFiniteLossError(f"training stopped: {bad} became NaN or infinite in epoch {epoch + 1} "
                                     f"(the loss was {float(total_loss) / max(seen, 1):.3g}){kept}")
        state.history.append({"epoch": epoch + 1, "loss": float(total_loss) / max(seen, 1),
                              "lr": opt.param_groups[0]["lr"]})
        for cb in callbacks:
            cb.on_epoch_end(state)
        state.history[-1]["seconds"] = time.perf_counter() - began  # wall time of the epoch, its callbacks included
        state.epoch = epoch + 1
        if checkpoint is not None:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                             "loss": loss_mod.state_dict() if loss_mod is not None else {},
                             "scheduler": sched.state_dict(), "epoch": state.epoch, "step": state.step,
                             "history": state.history, "callbacks": [cb.state_dict() for cb in callbacks]},
                            checkpoint)  # collective: nobody runs ahead of the checkpoint it would resume from
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
