"""Name -> object registries for backbones, methods, policies, task kinds, datasets and benchmarks."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

from metadyn.errors import InputError


class Registry:
    """A named table of constructors; registering a name twice is an error.

    Example::

        BACKBONES = Registry("backbone")

        @BACKBONES.register("conv4")
        def conv4_exits(...): ...

        BACKBONES.get("conv4")(...)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None) -> Callable:
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""

        def add(o: Any) -> Any:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> Any:
        """The object registered as ``name``; an unknown name is an :class:`InputError` listing the choices."""
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"unknown {self.kind} {name!r}{hint}; choose from: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


BACKBONES = Registry("backbone")
METHODS = Registry("method")  # training losses: name -> factory(**kwargs) -> loss(out, y)
POLICIES = Registry("policy")
TASK_KINDS = Registry("task kind")
DATASETS = Registry("dataset")
