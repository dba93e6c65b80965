"""Where data sets read from disk are found, and the error for one that is not there.

metadyn downloads nothing. A loader's ``root`` is the folder holding the data set's files; when a task leaves
it unset (``root: null``), the loader looks, in this order, in ``$METADYN_DATA/<folder>`` (the environment
variable names one folder holding every data set, e.g. ``METADYN_DATA=~/data`` with ``~/data/omniglot``
and ``~/data/fashion-mnist``) and in the system locations a distribution package installs (Debian's
``dataset-fashion-mnist`` puts its files in ``/usr/share/datasets/fashion-mnist``).

A data set that is simply not there raises :class:`MissingDataError`, an :class:`InputError` (exit code 2,
one line) that callers can tell apart from malformed files: the test suite skips a shipped task whose data
is absent instead of failing it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from metadyn.errors import InputError

ENV = "METADYN_DATA"


class MissingDataError(InputError):
    """A data set's folder or one of its files is not on this machine (nothing is downloaded)."""


def data_root(name: str, root: str | None, folder: str, system: Sequence[str] = ()) -> Path:
    """The folder data set ``name`` is read from: ``root`` when given, else ``$METADYN_DATA/<folder>``, else the
    first existing ``system`` location; :class:`MissingDataError` when there is none.

    Example::

        data_root("omniglot", None, "omniglot")     # $METADYN_DATA/omniglot
    """
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise MissingDataError(f"dataset {name!r}: root folder {str(path)!r} does not exist "
                                   "(metadyn downloads nothing)")
        return path
    tried = []
    env = os.environ.get(ENV)
    if env:
        tried.append(Path(env).expanduser() / folder)
    tried += [Path(p) for p in system]
    for path in tried:
        if path.is_dir():
            return path
    where = ", ".join(repr(str(p)) for p in tried) if tried else f"none (${ENV} is not set)"
    raise MissingDataError(f"dataset {name!r} is not on this machine: give data.root, or put it in "
                           f"${ENV}/{folder}; looked in: {where} (metadyn downloads nothing)")


def require_file(name: str, path: Path) -> Path:
    """``path`` if it is a file, else :class:`MissingDataError` naming it."""
    if not path.is_file():
        raise MissingDataError(f"dataset {name!r}: missing file {str(path)!r}")
    return path
