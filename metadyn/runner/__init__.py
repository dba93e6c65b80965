"""``metadyn run``: one experiment pipeline that every task kind fills in.

The template (:func:`run_task`): validate the task file into the kind's config, **build** everything
(data, model, method) with no side effect, create or check the output folder, **execute** (fit and
evaluate, checkpoints under the folder), then write ``metrics.json`` (one schema for every kind, see
:class:`~metadyn.runner.results.Results`), ``report.md`` and the plots. Everything that can be checked is
checked before the output folder is touched; an existing run folder is only ever resumed (same resolved
config), never overwritten by a different run and never removed.

A task kind is a :class:`TaskKind` subclass registered in :data:`metadyn.registry.TASK_KINDS` from a
module in :mod:`metadyn.runner.kinds` (one file per kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metadyn.config import TaskConfig, load_task, to_dict
from metadyn.core.train import pick_device, seed_everything
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS
from metadyn.runner.results import Results, atomic_write_text, json_text, settings

__all__ = ["Context", "Results", "TaskKind", "atomic_write_text", "json_text", "prepare_out_dir", "run_task"]


@dataclass
class Context:
    """Where a run writes (``out``), on what device, and whether it shows progress bars."""

    out: Path
    device: Any
    progress: bool = True


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
        from metadyn.runner.report import plot_groups

        plot_groups(out / "accuracy_vs_mflops.png", res.rows, res.curves, f"{cfg.task} (test)")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


def prepare_out_dir(out: Path, resolved: dict) -> bool:
    """Create ``out`` for a new run, or accept it for resuming the same run. Returns True when resuming.

    A folder holding a different run, or anything that is not a metadyn run, is an InputError; nothing
    in it is touched.
    """
    cfg_path = out / "config.yaml"
    if out.exists():
        if not out.is_dir():
            raise InputError(f"output path {str(out)!r} exists and is not a folder")
        if cfg_path.is_file():
            try:
                old = yaml.safe_load(cfg_path.read_text())
            except yaml.YAMLError:
                raise InputError(f"{cfg_path} is not valid YAML; choose another --out") from None
            diff = _first_difference(old, resolved)
            if diff:
                raise InputError(f"{out} holds a run with a different config ({diff}); "
                                 "pass --out to write elsewhere")
            return True
        if any(out.iterdir()):
            raise InputError(f"{out} exists and is not a metadyn run folder (no config.yaml); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, yaml.safe_dump(resolved, sort_keys=False))
    return False


def default_out_dir(cfg: TaskConfig, quick: bool) -> Path:
    return Path("runs") / (cfg.task + ("-quick" if quick else ""))


def run_task(task: str | Path, overrides=(), quick: bool = False, out: str | Path | None = None,
             progress: bool = True) -> tuple[Path, dict]:
    """Run a task (a task file's path, or the name of a shipped task); returns the output folder and the
    metrics written to ``metrics.json``."""
    cfg = load_task(task, overrides, quick)
    kind: TaskKind = TASK_KINDS.get(cfg.kind)()
    out_dir = Path(out) if out is not None else default_out_dir(cfg, quick)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    built = kind.build(cfg, device)
    prepare_out_dir(out_dir, to_dict(cfg))
    res = kind.execute(cfg, built, Context(out_dir, device, progress))
    metrics = {"task": cfg.task, "kind": cfg.kind, "seed": cfg.seed, "settings": settings(device), **res.to_json()}
    kind.plots(cfg, res, out_dir)
    atomic_write_text(out_dir / "report.md", kind.report(cfg, res, metrics))
    atomic_write_text(out_dir / "metrics.json", json_text(metrics))
    return out_dir, metrics
