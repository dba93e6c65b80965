"""Few-shot class pools from local folders in the official layouts of Omniglot, miniImageNet and
CIFAR-FS, and from the bundled ``digits`` and procedural ``glyphs``: one :class:`ClassPool` per
meta-split (train / val / test classes, disjoint). Nothing is downloaded.

Layouts (``root`` is the folder holding them):

- Omniglot (Lake et al.): ``images_background/<alphabet>/<character>/*.png`` and
  ``images_evaluation/...``, each an unpacked folder or the authors' zip (``images_background.zip``, whose
  members are ``images_background/...``); the 1623 characters, background first, sorted, are split
  1100 / 100 / 423 as in learn2learn's benchmark; ink is made 1 (the files draw black on white);
  ``rotations: true`` adds each character's 90/180/270-degree rotations as new classes.
  :func:`omniglot_characters` reads any background sets (the full ``images_background`` or the two
  "minimal" ``images_background_small1`` / ``small2``, zipped or unpacked) with each character's alphabet,
  and :func:`omniglot_runs` the paper's one-shot classification runs (``runNN/`` folders, or the zips
  holding them: the authors' ``all_runs.zip`` with runs 1-20, or ``one_shot_runs_01-10.zip``).
  All of these files are in github.com/brendenlake/omniglot (``python/``, ``python/one-shot-classification/``).
- miniImageNet (Ravi & Larochelle's split): ``images/*.jpg`` with ``train.csv``, ``val.csv``,
  ``test.csv`` (``filename,label``), or ``train|val|test/<wnid>/*.jpg``.
- CIFAR-FS (Bertinetto et al.): ``data/<class>/*.png`` with ``splits/bertinetto/{train,val,test}.txt``,
  or ``train|val|test/<class>/*.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metadyn.data.episodes import ClassPool
from metadyn.data.folders import IMAGE_EXTENSIONS, _class_dirs, _read_image, _require_root
from metadyn.data.local import MissingDataError, data_root
from metadyn.errors import InputError

SPLITS = ("train", "val", "test")
OMNIGLOT_SPLIT = (1100, 100)  # train, val; the rest is test
OMNIGLOT_MINIMAL = ("images_background_small1", "images_background_small2")  # Lake et al.'s "minimal" sets


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} of {name!r}; choose from: {', '.join(SPLITS)}")


def _check_listing(name: str, split: str, items: list[str], what: str, others: dict[str, set[str]]) -> None:
    """A meta-split listing names each item once and shares none with the other meta-splits' listings (a class
    listed twice gave an episode the same class under two labels; one in two splits is meta-test leakage)."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            raise InputError(f"dataset {name!r}: {what} {item!r} is listed twice in the {split!r} meta-split")
        seen.add(item)
    for other, names in others.items():
        shared = sorted(seen & names)
        if shared:
            raise InputError(f"dataset {name!r}: {what} {shared[0]!r} is in both the {split!r} and the {other!r} "
                             "meta-splits")


def _pool(name: str, classes: list[list[Path]], size: int | None, grayscale: bool, invert: bool = False) -> ClassPool:
    images, labels = [], []
    for label, files in enumerate(classes):
        for f in files:
            images.append(_image(name, f, size, grayscale))
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise InputError(f"dataset {name!r}: images differ in shape {sorted(shapes)}; set size")
    x = torch.from_numpy(np.stack(images))  # (N, C, H, W)
    return ClassPool(1.0 - x if invert else x, torch.tensor(labels))


def _split_folders(name: str, root: Path, split: str) -> list[list[Path]] | None:
    """``root/<split>/<class>/<image>`` if that layout is there."""
    if not (root / split).is_dir():
        return None
    return [files for _, files in _class_dirs(name, root / split, 1)]


def omniglot(root: str | None, split: str, size: int | None = 28, rotations: bool = False) -> ClassPool:
    """Omniglot characters of a meta-split (1100 / 100 / 423 classes); 28x28 by default, ink = 1.

    ``rotations``: every character also rotated by 90, 180 and 270 degrees, each a new class
    (:meth:`~metadyn.data.episodes.ClassPool.with_rotations`, as in Vinyals et al. and MAML), in every split.
    """
    if not isinstance(rotations, bool):
        raise InputError(f"dataset 'omniglot': rotations must be true or false, got {rotations!r}")
    _check_split("omniglot", split)
    path = data_root("omniglot", root, "omniglot")
    parts = [p for p in ("images_background", "images_evaluation") if _part_source(path, p) is not None]
    if not parts:
        raise InputError(f"dataset 'omniglot': no images_background/ or images_evaluation/ (folder or .zip) under "
                         f"{str(path)!r}")
    classes = [files for part in parts for _, files in _omniglot_part("omniglot", path, part)]
    n_train, n_val = OMNIGLOT_SPLIT
    if len(classes) < n_train + n_val + 1:  # a small tree (tests, subsets): same proportions
        n_train, n_val = max(1, len(classes) * 2 // 3), max(1, len(classes) // 6)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(classes))}
    lo, hi = bounds[split]
    pool = _pool("omniglot", classes[lo:hi], size, grayscale=True, invert=True)
    return pool.with_rotations() if rotations else pool


def miniimagenet(root: str | None, split: str, size: int | None = 84) -> ClassPool:
    """miniImageNet classes of a meta-split (64 / 16 / 20 classes of 600 RGB images)."""
    _check_split("miniimagenet", split)
    path = _require_root("miniimagenet", root)
    classes = _split_folders("miniimagenet", path, split)
    if classes is None:
        table = path / f"{split}.csv"
        if not table.is_file():
            raise InputError(f"dataset 'miniimagenet': neither {split}/ nor {split}.csv under {str(path)!r}")
        def rows(t: Path) -> list[dict]:
            with t.open(newline="") as f:
                out = list(csv.DictReader(f))
            if any("filename" not in r or "label" not in r for r in out):
                raise InputError(f"dataset 'miniimagenet': {t} must have columns filename,label")
            return out

        mine = rows(table)
        others = {o: rows(path / f"{o}.csv") for o in SPLITS if o != split and (path / f"{o}.csv").is_file()}
        _check_listing("miniimagenet", split, [r["filename"] for r in mine], "image",
                       {o: {r["filename"] for r in rs} for o, rs in others.items()})
        _check_listing("miniimagenet", split, list(dict.fromkeys(r["label"] for r in mine)), "class",
                       {o: {r["label"] for r in rs} for o, rs in others.items()})
        by_label: dict[str, list[Path]] = {}
        for row in mine:
            by_label.setdefault(row["label"], []).append(path / "images" / row["filename"])
        classes = [sorted(by_label[k]) for k in sorted(by_label)]
    return _pool("miniimagenet", classes, size, grayscale=False)


def cifar_fs(root: str | None, split: str, size: int | None = 32) -> ClassPool:
    """CIFAR-FS classes of a meta-split (64 / 16 / 20 CIFAR-100 classes of 600 images)."""
    _check_split("cifar_fs", split)
    path = _require_root("cifar_fs", root)
    classes = _split_folders("cifar_fs", path, split)
    if classes is None:
        listing = path / "splits" / "bertinetto" / f"{split}.txt"
        if not listing.is_file():
            raise InputError(f"dataset 'cifar_fs': neither {split}/ nor splits/bertinetto/{split}.txt under "
                             f"{str(path)!r}")
        def names(t: Path) -> list[str]:
            return [ln.strip() for ln in t.read_text().splitlines() if ln.strip()]

        others = {o: set(names(listing.with_name(f"{o}.txt"))) for o in SPLITS
                  if o != split and listing.with_name(f"{o}.txt").is_file()}
        mine = names(listing)
        _check_listing("cifar_fs", split, mine, "class", others)
        classes = []
        for name in mine:
            if name:
                folder = path / "data" / name
                if not folder.is_dir():
                    raise InputError(f"dataset 'cifar_fs': class folder {str(folder)!r} is missing")
                classes.append(sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS))
    return _pool("cifar_fs", classes, size, grayscale=False)


# --------------------------------------------------------------------------- Omniglot: zips, alphabets, one-shot runs


@dataclass(frozen=True)
class _Member:
    """An image inside a zip archive, read into memory."""

    archive: Path
    member: str
    data: bytes

    def __str__(self) -> str:
        return f"{self.archive}:{self.member}"


def _image(name: str, source: Path | _Member, size: int | None, grayscale: bool) -> np.ndarray:
    if not isinstance(source, _Member):
        return _read_image(name, source, size, grayscale)
    try:
        return _read_image(name, io.BytesIO(source.data), size, grayscale)
    except InputError:
        raise InputError(f"dataset {name!r}: cannot read image {str(source)!r}") from None


def _part_source(path: Path, part: str) -> Path | None:
    """``path/<part>/`` (unpacked) or ``path/<part>.zip`` (as distributed), whichever is there (the folder first)."""
    for candidate in (path / part, path / f"{part}.zip"):
        if candidate.is_dir() or candidate.is_file():
            return candidate
    return None


def _open_zip(name: str, archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"dataset {name!r}: {str(archive)!r} is not a readable zip file ({e})") from None


def _omniglot_part(name: str, path: Path, part: str) -> list[tuple[str, list[Path | _Member]]]:
    """``("alphabet/character", sorted images)`` of every character of a background / evaluation set, sorted,
    from the folder ``path/<part>/<alphabet>/<character>/`` or the zip ``path/<part>.zip`` (members
    ``<part>/<alphabet>/<character>/<image>``)."""
    source = _part_source(path, part)
    if source is None:
        raise MissingDataError(f"dataset {name!r}: neither {part}/ nor {part}.zip under {str(path)!r}")
    if source.is_dir():
        return [(c, list(files)) for c, files in _class_dirs(name, source, 2)]
    by_class: dict[str, list[_Member]] = {}
    with _open_zip(name, source) as zf:
        for member in zf.namelist():
            parts = member.split("/")
            if (len(parts) == 4 and parts[0] == part and all(parts[1:])
                    and Path(parts[3]).suffix.lower() in IMAGE_EXTENSIONS):
                by_class.setdefault(f"{parts[1]}/{parts[2]}", []).append(_Member(source, member, zf.read(member)))
    if len(by_class) < 2:
        raise InputError(f"dataset {name!r}: {str(source)!r} holds {len(by_class)} character folder(s) "
                         f"{part}/<alphabet>/<character>/<image>; expected the Omniglot layout")
    order = sorted(by_class, key=lambda c: tuple(c.split("/")))  # as the unpacked folder: alphabet, then character
    return [(c, sorted(by_class[c], key=lambda m: m.member)) for c in order]


@dataclass
class OmniglotCharacters:
    """Omniglot characters read from background sets.

    Attributes:
        x: ``(N, 1, size, size)`` images, ink 1 on 0. y: ``(N,)`` character index into ``names``.
        names: ``"alphabet/character"`` per character; alphabets: its alphabet per character.
    """

    x: torch.Tensor
    y: torch.Tensor
    names: list[str]

    @property
    def alphabets(self) -> list[str]:
        return [n.split("/", 1)[0] for n in self.names]

    def pool(self, alphabets: list[str] | None = None, rotations: bool = False) -> ClassPool:
        """The characters of ``alphabets`` (all when None) as a pool labelled by character index; with
        ``rotations`` their 90/180/270-degree rotations are new classes (character ``c`` rotated ``r`` times:
        class ``4 c + r``)."""
        keep = [i for i, a in enumerate(self.alphabets) if alphabets is None or a in alphabets]
        mask = torch.isin(self.y, torch.tensor(keep, dtype=torch.long))
        pool = ClassPool(self.x[mask], self.y[mask])
        return pool.with_rotations() if rotations else pool


def omniglot_characters(root: str | None, sets=OMNIGLOT_MINIMAL, size: int | None = 28) -> OmniglotCharacters:
    """The characters of the background ``sets`` (folders or zips under ``root``; default the two "minimal"
    sets), each character once: a character already read from an earlier set is skipped (the two minimal
    sets share the same Greek and Latin images)."""
    path = data_root("omniglot", root, "omniglot")
    if isinstance(sets, str) or not sets:
        raise InputError(f"dataset 'omniglot': sets must be a non-empty list of set names, got {sets!r}")
    names, images, labels = [], [], []
    for part in sets:
        for cls, files in _omniglot_part("omniglot", path, str(part)):
            if cls in set(names):
                continue
            for f in files:
                images.append(_image("omniglot", f, size, grayscale=True))
                labels.append(len(names))
            names.append(cls)
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise InputError(f"dataset 'omniglot': images differ in shape {sorted(shapes)}; set size")
    return OmniglotCharacters(1.0 - torch.from_numpy(np.stack(images)), torch.tensor(labels), names)


@dataclass
class OneShotRun:
    """One run of Lake et al.'s one-shot classification test: 20-way within one evaluation alphabet.

    Attributes:
        name: ``"runNN"``.
        train_files, test_files: the run's file names as ``class_labels.txt`` writes them, each list sorted
            (the order of the authors' ``demo_classification``).
        train_x, test_x: ``(20, 1, size, size)`` images, ink 1. test_y: ``(20,)`` each test image's answer, an
            index into ``train_files``.
        train_ink, test_ink: every image at full resolution as a boolean ink mask (a pixel of value 0, as the
            authors' ``LoadImgAsPoints`` reads the files).
    """

    name: str
    train_files: list[str]
    test_files: list[str]
    train_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_ink: list[np.ndarray]
    test_ink: list[np.ndarray]


_RUN = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<run>run\d+)/class_labels\.txt$")


def _run_sources(name: str, path: Path) -> dict[str, tuple[Path, str | None]]:
    """``runNN -> (folder or zip, prefix of its members)``: ``path/runNN/`` folders first, then zips in ``path``."""
    found: dict[str, tuple[Path, str | None]] = {}
    for d in sorted(path.glob("run*/class_labels.txt")):
        found[d.parent.name] = (d.parent, None)
    for archive in sorted(path.glob("*.zip")):
        if archive.name.startswith("images_"):
            continue
        with _open_zip(name, archive) as zf:
            for member in zf.namelist():
                m = _RUN.match(member)
                if m and m["run"] not in found:
                    found[m["run"]] = (archive, m["prefix"])
    return found


def _read_run_image(name: str, where: str, data: bytes, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(ink mask at full size, (1, size, size) float image with ink 1)`` of one run image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            ink = np.asarray(im.convert("F")) == 0  # scipy's imread(flatten=True), then logical_not(bool(I))
            im = im.convert("L")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            x = 1.0 - np.asarray(im, dtype=np.float32)[None] / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"dataset {name!r}: cannot read image {where!r} ({e})") from None
    return ink, x


def omniglot_runs(root: str | None, runs=None, size: int | None = 28) -> list[OneShotRun]:
    """Lake et al.'s one-shot classification runs under ``root`` (``runNN/`` folders or zips of them), in run order.

    ``runs``: the run numbers to read (e.g. ``[1, 2, 3]``); None reads every run found. Each run's
    ``class_labels.txt`` holds one line per test image, ``runNN/test/itemKK.png runNN/training/classJJ.png``
    (paths relative to the folder holding the runs): the answer is the training image on its line.
    """
    name = "omniglot"
    path = data_root(name, root, "omniglot")
    found = _run_sources(name, path)
    if not found:
        raise MissingDataError(f"dataset {name!r}: no one-shot runs (runNN/class_labels.txt, in folders or zips) "
                               f"under {str(path)!r}")
    wanted = sorted(found) if runs is None else [f"run{int(r):02d}" for r in runs]
    missing = [r for r in wanted if r not in found]
    if missing:
        raise MissingDataError(f"dataset {name!r}: one-shot run(s) {', '.join(missing)} not found under "
                               f"{str(path)!r} (found {', '.join(sorted(found))})")
    return [_read_run(name, run, *found[run], size) for run in wanted]


def _read_run(name: str, run: str, source: Path, prefix: str | None, size: int | None) -> OneShotRun:
    """One run from its folder (``prefix`` None: paths in ``class_labels.txt`` are relative to the folder's
    parent) or from a zip (paths relative to ``prefix`` inside it)."""
    with contextlib.ExitStack() as stack:
        zf = stack.enter_context(_open_zip(name, source)) if prefix is not None else None

        def read(rel: str) -> bytes:
            try:
                return zf.read(prefix + rel) if zf is not None else (source.parent / rel).read_bytes()
            except (KeyError, OSError):
                raise InputError(f"dataset {name!r}: {run}/class_labels.txt names {rel!r}, which is not in "
                                 f"{str(source)!r}") from None

        lines = [ln.split() for ln in read(f"{run}/class_labels.txt").decode().splitlines() if ln.strip()]
        if not lines or any(len(ln) != 2 for ln in lines):
            raise InputError(f"dataset {name!r}: {run}/class_labels.txt must hold lines 'test.png training.png'")
        for test, answer in lines:  # an answer from another run, or a training image tested, was accepted
            if not (test.startswith(f"{run}/test/") and answer.startswith(f"{run}/training/")):
                raise InputError(f"dataset {name!r}: {run}/class_labels.txt line {test} {answer} must pair a "
                                 f"{run}/test/ image with a {run}/training/ image")
        answers = dict(lines)
        if len(answers) != len(lines):
            raise InputError(f"dataset {name!r}: {run}/class_labels.txt lists a test image twice")
        test_files, train_files = sorted(answers), sorted(set(answers.values()))
        loaded = {f: _read_run_image(name, f, read(f), size) for f in train_files + test_files}
    return OneShotRun(
        name=run, train_files=train_files, test_files=test_files,
        train_x=torch.from_numpy(np.stack([loaded[f][1] for f in train_files])),
        test_x=torch.from_numpy(np.stack([loaded[f][1] for f in test_files])),
        test_y=torch.tensor([train_files.index(answers[f]) for f in test_files]),
        train_ink=[loaded[f][0] for f in train_files], test_ink=[loaded[f][0] for f in test_files])
