"""``metadyn run``: one experiment pipeline that every task kind fills in.

The template (:func:`run_task`): validate the task file into the kind's config, **build** everything
(data, model, method) with no side effect, create or check the output folder and lock it, **execute** (fit
and evaluate, checkpoints under the folder), then write ``metrics.json`` (one schema for every kind, see
:class:`~metadyn.runner.results.Results`), ``report.md`` and the plots. Everything that can be checked is
checked before the output folder is touched; an existing run folder is only ever resumed (same resolved
config), never overwritten by a different run and never removed.

The run folder (:func:`run_folder`) is held under an exclusive lock (``flock`` on ``.lock`` inside it) for
the whole run: a second run into the same folder is refused while the first one lives, and the lock goes
with the process that held it (a killed run leaves nothing to clean up). A folder that holds nothing but
its ``config.yaml`` (a run that failed before its first checkpoint) may be taken by another config. A run
that fails after the folder was prepared keeps every checkpoint it wrote (a re-run with the same config
resumes from them) and writes ``failed.json``: the error, the files kept, and what the kind could compute
(:attr:`Context.partial`, or the results when they were complete but held a NaN).

Where a run computes is one switch: ``device:`` in the task file (``auto``, ``cpu``, ``cuda``, ``cuda:N``), which
``--device`` on ``metadyn run`` overrides. The device is not part of what identifies a run: a run folder started on
a GPU resumes on the CPU and the other way round (``metrics.json``'s ``settings`` record where each finished).

Under ``torchrun --nproc_per_node N metadyn run ...`` every rank runs the pipeline (each on its own GPU, or on the
CPU with gloo): training is data-parallel (:func:`~metadyn.core.train.fit`), rank 0 alone creates, locks and
writes the run folder, and the other ranks read the checkpoints it writes.

A task kind is a :class:`TaskKind` subclass registered in :data:`metadyn.registry.TASK_KINDS` from a
module in :mod:`metadyn.runner.kinds` (one file per kind).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metadyn.config import TaskConfig, load_task, safe_load, short, to_dict
from metadyn.core import distributed
from metadyn.core.device import configure_kernels, default_precision
from metadyn.core.files import atomic_write_text, json_text
from metadyn.core.train import pick_device, seed_everything
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner.results import Results, settings

__all__ = ["Context", "Results", "TaskKind", "run_folder", "run_task"]

LOCK = ".lock"  # the run folder's lock file (flock'ed while a run lives)
FAILED = "failed.json"  # written when a run fails after its folder was prepared


@dataclass
class Context:
    """Where a run writes (``out``), on what device, and whether it shows progress bars. ``partial``: what
    a kind has computed so far (plain data: e.g. ``partial["history"] = state.history`` after training); if
    a later step fails, it is written to ``failed.json`` beside the checkpoints."""

    out: Path
    device: Any
    progress: bool = True
    partial: dict = field(default_factory=dict)


class TaskKind:
    """A kind of experiment. Subclasses set ``config`` (a :class:`~metadyn.config.TaskConfig` dataclass)
    and implement :meth:`build`, :meth:`execute` and :meth:`report`; :meth:`plots` defaults to the
    accuracy-vs-MFLOPs plot of every group."""

    config: type = TaskConfig

    def build(self, cfg: Any, device) -> Any:
        """Validate what the config schema cannot and build data, model and method; no side effects."""
        raise NotImplementedError

    def execute(self, cfg: Any, built: Any, ctx: Context) -> Results:
        """Fit and evaluate (checkpoints under ``ctx.out``); returns the results."""
        raise NotImplementedError

    def sections(self, cfg: Any, res: Results) -> list[tuple[str, str]]:
        """The report's sections after its introduction: ``(heading, Markdown body)`` pairs."""
        raise NotImplementedError

    def report(self, cfg: Any, res: Results, metrics: dict) -> str:
        """``report.md`` as a function of the results: the kind's protocol (its module docstring), the settings
        a figure depends on, its sections, and the resolved configuration (every hyper-parameter)."""
        import sys

        from metadyn.runner.report import FLOPS_NOTE, settings_line

        doc = (sys.modules[type(self).__module__].__doc__ or "").strip()
        parts = [f"# {cfg.task}", doc, f"{settings_line(metrics)} {FLOPS_NOTE}"]
        parts += [f"## {heading}\n\n{body}" for heading, body in self.sections(cfg, res)]
        config = yaml.safe_dump(to_dict(cfg), sort_keys=False).strip()
        parts.append(f"## Configuration\n\n```yaml\n{config}\n```")
        return "\n\n".join(parts) + "\n"

    def plots(self, cfg: Any, res: Results, out: Path) -> None:
        from metadyn.core.plots import plot_groups

        plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test)")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {short(a)} -> {short(b)}"


def _identity(config: Any) -> Any:
    """What identifies a run: its resolved config and precision (a folder written before the precision was
    recorded ran in fp32), without the device it computes on. A resumed run never mixes precisions."""
    if not isinstance(config, dict):
        return config
    return {"precision": "fp32", **{k: v for k, v in config.items() if k != "device"}}


def _is_scratch(p: Path) -> bool:
    """A file a run may leave that holds no result: the lock, ``failed.json``, an atomic write's temp file."""
    return p.name in (LOCK, FAILED) or (p.name.startswith(".") and p.name.endswith(".tmp"))


def _holds_only_config(out: Path) -> bool:
    """Whether ``out`` holds no file but its config (a run that failed before its first checkpoint)."""
    return all(p.is_dir() or p.name == "config.yaml" or _is_scratch(p) for p in out.rglob("*"))


def _os_error(e: OSError, what: str, path: Path) -> InputError:
    return InputError(f"cannot {what} {str(path)!r}: {e.strerror or type(e).__name__}")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock``; a second holder is refused at once (exit 2)."""
    import fcntl

    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _os_error(e, "write to the run folder", out) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise _os_error(e, "lock the run folder", out) from None
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            by = f" (process {holder})" if holder.isdigit() else ""
            raise InputError(f"another metadyn run{by} is writing to {out}; wait for it or pass another --out") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_folder(out: Path) -> None:
    """Refuse a path that is not a folder, or a folder holding something other than a metadyn run."""
    if not out.is_dir():
        raise InputError(f"output path {str(out)!r} exists and is not a folder")
    try:
        names = [p for p in out.iterdir() if not _is_scratch(p)]
    except OSError as e:
        raise _os_error(e, "read the run folder", out) from None
    if names and not (out / "config.yaml").is_file():
        raise InputError(f"{out} exists and is not a metadyn run folder (no config.yaml); choose another --out")


def _prepare_out_dir(out: Path, resolved: dict) -> bool:
    """Check ``out`` (already created and locked, see :func:`run_folder`) for this run: write ``config.yaml`` to a
    new folder, or accept the folder for resuming the same run. Returns True when resuming.

    A folder holding a different run, or anything that is not a metadyn run, is an InputError; nothing
    in it is touched. A folder holding only the ``config.yaml`` of a run that failed before its first
    checkpoint is taken by the new config.
    """
    _check_folder(out)
    cfg_path = out / "config.yaml"
    resuming = False
    if cfg_path.is_file():
        try:
            if cfg_path.stat().st_size > 1 << 20:
                raise InputError(f"{cfg_path} is not a metadyn config; choose another --out")
            old = safe_load(cfg_path.read_text(), str(cfg_path))
        except (InputError, OSError, UnicodeDecodeError):
            raise InputError(f"{cfg_path} cannot be read as a metadyn config; choose another --out") from None
        diff = _first_difference(_identity(old), _identity(resolved))
        if diff and not _holds_only_config(out):
            raise InputError(f"{out} holds a run with a different config ({diff}); pass --out to write elsewhere")
        resuming = not diff
    for p in out.glob(".*.tmp"):  # an atomic write killed half-way (we hold the lock: nobody is writing)
        p.unlink(missing_ok=True)
    if not resuming:
        atomic_write_text(cfg_path, yaml.safe_dump(resolved, sort_keys=False))
    return resuming


@contextlib.contextmanager
def run_folder(out: Path, resolved: dict, parents: bool = False) -> Iterator[bool]:
    """Create (at most its last level, or its parents too with ``parents``), lock and check the run folder
    ``out`` for the whole ``with`` block; yields True when resuming (see :func:`_prepare_out_dir`)."""
    if out.exists():
        _check_folder(out)  # before the lock file is created: a foreign folder is never written to
    else:
        try:
            out.mkdir(parents=parents)
        except FileExistsError:  # another run created it just now; the lock decides
            pass
        except FileNotFoundError:
            raise InputError(f"the folder {str(out.parent)!r} above --out does not exist; create it first") from None
        except OSError as e:
            raise _os_error(e, "create the run folder", out) from None
    with _locked(out):
        try:
            resuming = _prepare_out_dir(out, resolved)
        except OSError as e:
            raise _os_error(e, "write to the run folder", out) from None
        yield resuming


def default_out_dir(cfg: TaskConfig, quick: bool) -> Path:
    """``runs/<task>`` (``-quick`` with ``--quick``); a task name that is not a plain file name (``../x``,
    ``/tmp/x``, empty) would write elsewhere and is refused."""
    name = cfg.task + ("-quick" if quick else "")
    if not cfg.task or cfg.task in (".", "..") or "/" in cfg.task or "\\" in cfg.task or "\0" in cfg.task:
        raise InputError(f"task name {short(cfg.task)} is not a plain name for the default folder runs/<task>; "
                         "pass --out")
    return Path("runs") / name


_SPREAD_KEYS = ("ci95", "se", "p", "p_holm")  # undefined (NaN) with one unit: not a result


def _first_nan(res: Results) -> str | None:
    """Where the results hold a NaN (e.g. an ECE of NaN logits), or None."""
    for part in ("rows", "curves", "budgets"):
        for i, row in enumerate(getattr(res, part)):
            for k, v in row.items():
                if k in _SPREAD_KEYS or k.endswith("_std"):
                    continue
                vals = v if isinstance(v, list) else [v]
                if any(isinstance(x, float) and math.isnan(x) for x in vals):
                    return f"{part}[{i}].{k} (group {row.get('group')!r})"
    return None


def _write_failure(out: Path, error: BaseException, partial: dict, metrics: dict | None) -> None:
    kept = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not _is_scratch(p))
    doc = {"error": str(error) or type(error).__name__, "type": type(error).__name__, "kept": kept, "partial": partial}
    if metrics is not None:
        doc["results"] = metrics
    try:
        atomic_write_text(out / FAILED, json_text(doc))
    except (OSError, TypeError, ValueError):  # the original error matters more than this note
        pass


def run_task(task: str | Path, overrides=(), quick: bool = False, out: str | Path | None = None,
             progress: bool = True, device: str | None = None, precision: str | None = None,
             kernels: str | None = None) -> tuple[Path, dict]:
    """Run a task (a task file's path, or the name of a shipped task); returns the output folder and the
    metrics written to ``metrics.json``. ``out`` (default ``runs/<task>``): an explicit folder is created
    only when the folder above it exists. ``device`` overrides the task's ``device:``; ``precision``
    (``"fp32"``, ``"bf16"``) is the precision of every fit and inference of the run
    (:func:`~metadyn.core.device.default_precision`); ``kernels`` sets the process's kernel switches
    (:func:`~metadyn.core.device.configure_kernels`). All three are recorded in ``metrics.json``'s ``settings``."""
    if device is not None:
        overrides = [*overrides, f"device={device}"]
    cfg = load_task(task, overrides, quick)
    kind: TaskKind = TASK_KINDS.get(cfg.kind)()
    out_dir = Path(out) if out is not None else default_out_dir(cfg, quick)
    if kernels is not None:
        configure_kernels(kernels)
    dev = pick_device(cfg.device)
    joined = distributed.launched() and not distributed.active()
    if joined:  # started by torchrun: join its process group, each rank on its own GPU
        dev = distributed.init_from_env(dev)
    try:
        with default_precision(precision or "fp32"):
            result = _run(cfg, kind, out_dir, dev, out is None, progress, precision or "fp32")
        if joined:
            distributed.barrier()  # every rank done before any tears the process group down
        return result
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(cfg: TaskConfig, kind: TaskKind, out_dir: Path, device, parents: bool, progress: bool,
         precision: str = "fp32") -> tuple[Path, dict]:
    seed_everything(cfg.seed)
    built = kind.build(cfg, device)
    rank0 = distributed.is_rank0()
    with contextlib.ExitStack() as stack:
        failure = None
        if rank0:  # only rank 0 touches the folder; the others wait for its verdict
            try:
                stack.enter_context(run_folder(out_dir, {**to_dict(cfg), "precision": precision}, parents=parents))
            except Exception as e:
                if not distributed.active():
                    raise
                failure = e
        message = distributed.broadcast_error(None if failure is None else (str(failure) or type(failure).__name__))
        if failure is not None:
            raise failure
        if message is not None:
            raise InputError(f"rank 0 could not prepare {out_dir}: {message}")
        ctx = Context(out_dir, device, progress and rank0)
        metrics = None
        try:
            res = kind.execute(cfg, built, ctx)
            metrics = {"task": cfg.task, "kind": cfg.kind, "seed": cfg.seed, "settings": settings(device),
                       **res.to_json()}
            nan = _first_nan(res)
            if nan is not None:
                raise InputError(f"evaluation produced NaN at {nan}: the trained network's outputs are not finite")
            if rank0:
                kind.plots(cfg, res, out_dir)
                atomic_write_text(out_dir / "report.md", kind.report(cfg, res, metrics))
                atomic_write_text(out_dir / "metrics.json", json_text(metrics))
        except Exception as e:
            if rank0:
                _write_failure(out_dir, e, ctx.partial, metrics)
            if isinstance(e, OSError):  # a full disk, a folder made read-only during the run
                raise _os_error(e, "complete the run in", out_dir) from None
            if isinstance(e, InputError):
                e.args = (f"{e} (details in {out_dir / FAILED})",)
            raise
        if rank0:
            (out_dir / FAILED).unlink(missing_ok=True)
    return out_dir, metrics
