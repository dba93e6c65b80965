"""What a run produces, in one schema for every task kind (``metrics.json``).

``rows``: one per (group, exit) — ``{group, exit, accuracy, mflops, ...}`` where ``group`` names the method,
variant or condition (``"model"`` when a kind trains one network) and optional keys are ``accuracy_std``
and ``n`` (over seeds), ``ci95`` (over episodes), ``ece``, ``ece_calibrated``, ``temperature``, ``val_accuracy``.
``curves``: accuracy-vs-MFLOPs points ``{group, mflops, accuracy, ...}``. ``budgets``: accuracy at a share of
the static FLOPs ``{group, budget_fraction, accuracy, mflops, ...}``. ``comparisons``: paired differences
``{group, against, at, difference, se, n, p, p_holm, verdict}`` (see :mod:`metadyn.runner.evaluate`).
``extra``: what only this kind has.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Results:
    dataset: str
    rows: list[dict]
    curves: list[dict] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(r["group"] for r in self.rows))

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "rows": self.rows, "curves": self.curves, "budgets": self.budgets,
                "comparisons": self.comparisons, "extra": self.extra}


def settings(device) -> dict:
    """What a figure depends on besides the config: device, threads, precision, versions."""
    import torch

    return {"device": str(device), "threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "torch": torch.__version__, "reuse_freed_memory": os.environ.get("METADYN_REUSE_MEMORY", "1") != "0"}


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
