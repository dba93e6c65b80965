"""Task files (YAML) -> validated, typed config objects.

A task file is data: it is read with ``yaml.safe_load`` and checked field by field against a
dataclass schema; an unknown key or a wrong type is an :class:`~metadyn.errors.InputError` naming the
key (``unknown key 'train.epoch' (did you mean 'epochs'?)``). Each task kind (``kind:`` in the file,
registered in :data:`metadyn.registry.TASK_KINDS`) brings its own schema, a subclass of
:class:`TaskConfig`.

Overrides: ``--set train.epochs=3`` (the value is parsed as YAML), and ``--quick``, which applies the
file's own ``quick:`` mapping of dotted keys (small settings for CI) before the ``--set`` overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metadyn.errors import InputError

# --------------------------------------------------------------------------- declared checks


@dataclass(frozen=True)
class Check:
    """Range and choice constraints of one config field, checked on every value (each element of a list)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Any = None  # a collection of names, or a callable returning one (e.g. a registry's names)
    nonempty: bool = False
    distinct: bool = False

    def __call__(self, value: Any, key: str) -> None:
        if isinstance(value, dict) and self.nonempty and not value:
            raise InputError(f"'{key}' must not be empty")
        if isinstance(value, list):
            if self.nonempty and not value:
                raise InputError(f"'{key}' must not be empty")
            if self.distinct and len(set(map(repr, value))) != len(value):
                raise InputError(f"'{key}' has repeated values: {value}")
            for i, v in enumerate(value):
                self(v, f"{key}[{i}]")
            return
        if value is None:
            return
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"'{key}' must be a finite number, got {value}")
            for bound, ok, sign in ((self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                                    (self.le, lambda b: value <= b, "<="), (self.lt, lambda b: value < b, "<")):
                if bound is not None and not ok(bound):
                    raise InputError(f"'{key}' must be {sign} {bound:g}, got {value}")
        if self.choices is not None:
            choices = self.choices() if callable(self.choices) else self.choices
            if value not in choices:
                close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(f"unknown {key} {value!r}{hint}; choose from: {', '.join(map(str, choices))}")


def spec(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, doc: str = "",
         **check: Any) -> Any:
    """A config field with its constraints declared beside it: ``epochs: int = spec(30, ge=1)``,
    ``optimizer: str = spec("sgd", choices=OPTIMIZERS)``, ``seeds: list[int] = spec(factory=..., nonempty=True)``.
    :func:`validate` enforces them for every value, defaults included."""
    return field(default=default, default_factory=factory, metadata={"check": Check(**check), "doc": doc})


def validate(cfg: Any, prefix: str = "") -> Any:
    """Check every declared constraint of the dataclass ``cfg`` (recursively); returns ``cfg``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if "check" in f.metadata:
            f.metadata["check"](value, key)
        if dataclasses.is_dataclass(value):
            validate(value, f"{key}.")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if dataclasses.is_dataclass(v):
                    validate(v, f"{key}[{i}].")
    return cfg


@dataclass
class TaskConfig:
    """Fields every task file has."""

    task: str = ""
    kind: str = "anytime"
    seed: int = spec(0, ge=0)
    device: str = "auto"
    quick: dict = field(default_factory=dict)  # dotted-key overrides applied by --quick


# --------------------------------------------------------------------------- generic validation

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
               list: "a list"}


def _check_value(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float). A mapping for a
    dataclass field is merged onto ``default`` (the field's default instance) when there is one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(value, a, key, default)
            except InputError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
        base = default if isinstance(default, tp) else None
        return from_dict(tp, value, prefix=f"{key}.", base=base)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise InputError(f"'{key}' must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise InputError(f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        return {_check_value(k, args[0], f"{key} key {k!r}"): _check_value(v, args[1], f"{key}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"'{key}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"'{key}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise InputError(f"'{key}' must be {_TYPE_NAMES[tp]}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in a schema, not bad input


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with the key's name.

    Keys not in ``data`` keep their defaults; a nested mapping updates the nested default rather than
    replacing it (``hybrid: {epochs: 20}`` keeps the stage's own Adam defaults). ``base``: the instance
    whose values are the defaults (default: ``cls``'s own).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"unknown key '{prefix}{key}'{hint}")
        default = getattr(base, key) if base is not None else _field_default(fields[key])
        kwargs[key] = _check_value(value, hints[key], f"{prefix}{key}", default)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for ``config.yaml`` and ``metrics.json``)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- reading task files


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.load`` with the safe loader (no tags that build Python objects)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def read_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` a task file; any problem is a one-line :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"task file {str(path)!r} does not exist")
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InputError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of keys (task, kind, data, ...), got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise InputError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise InputError(f"--set {key}: value {raw!r} is not valid YAML") from None
    return key.strip(), value


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key = "a.b"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            head = ".".join(parts[: i + 1])
            raise InputError(f"cannot set '{key}': '{head}' is not a mapping")
        node = nxt
    node[parts[-1]] = value


TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the task files shipped with metadyn (package data)


def task_names() -> list[str]:
    """Names of the task files shipped with metadyn (``metadyn run NAME``)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def find_task(task: str | Path) -> Path:
    """A task file: ``task`` itself when it is an existing file (or looks like a path), else the shipped
    task of that name (``digits_anytime`` -> ``metadyn/tasks/digits_anytime.yaml``)."""
    path = Path(task)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = TASKS_DIR / f"{task}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(str(task), task_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InputError(f"no task file {str(task)!r} and no shipped task of that name{hint}; "
                     f"shipped: {', '.join(task_names())}")


def load_task(path: str | Path, overrides: list[str] | tuple = (), quick: bool = False) -> TaskConfig:
    """Read, override and validate a task file (a path, or the name of a shipped task) into its kind's
    config class."""
    from metadyn.registry import TASK_KINDS

    path = find_task(path)
    data = read_yaml(path)
    data.setdefault("task", Path(path).stem)
    kind_name = data.get("kind", "anytime")
    if not isinstance(kind_name, str):
        raise InputError(f"'kind' must be a string, got {kind_name!r}")
    kind = TASK_KINDS.get(kind_name)
    if quick:
        q = data.get("quick") or {}
        if not isinstance(q, dict):
            raise InputError(f"'quick' must be a mapping of dotted keys, got {q!r}")
        for k, v in q.items():
            set_dotted(data, str(k), v)
    for text in overrides:
        set_dotted(data, *parse_override(text))
    return validate(from_dict(kind.config, data))


def checked_call(fn, options: dict, where: str, **fixed):
    """Call ``fn(**fixed, **options)``; options it does not take are an InputError naming ``where``."""
    import inspect

    try:
        sig = inspect.signature(fn)
        sig.bind(**fixed, **options)
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None
    except ValueError:  # no signature available; let the call decide
        pass
    return fn(**fixed, **options)
