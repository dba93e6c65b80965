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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metadyn.errors import InputError


@dataclass
class TaskConfig:
    """Fields every task file has."""

    task: str = ""
    kind: str = "anytime"
    seed: int = 0
    device: str = "auto"
    quick: dict = field(default_factory=dict)  # dotted-key overrides applied by --quick


# --------------------------------------------------------------------------- generic validation

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
               list: "a list"}


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float, list -> tuple)."""
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
                return _check_value(value, a, key)
            except InputError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise InputError(f"'{key}' must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise InputError(f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
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


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with the key's name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _check_value(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


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


def load_task(path: str | Path, overrides: list[str] | tuple = (), quick: bool = False) -> TaskConfig:
    """Read, override and validate a task file into its kind's config class."""
    import metadyn.runner  # noqa: F401  (registers the task kinds)
    from metadyn.registry import TASK_KINDS

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
    return from_dict(kind.config, data)


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
