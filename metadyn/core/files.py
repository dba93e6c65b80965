"""Files that runs, benchmarks and tools write: atomically (a temp file beside the target, then a rename), with
the permissions the umask gives any new file, so a reader never sees half a file and a process killed half-way
leaves only a ``.<name>.<random>.tmp`` beside the target (:func:`remove_stale_temps` clears those)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def new_file_mode() -> int:
    """The permissions a new file gets under the process's umask (``mkstemp`` alone gives 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing (``mode`` ``"wb"`` or ``"w"``); when the block ends without
    an error it is renamed over ``path`` (after an ``fsync`` with ``fsync=True``), otherwise removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), new_file_mode())
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (:func:`atomic_file`)."""
    with atomic_file(path, "w") as f:
        f.write(text)


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove the temp files an atomic write of ``path`` left when its process was killed half-way."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


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
