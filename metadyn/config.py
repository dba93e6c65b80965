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

import collections.abc
import dataclasses
import difflib
import inspect
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metadyn.errors import InputError

# --------------------------------------------------------------------------- values in messages

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def short(value: Any) -> str:
    """``repr(value)`` cut to about 80 characters, computed without expanding the whole value (an error message
    never prints a whole list of a million items, or an integer of a million digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15) \
        else f"{x:g}"


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
                raise InputError(f"'{key}' has repeated values: {short(value)}")
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
                    raise InputError(f"'{key}' must be {sign} {_num(bound)}, got {short(value)}")
        if self.choices is not None:
            choices = self.choices() if callable(self.choices) else self.choices
            if not isinstance(value, collections.abc.Hashable) or value not in choices:
                close = difflib.get_close_matches(str(value)[:100], [str(c) for c in choices], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InputError(f"unknown {key} {short(value)}{hint}; choose from: {', '.join(map(str, choices))}")


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
    seed: int = spec(0, ge=0, le=2**32 - 1)  # NumPy's seed range
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
    if origin is typing.Literal:
        if not isinstance(value, collections.abc.Hashable) or value not in typing.get_args(tp):
            raise InputError(f"unknown {key} {short(value)}; choose from: {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"'{key}' must be a mapping, got {type(value).__name__} {short(value)}")
        base = default if isinstance(default, tp) else None
        return from_dict(tp, value, prefix=f"{key}.", base=base)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            raise InputError(f"'{key}' must be a list, got {type(value).__name__} {short(value)}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise InputError(f"'{key}' must be a mapping, got {type(value).__name__} {short(value)}")
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        return {_check_value(k, args[0], f"{key} key {short(k)}"): _check_value(v, args[1], f"{key}.{k}")
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"'{key}' must be a number, got {type(value).__name__} {short(value)}")
        try:
            return float(value)
        except OverflowError:
            raise InputError(f"'{key}' is too large for a number, got {short(value)}") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"'{key}' must be an integer, got {type(value).__name__} {short(value)}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise InputError(f"'{key}' must be {_TYPE_NAMES[tp]}, got {type(value).__name__} {short(value)}")
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
    if base is None and prefix:  # a section given where the default is null replaces the task's own
        for name in getattr(cls, "REQUIRED_ALONE", ()):
            if name not in data:
                raise InputError(f"'{prefix}{name}' is required: '{prefix[:-1]}' replaces the task's own (it is not "
                                 "merged with it), so it must say everything it means")
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key)[:100], fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            name = key if isinstance(key, str) and len(key) <= 80 else short(key)
            raise InputError(f"unknown key '{prefix}{name}'{hint}")
        default = getattr(base, key) if base is not None else _field_default(fields[key])
        kwargs[key] = _check_value(value, hints[key], f"{prefix}{key}", default)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for ``config.yaml`` and ``metrics.json``)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- reading task files


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``) and refuses a key
    written twice in one mapping (PyYAML keeps the last silently: a second ``train:`` block would replace the
    first, a method listed twice would change the reference of every comparison). Merge keys (``<<: *base``)
    may still be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError(None, None, f"key {short(key)} is given twice in one "
                                                            "mapping", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


MAX_TASK_BYTES = 256 * 1024  # a task file is a few KB; PyYAML reads about 200 KB/s
MAX_YAML_NODES = 10_000  # nodes of a loaded document with every alias expanded (a task file has a few hundred)
MAX_YAML_DEPTH = 32  # nesting levels


def _expanded_size(root: yaml.Node, where: str) -> None:
    """Refuse a composed YAML document that, with its aliases expanded, has more than :data:`MAX_YAML_NODES`
    nodes or more than :data:`MAX_YAML_DEPTH` levels, or that refers to itself (an alias "bomb" is a few
    lines whose expansion holds billions of nodes). Counts shared nodes once per use, in linear time."""
    size: dict[int, int] = {}
    stack = [(root, 1, False)]
    open_ids: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [c for kv in node.value for c in kv]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if done:
            open_ids.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_NODES:
                raise InputError(f"{where} holds more than {MAX_YAML_NODES} values once its aliases are expanded")
            continue
        if key in size:
            continue
        if key in open_ids:
            raise InputError(f"{where} holds an alias that refers to itself")
        if depth > MAX_YAML_DEPTH:
            raise InputError(f"{where} is nested more than {MAX_YAML_DEPTH} levels deep")
        open_ids.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def _unshared(obj: Any) -> Any:
    """Plain data with every alias turned into its own copy, so that setting one key never changes another."""
    if isinstance(obj, dict):
        return {k: _unshared(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unshared(v) for v in obj]
    return obj


def safe_load(text: str, where: str = "YAML") -> Any:
    """Load YAML with the safe loader (no tag builds a Python object), bounded: at most
    :data:`MAX_YAML_NODES` values with every alias expanded, :data:`MAX_YAML_DEPTH` levels, no self-reference.
    Any problem is a one-line :class:`InputError` that starts with ``where``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return _unshared(loader.construct_document(node))
    except InputError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InputError(f"{where} is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise InputError(f"{where} holds a value that cannot be read ({str(e)[:80]})") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """Read a task file (at most :data:`MAX_TASK_BYTES`) with :func:`safe_load`; any problem is a one-line
    :class:`InputError`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"task file {str(path)!r} is a folder, not a task file")
    if not path.exists():
        raise InputError(f"task file {str(path)!r} does not exist")
    if not path.is_file():
        raise InputError(f"task file {str(path)!r} is not a regular file")
    try:
        n = path.stat().st_size
        if n > MAX_TASK_BYTES:
            raise InputError(f"task file {str(path)!r} has {n} bytes; a task file holds at most {MAX_TASK_BYTES}")
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file") from None
    except OSError as e:
        raise InputError(f"cannot read task file {str(path)!r}: {e.strerror or type(e).__name__}") from None
    data = safe_load(text, str(path))
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of keys (task, kind, data, ...), got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise InputError(f"--set expects key=value, got {short(text)}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if len(raw) > MAX_TASK_BYTES:
        raise InputError(f"--set {short(key)}: the value has {len(raw)} characters; at most {MAX_TASK_BYTES}")
    value = safe_load(raw, f"--set {short(key)}: value {short(raw)}") if raw.strip() else ""
    return key, value


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
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
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
        raise InputError(f"'kind' must be a string, got {short(kind_name)}")
    kind = TASK_KINDS.get(kind_name)
    sets = [parse_override(text) for text in overrides]
    for key, value in sets:
        if key == "kind" and value != kind_name:
            raise InputError(f"--set kind: a task's kind cannot be changed ({short(path.name)} is a {kind_name!r} "
                             "task; its keys belong to that kind); write a task file of the other kind")
    early = [k == "quick" or k.startswith("quick.") for k, _ in sets]  # these edit the quick section first
    for (key, value), first in zip(sets, early):
        if first:
            set_dotted(data, key, value)
    if quick:
        q = data.get("quick") or {}
        if not isinstance(q, dict):
            raise InputError(f"'quick' must be a mapping of dotted keys, got {short(q)}")
        for k, v in q.items():
            set_dotted(data, str(k), v)
    for (key, value), first in zip(sets, early):
        if not first:
            set_dotted(data, key, value)
    return validate(from_dict(kind.config, data))


def _nan_inside(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_nan_inside(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_nan_inside(v) for v in value)
    return False


def check_options(fn, options: dict, where: str, **fixed) -> dict:
    """Check ``options`` for ``fn(**fixed, **options)`` as a task file's fields are checked: an option ``fn``
    does not take, a value of the wrong type for its annotation (``batch: int``), a value outside a
    :class:`Check` declared with it (``batch: Annotated[int, Check(ge=1)]``) or a NaN is an
    :class:`InputError` naming ``where.option``. Returns the options converted (an int for a float is a float).
    An annotation the checker does not know is left to ``fn``."""
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature available; let the call decide
        return dict(options)
    try:
        sig.bind(**fixed, **options)
    except TypeError as e:
        raise InputError(f"{where}: {e}") from None
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type checks
        hints = {}
    out = {}
    for name, value in options.items():
        key = f"{where}.{name}"
        hint, checks = hints.get(name, Any), []
        if typing.get_origin(hint) is typing.Annotated:
            hint, *meta = typing.get_args(hint)
            checks = [m for m in meta if isinstance(m, Check)]
        try:
            value = _check_value(value, hint, key)
        except TypeError:  # an annotation the checker does not know
            pass
        if _nan_inside(value):
            raise InputError(f"'{key}' must not be NaN")
        for check in checks:
            check(value, key)
        out[name] = value
    return out


def checked_call(fn, options: dict, where: str, **fixed):
    """Call ``fn(**fixed, **options)`` after :func:`check_options`."""
    return fn(**fixed, **check_options(fn, options, where, **fixed))
