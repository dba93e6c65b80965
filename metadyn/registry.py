"""Name -> object registries for backbones, methods, policies, task kinds, datasets and benchmarks.

Every registry is explicit about where its entries come from: it names its *provider* modules, and
the first time it is asked for a name (``get``, ``names``, ``in``, iteration) it imports them. So a
registry is complete whoever imported what before (``import metadyn; metadyn.registry.METHODS.names()``
lists every method), while ``import metadyn`` itself stays light.

A provider that is a package has every module directly inside it imported: adding a backbone is one
new file in ``metadyn/core/backbones/`` that registers itself with ``@BACKBONES.register("name")``.
Code outside metadyn registers its own entries the same way (before it asks for them).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

from metadyn.errors import InputError


class Registry:
    """A named table of constructors; registering a name twice is an error.

    Example::

        BACKBONES = Registry("backbone", providers=("metadyn.core.backbones",))

        @BACKBONES.register("conv4")
        def conv4_exits(...): ...

        BACKBONES.get("conv4")(...)
    """

    def __init__(self, kind: str, providers: tuple[str, ...] = ()):
        self.kind = kind
        self.providers = tuple(providers)
        self._items: dict[str, Any] = {}
        self._examples: dict[str, Any] = {}
        self._loaded = not self.providers

    def register(self, name: str, obj: Any = None, *, example: Any = None) -> Callable:
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator. ``example``: what the
        registry's contract tests need to exercise the entry on a tiny scale (a backbone's options for a
        ``(1, 8, 8)`` input; a zero-argument builder of a tiny model a method trains)."""

        def add(o: Any) -> Any:
            if name in self._items and self._items[name] is not o:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            if example is not None:
                self._examples[name] = example
            return o

        return add if obj is None else add(obj)

    def example(self, name: str) -> Any:
        """The ``example`` registered with ``name`` (None when there is none)."""
        self.get(name)
        return self._examples.get(name)

    def load(self) -> Registry:
        """Import the provider modules (once); returns the registry."""
        if not self._loaded:
            self._loaded = True  # before importing: a provider may look itself up while it registers
            for name in self.providers:
                mod = importlib.import_module(name)
                for sub in pkgutil.iter_modules(getattr(mod, "__path__", [])):
                    if not sub.name.startswith("_"):
                        importlib.import_module(f"{name}.{sub.name}")
        return self

    def get(self, name: str) -> Any:
        """The object registered as ``name``; an unknown name is an :class:`InputError` listing the choices."""
        self.load()
        if not isinstance(name, str) or name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown {self.kind} {name!r}{hint}; choose from: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self.load()._items)

    def items(self) -> list[tuple[str, Any]]:
        return [(n, self._items[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self.load()._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.load()._items)


BACKBONES = Registry("backbone", ("metadyn.core.backbones",))
METHODS = Registry("method", ("metadyn.core.losses", "metadyn.core.gating", "metadyn.consistency.losses"))
POLICIES = Registry("policy", ("metadyn.core.policies",))
DATASETS = Registry("dataset", ("metadyn.data",))
TASK_KINDS = Registry("task kind", ("metadyn.runner.kinds",))
BENCHMARKS = Registry("benchmark", ("metadyn.bench",))

ALL = {"backbones": BACKBONES, "methods": METHODS, "policies": POLICIES, "datasets": DATASETS,
       "task kinds": TASK_KINDS, "benchmarks": BENCHMARKS}
