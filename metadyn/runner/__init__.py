"""``metadyn run``: task file in, results folder out.

Everything that can be checked is checked before the output folder is touched: the task file, the
dataset, the model options. An existing run folder is only ever resumed (same resolved config) —
never overwritten by a different run and never removed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from metadyn.config import TaskConfig, load_task, to_dict
from metadyn.errors import InputError
from metadyn.registry import TASK_KINDS


@dataclass
class TaskKind:
    """A kind of experiment: its config schema and ``run(cfg, out_dir, prepare) -> metrics``.

    ``run`` must do all validation (data, model) first and call ``prepare()`` only then: ``prepare``
    creates or checks the output folder.
    """

    config: type
    run: Callable[[Any, Path, Callable[[], None]], dict]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temp file and a rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """Strict JSON (non-finite floats such as a last exit's ``-inf`` threshold become ``null``)."""
    return json.dumps(_finite(obj), indent=2) + "\n"


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


def run_task(path: str | Path, overrides=(), quick: bool = False, out: str | Path | None = None,
             progress: bool = True) -> tuple[Path, dict]:
    """Run the task file ``path``; returns the output folder and the metrics written to ``metrics.json``."""
    cfg = load_task(path, overrides, quick)
    kind = TASK_KINDS.get(cfg.kind)
    out_dir = Path(out) if out is not None else default_out_dir(cfg, quick)
    resolved = to_dict(cfg)

    def prepare() -> None:
        prepare_out_dir(out_dir, resolved)

    metrics = kind.run(cfg, out_dir, prepare, progress=progress)
    metrics = {"task": cfg.task, "kind": cfg.kind, **metrics}
    atomic_write_text(out_dir / "metrics.json", json_text(metrics))
    return out_dir, metrics


def _register_kinds() -> None:
    """Import every module of this package: each registers its task kind in TASK_KINDS."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "report":
            importlib.import_module(f"{__name__}.{mod.name}")


_register_kinds()
