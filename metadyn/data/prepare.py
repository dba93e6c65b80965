"""From downloaded files to a ready data folder: ``metadyn data`` and ``metadyn data prepare``.

metadyn downloads nothing. A user downloads a data set's files from its authors (the URLs are in
:data:`SOURCES`), and ``metadyn data prepare NAME --from DIR`` finds them anywhere under ``DIR`` (a Downloads
folder, an unpacked archive, a Debian package's folder), checks each one (an IDX file's header and length, a
zip's directory and checksums), and copies it into ``$METADYN_DATA/<folder>`` (or ``--to ROOT``), where the
loaders look by default. ``metadyn data`` lists every data set read from disk, where it is looked for, and
whether its files are there.

Files are copied atomically (a temporary file, then a rename); a file already in place with the same bytes is
left alone, and one with different bytes is never overwritten (one line, exit code 2); every conflict is found
before the first file is copied. MNIST-family files (the same names for MNIST and Fashion-MNIST) are taken from
one folder, which must be the only one under ``DIR`` holding a complete set, and the set is read as the loader
reads it (as many labels as images, 28x28, labels below 10).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from metadyn.core.files import atomic_file
from metadyn.data.local import ENV, MissingDataError
from metadyn.errors import InputError

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Source:
    """Where a data set's files come from and which of them a ready folder needs.

    ``needs``: groups, each satisfied by any one of its alternatives (a tuple of file names); ``optional``:
    files copied when found."""

    folder: str
    url: str
    needs: tuple[tuple[tuple[str, ...], ...], ...]
    optional: tuple[str, ...] = ()
    system: tuple[str, ...] = ()
    together: bool = False  # every file from one folder (MNIST and Fashion-MNIST share their file names)


def _idx_needs() -> tuple[tuple[tuple[str, ...], ...], ...]:
    return tuple(((f"{stem}.gz",), (stem,)) for stem in IDX)


SOURCES = {
    "fashion_mnist": Source(
        "fashion-mnist", "github.com/zalandoresearch/fashion-mnist, folder data/fashion/ (or Debian's "
        "dataset-fashion-mnist package)", _idx_needs(), system=("/usr/share/datasets/fashion-mnist",),
        together=True),
    "mnist": Source("mnist", "yann.lecun.com/exdb/mnist/ (or one of its mirrors)", _idx_needs(), together=True),
    "omniglot": Source(
        "omniglot", "github.com/brendenlake/omniglot: python/images_background_small1.zip, "
        "images_background_small2.zip (or images_background.zip) and python/one-shot-classification/ "
        "(all_runs.zip, or one_shot_runs_01-10.zip)",
        ((("images_background_small1.zip", "images_background_small2.zip"), ("images_background.zip",)),
         (("one_shot_runs_01-10.zip",), ("all_runs.zip",))),
        optional=("images_evaluation.zip",)),
}


def _check(name: str, path: Path) -> None:
    """A file worth copying: an IDX file with a consistent header, or a zip whose members are intact and laid out
    as the loaders read them (``images_background_small1.zip`` holds ``images_background_small1/.../*.png``; a
    runs zip holds ``runNN/class_labels.txt``)."""
    if path.name.startswith(IDX):
        from metadyn.data.fashion_mnist import read_idx

        read_idx(path, 3 if "images" in path.name else 1, name)
        return
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                members = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"dataset {name!r}: {str(path)!r} is not a readable zip file ({e})") from None
        if bad is not None:
            raise InputError(f"dataset {name!r}: {str(path)!r} is damaged (member {bad!r} fails its checksum)")
        if path.name.startswith("images_"):
            want = f"{path.stem}/"
            if not any(m.startswith(want) and m.lower().endswith(".png") for m in members):
                raise InputError(f"dataset {name!r}: {str(path)!r} holds no {want}<alphabet>/<character>/*.png images; "
                                 "is it the authors' file of that name?")
        elif not any(m.rsplit("/", 1)[-1] == "class_labels.txt" for m in members):
            raise InputError(f"dataset {name!r}: {str(path)!r} holds no runNN/class_labels.txt")


def _check_set(name: str, files: list[Path]) -> None:
    """An IDX set read as the loader reads it: as many labels as images, 28x28 images, labels below 10."""
    from metadyn.data.fashion_mnist import read_idx_pair

    folder = files[0].parent
    for part in ("train", "test"):
        read_idx_pair(name, folder, part, 10)


def _find_together(name: str, src: Path, source: Source) -> list[Path]:
    """Every needed file from ONE folder under ``src`` (in each group the first alternative, as the loader reads
    them: ``.gz`` before the unpacked file). Several folders with a complete set are ambiguous (a Downloads folder
    with MNIST and Fashion-MNIST, whose files have the same names): refused."""
    folders = sorted({p.parent for g in source.needs for alt in g for f in alt for p in [src / f, *src.rglob(f)]
                      if p.is_file()})
    complete = []
    for folder in folders:
        picked = []
        for group in source.needs:
            alt = next((a for a in group if all((folder / f).is_file() for f in a)), None)
            if alt is None:
                break
            picked += [folder / f for f in alt]
        else:
            complete.append(picked)
    if len(complete) > 1:
        where = ", ".join(repr(str(c[0].parent)) for c in complete[:3])
        raise InputError(f"dataset {name!r}: several folders under {str(src)!r} hold a complete set ({where}); "
                         "point --from at the one you mean")
    if not complete:
        wanted = ", ".join(" or ".join(" + ".join(a) for a in g) for g in source.needs)
        raise MissingDataError(f"dataset {name!r}: no folder under {str(src)!r} holds all of {wanted}; download "
                               f"from {source.url}")
    return complete[0]


def _find(src: Path, file: str) -> Path | None:
    """The first ``file`` under ``src`` (its top level first, then depth-first in name order)."""
    if (src / file).is_file():
        return src / file
    for path in sorted(src.rglob(file)):
        if path.is_file():
            return path
    return None


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise InputError(f"metadyn data prepare: unknown data set {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def default_root(to: str | None) -> Path:
    """``to``, else ``$METADYN_DATA``; an :class:`InputError` when neither is given."""
    if to is not None:
        return Path(to).expanduser()
    env = os.environ.get(ENV)
    if not env:
        raise InputError(f"metadyn data prepare: give --to ROOT, or set ${ENV} (the folder holding every data set)")
    return Path(env).expanduser()


def plan(name: str, src: str | Path) -> list[Path]:
    """The files under ``src`` that make ``name``'s folder complete (one alternative per group, the first one
    found complete), plus the optional ones found. :class:`MissingDataError` names what is missing and where it
    comes from."""
    source, src = _source(name), Path(src).expanduser()
    if not src.is_dir():
        raise MissingDataError(f"metadyn data prepare: {str(src)!r} is not a folder")
    if source.together:
        return _find_together(name, src, source) + [p for p in (_find(src, f) for f in source.optional) if p]
    chosen: list[Path] = []
    for group in source.needs:
        for alternative in group:
            found = [_find(src, f) for f in alternative]
            if all(found):
                chosen += found
                break
        else:
            wanted = " or ".join(" + ".join(a) for a in group)
            raise MissingDataError(f"dataset {name!r}: {wanted} not found under {str(src)!r}; download from "
                                   f"{source.url}")
    chosen += [p for p in (_find(src, f) for f in source.optional) if p is not None]
    return chosen


def _action(path: Path, dest: Path) -> str:
    """``already there`` or ``copy``; an :class:`InputError` when ``dest`` (or the other form of an IDX file, which
    the loader would read instead: ``X.gz`` before ``X``) holds something else."""
    other = dest.with_suffix("") if dest.suffix == ".gz" else dest.with_name(dest.name + ".gz")
    if dest.name.startswith(IDX) and other.exists():
        raise InputError(f"metadyn data prepare: {str(other)!r} is there too, and the loader reads the .gz form first; "
                         "remove the one you do not want")
    if dest.exists():
        if dest.is_file() and filecmp.cmp(path, dest, shallow=False):
            return "already there"
        raise InputError(f"metadyn data prepare: {str(dest)!r} exists with other contents; remove it to replace it")
    return "copy"


def _copy(path: Path, dest: Path) -> str:
    with atomic_file(dest) as out, open(path, "rb") as src:
        shutil.copyfileobj(src, out)
    return "copied"


def prepare(name: str, src: str | Path, to: str | None = None) -> list[tuple[Path, str]]:
    """Check ``name``'s files found under ``src`` and copy them into ``<root>/<folder>`` (root: ``to`` or
    ``$METADYN_DATA``). Every file is checked before anything is copied. Returns ``(destination, what
    happened)`` per file."""
    files = plan(name, src)
    if _source(name).together:
        _check_set(name, files)  # reads every file of the set as the loader does (headers included)
    else:
        for path in files:
            _check(name, path)
    folder = default_root(to) / _source(name).folder
    actions = [_action(p, folder / p.name) if folder.is_dir() else "copy" for p in files]  # every conflict first
    folder.mkdir(parents=True, exist_ok=True)
    return [(folder / p.name, _copy(p, folder / p.name) if a == "copy" else a) for p, a in zip(files, actions)]


def status() -> list[tuple[str, str, str]]:
    """``(data set, folder it is read from, state)`` for every data set in :data:`SOURCES`: ``ready``, or what
    is missing."""
    rows = []
    env = os.environ.get(ENV)
    for name, source in SOURCES.items():
        places = ([Path(env).expanduser() / source.folder] if env else []) + [Path(p) for p in source.system]
        where = next((p for p in places if p.is_dir()), None)
        if where is None:
            looked = ", ".join(str(p) for p in places) or f"${ENV} is not set"
            rows.append((name, looked, f"missing (download from {source.url})"))
            continue
        try:
            plan(name, where)
            rows.append((name, str(where), "ready"))
        except MissingDataError as e:
            rows.append((name, str(where), f"incomplete: {e}"))
    return rows
